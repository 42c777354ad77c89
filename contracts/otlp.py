"""Decoding of `otlp_spans` messages into `SpanUsage` records.

A Kafka message on `otlp_spans` is one OTLP `ExportTraceServiceRequest`
(the OTel Collector kafkaexporter's default `otlp_proto`, or `otlp_json`).
The stream job and the ClickHouse sink both read that topic, so the decoding
lives here, once. It is on the hot path of both: one pass over each span's
attributes, dispatching on the key through a table instead of an if-chain.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.usage import SpanUsage
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

OTLP_PROTO = "otlp_proto"
OTLP_JSON = "otlp_json"
_STATUS_ERROR = Status.STATUS_CODE_ERROR


class MalformedSpans(ValueError):
    """A message on `otlp_spans` that is not a decodable OTLP trace request."""


def _as_str(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return ""
    return str(getattr(value, kind))


def _as_int(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return int(value.double_value)
    if kind == "string_value":
        try:
            return int(float(value.string_value))
        except ValueError:
            return 0
    return 0


def _as_float(value: AnyValue) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "double_value":
        return value.double_value
    if kind == "int_value":
        return float(value.int_value)
    if kind == "string_value":
        try:
            return float(value.string_value)
        except ValueError:
            return None
    return None


def _as_bool(value: AnyValue) -> bool:
    kind = value.WhichOneof("value")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        return value.string_value.strip().lower() in ("true", "1")
    return bool(_as_int(value))


def _setter(field_name: str, convert: Callable[[AnyValue], Any]) -> Callable[[SpanUsage, AnyValue], None]:
    def set_field(usage: SpanUsage, value: AnyValue) -> None:
        setattr(usage, field_name, convert(value))

    return set_field


def _set_if_empty(field_name: str) -> Callable[[SpanUsage, AnyValue], None]:
    """For deprecated or foreign spellings: the canonical attribute wins when both exist."""

    def set_field(usage: SpanUsage, value: AnyValue) -> None:
        if not getattr(usage, field_name):
            setattr(usage, field_name, _as_str(value))

    return set_field


def _set_int_if_zero(field_name: str) -> Callable[[SpanUsage, AnyValue], None]:
    def set_field(usage: SpanUsage, value: AnyValue) -> None:
        if not getattr(usage, field_name):
            setattr(usage, field_name, _as_int(value))

    return set_field


def _set_bool_true(field_name: str) -> Callable[[SpanUsage, AnyValue], None]:
    def set_field(usage: SpanUsage, value: AnyValue) -> None:
        setattr(usage, field_name, value.bool_value or value.string_value == "true")

    return set_field


_SETTERS: dict[str, Callable[[SpanUsage, AnyValue], None]] = {
    attr.GEN_AI_OPERATION_NAME: _setter("operation", _as_str),
    attr.GEN_AI_PROVIDER_NAME: _setter("provider", _as_str),
    attr.GEN_AI_SYSTEM: _set_if_empty("provider"),
    attr.GEN_AI_REQUEST_MODEL: _setter("request_model", _as_str),
    attr.GEN_AI_RESPONSE_MODEL: _setter("response_model", _as_str),
    attr.GEN_AI_USAGE_INPUT_TOKENS: _setter("input_tokens", _as_int),
    attr.GEN_AI_USAGE_OUTPUT_TOKENS: _setter("output_tokens", _as_int),
    attr.GEN_AI_USAGE_PROMPT_TOKENS: _set_int_if_zero("input_tokens"),
    attr.GEN_AI_USAGE_COMPLETION_TOKENS: _set_int_if_zero("output_tokens"),
    attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: _setter("cache_read_tokens", _as_int),
    attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: _setter("cache_creation_tokens", _as_int),
    attr.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: _set_int_if_zero("cache_creation_tokens"),
    attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: _setter("reasoning_tokens", _as_int),
    attr.GEN_AI_TOOL_NAME: _setter("tool_name", _as_str),
    attr.GEN_AI_AGENT_NAME: _setter("agent_name", _as_str),
    attr.GEN_AI_CONVERSATION_ID: _setter("conversation_id", _as_str),
    attr.ERROR_TYPE: _setter("error_type", _as_str),
    attr.COST_USD: _setter("cost_usd", _as_float),
    attr.MODEL_CLASS: _setter("model_class", _as_str),
    attr.DOWNGRADED_FROM: _setter("downgraded_from", _as_str),
    attr.ROUTED_FROM: _setter("routed_from", _as_str),
    attr.ROUTE: _setter("route", _as_str),
    attr.ESCALATED_FROM: _setter("escalated_from", _as_str),
    attr.REFUSED: _setter("refused", _as_str),
    attr.STAKES: _setter("stakes", _as_str),
    attr.FALLBACK: _setter("fallback", _as_bool),
    attr.TOOL_CALLS: _setter("tool_calls", _as_int),
    "llm.request.type": _set_if_empty("operation"),  # OpenLLMetry
}
for _attribute, _dimension in attr.ATTRIBUTION_BY_ATTRIBUTE.items():
    _SETTERS[_attribute] = _setter(_dimension, _as_str)
for _attribute, _dimension in attr.TRACELOOP_ATTRIBUTION.items():
    _SETTERS[_attribute] = _set_if_empty(_dimension)

#: Attributes whose presence makes a span a GenAI span worth accounting.
_GENAI_MARKERS = frozenset({attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME, attr.GEN_AI_SYSTEM})


def detect_format(payload: bytes) -> str:
    """OTLP JSON starts with `{` (after whitespace); a protobuf request starts with field tag 0x0A."""
    stripped = payload.lstrip()
    return OTLP_JSON if stripped[:1] == b"{" else OTLP_PROTO


def parse_request(payload: bytes) -> ExportTraceServiceRequest:
    """Parse one message as `otlp_proto` or `otlp_json`; raise `MalformedSpans` with the reason."""
    if not payload:
        raise MalformedSpans("empty message")
    if detect_format(payload) == OTLP_JSON:
        request = _parse_json(payload)
        if not request.resource_spans:
            raise MalformedSpans("JSON message holds no resourceSpans: not an OTLP trace request")
        return request
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        raise MalformedSpans(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from exc
    if not request.resource_spans:
        raise MalformedSpans("protobuf message holds no resource_spans")
    return request


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP JSON writes trace and span ids as hex; protobuf's JSON mapping expects base64."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                node[key] = base64.b64encode(bytes.fromhex(value)).decode() if value else ""
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def _parse_json(payload: bytes) -> ExportTraceServiceRequest:
    try:
        document = json.loads(payload)
        _hex_ids_to_base64(document)
        return json_format.ParseDict(document, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError, TypeError, AttributeError) as exc:
        raise MalformedSpans(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from exc


def iter_usage(request: ExportTraceServiceRequest) -> Iterator[SpanUsage]:
    """Yield one `SpanUsage` per GenAI span in the request; other spans are passed over."""
    for resource_spans in request.resource_spans:
        service = ""
        for kv in resource_spans.resource.attributes:
            if kv.key == attr.SERVICE_NAME:
                service = kv.value.string_value
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                usage = _span_usage(span, service)
                if usage is not None:
                    yield usage


def _span_usage(span: Any, service: str) -> SpanUsage | None:
    keys = [kv.key for kv in span.attributes]
    if _GENAI_MARKERS.isdisjoint(keys) or attr.DUPLICATE_OF in keys:
        return None  # not GenAI, or a second instrumentation's span of a call counted on burnguard's
    usage = SpanUsage(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        operation="",
        service=service,
        status_error=span.status.code == _STATUS_ERROR,
    )
    setters = _SETTERS
    for kv in span.attributes:
        setter = setters.get(kv.key)
        if setter is not None:
            setter(usage, kv.value)
    if not usage.operation:
        usage.operation = attr.OP_CHAT
    return usage


def decode_usage(payload: bytes) -> list[SpanUsage]:
    """Decode one `otlp_spans` message into the GenAI spans it carries."""
    return list(iter_usage(parse_request(payload)))
