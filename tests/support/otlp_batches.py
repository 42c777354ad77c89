"""OTLP protobuf messages as the real OpenTelemetry SDK encodes them, for feeding `otlp_spans`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from burnguard.contracts import attributes as attr
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def otlp_batch(
    tenant: str,
    calls: Iterable[tuple[str, int, int]],
    model: str = "gpt-4.1",
    at: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """One `ExportTraceServiceRequest` with a chat span per (feature, input_tokens, output_tokens).

    `at` sets the spans' end time (event time), e.g. to send a late span.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    end_ns = int(at.timestamp() * 1e9) if at else None
    for feature, input_tokens, output_tokens in calls:
        span = tracer.start_span(f"chat {model}", start_time=end_ns - 1_000_000 if end_ns else None)
        span.set_attributes(
            {
                attr.GEN_AI_OPERATION_NAME: "chat",
                attr.GEN_AI_PROVIDER_NAME: "openai",
                attr.GEN_AI_REQUEST_MODEL: model,
                attr.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
                attr.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
                attr.TENANT: tenant,
                attr.FEATURE: feature,
                **(extra or {}),
            }
        )
        span.end(end_time=end_ns)
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString()
