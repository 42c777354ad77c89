"""An app with OpenTelemetry of its own: its spans, and an OpenAI call inside one of them.

`OTEL_APP_SETUP=zero-code` (run under `opentelemetry-instrument`): the app only uses the
OpenTelemetry API; the SDK is set up from the OTEL_* variables. `OTEL_APP_SETUP=configure`:
the app builds its own SDK tracer provider exporting with OTLP/HTTP (OTEL_EXPORTER_OTLP_*),
sets it as the global one, then calls `burnguard.configure()` and records the call with
burnguard's manual API. Either way the app's backend must still get every span.
"""

from __future__ import annotations

import os

from opentelemetry import trace

QUESTION = [{"role": "user", "content": "Summarize the ticket in one line."}]


def own_provider() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> None:
    setup = os.environ["OTEL_APP_SETUP"]
    if setup == "configure":
        own_provider()
        import burnguard

        burnguard.configure()
    tracer = trace.get_tracer("otel-app")
    with tracer.start_as_current_span("handle-request"):
        if setup == "configure":
            import burnguard

            burnguard.record_llm_call("gpt-4.1", "openai", 120, 30)
        else:
            import openai

            client = openai.OpenAI(max_retries=0)
            client.chat.completions.create(model="gpt-4.1", messages=QUESTION)
        with tracer.start_as_current_span("render-reply"):
            pass
    print("done", flush=True)


if __name__ == "__main__":
    main()
