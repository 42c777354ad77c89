"""An app instrumented the plain OpenTelemetry way: it never imports burnguard.

The SDK's tracer provider, the official `opentelemetry-instrumentation-openai-v2`, the standard
`BaggageSpanProcessor` and the OTLP/HTTP exporter, all configured by the standard OTEL_*
variables (endpoint, service name, resource attributes). Each call runs inside a plain
`handle-request` span, the kind of non-GenAI span a Collector's GenAI-only filter drops.

    APP_CALLS="gpt-4.1:1000:200,gpt-4.1-mini:300:40" APP_BAGGAGE_TENANT=acme python otel_sdk_app.py

`APP_CALLS` lists model:input_tokens:output_tokens (the fake server answers with that usage);
`APP_BAGGAGE_TENANT`, when set, puts `burnguard.tenant` in baggage around the calls.
"""

from __future__ import annotations

import os

import openai
from opentelemetry import baggage, context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

QUESTION = [{"role": "user", "content": "Summarize the ticket in one line."}]


def main() -> None:
    provider = TracerProvider()  # the resource comes from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES
    provider.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_ENDPOINT
    trace.set_tracer_provider(provider)
    OpenAIInstrumentor().instrument()
    tracer = trace.get_tracer("otel-sdk-app")
    client = openai.OpenAI(max_retries=0)
    tenant = os.environ.get("APP_BAGGAGE_TENANT")
    token = context.attach(baggage.set_baggage("burnguard.tenant", tenant)) if tenant else None
    try:
        for call in os.environ["APP_CALLS"].split(","):
            model, input_tokens, output_tokens = call.split(":")
            with tracer.start_as_current_span("handle-request"):
                client.chat.completions.create(
                    model=model,
                    messages=QUESTION,
                    extra_headers={"x-fake-input": input_tokens, "x-fake-output": output_tokens},
                )
    finally:
        if token is not None:
            context.detach(token)
        provider.shutdown()  # flushes the batch to the Collector


if __name__ == "__main__":
    main()
