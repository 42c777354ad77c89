"""Decoding of `otlp_spans` messages into `SpanUsage` records.

A Kafka message on `otlp_spans` is one OTLP `ExportTraceServiceRequest`
(the OTel Collector kafkaexporter's default `otlp_proto`, or `otlp_json`).
The stream job and the ClickHouse sink both read that topic, so the decoding
lives here, once. It is on the hot path of both: the request is parsed into
`TraceRequestView` (the same bytes, attributes as `{key: AnyValue}` maps, see
`otlp_view`), each span's attribute keys are looked up in one table, and only
the values of known keys are read.

Attribute order does not matter: a canonical attribute wins over a deprecated or
foreign spelling of the same field, which fills the field only when the
canonical ones left it empty (of two such spellings, the one listed first in
the table); a key repeated in one span (OTLP forbids it) keeps its last value.
Attribution (tenant, user, ...) missing from a span is taken from its resource
(`resource_attribution`); the span's own value, in any spelling, wins.

The per-span walk has a native fast path (contracts/native, `native_decoder`): for protobuf
bytes upb accepts it returns each accounted span's `SpanUsage`, built from the tables below
and `span_checks`' fields and ceilings, handed to it as data; anything else, and any message
with a span it cannot vouch `span_problem` passes, is decoded by the Python code here, the
reference (docs/ARCHITECTURE.md §3, "Native decoding"). Whether upb accepts the whole message
is checked natively too, where the check can vouch for it (`otlp_view.wire_schema`), in the same
walk of the bytes as the decoding where the message may hold a GenAI span; else upb parses it,
as for the reference.

Every span is checked here too (`span_checks`): a span with a number that is not
finite, negative, past its ceiling or of the wrong type, or a key past its length
limit, is rejected alone (`decode_spans`), with its reason and a one-span request
to dead-letter; the other spans of the message count as usual.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.env_numbers import env_flag
from burnguard.contracts.otlp_view import TraceRequestView, wire_schema
from burnguard.contracts.span_checks import (
    COST_FIELD,
    COUNT_FIELDS,
    DEFAULT_LIMITS,
    KEY_FIELDS,
    NOT_FINITE,
    WRONG_TYPE,
    SpanLimits,
    span_problem,
)
from burnguard.contracts.usage import SpanUsage
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Status

logger = logging.getLogger(__name__)

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


class BadValue(ValueError):
    """An attribute whose value cannot be the number its field needs (the span is rejected)."""

    kind = WRONG_TYPE


class NotFinite(BadValue):
    kind = NOT_FINITE


def _as_int(value: AnyValue) -> int:
    """A count: an int, a whole finite double, or a string holding one; no value reads as 0."""
    kind = value.WhichOneof("value")
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return _whole(value.double_value)
    if kind == "string_value":
        try:
            return _whole(float(value.string_value))
        except ValueError:
            raise BadValue(f"{value.string_value[:40]!r} is not a number") from None
    if kind is None:
        return 0
    raise BadValue(f"a {kind} where a number belongs")


def _whole(number: float) -> int:
    if not math.isfinite(number):
        raise NotFinite(f"{number} is not a finite number")
    return int(number)


def _as_float(value: AnyValue) -> float | None:
    """An amount: a double, an int or a numeric string; no value reads as None (not priced)."""
    kind = value.WhichOneof("value")
    if kind == "double_value":
        return value.double_value
    if kind == "int_value":
        return float(value.int_value)
    if kind == "string_value":
        try:
            return float(value.string_value)
        except ValueError:
            raise BadValue(f"{value.string_value[:40]!r} is not a number") from None
    if kind is None:
        return None
    raise BadValue(f"a {kind} where a number belongs")


def _as_bool(value: AnyValue) -> bool:
    kind = value.WhichOneof("value")
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_value":
        return value.string_value.strip().lower() in ("true", "1")
    try:
        return bool(_as_int(value))
    except BadValue:
        return False


def _read_str(value: AnyValue) -> str:
    """`_as_str`, without `WhichOneof` for the common case: a non-empty string_value is a string."""
    return value.string_value or _as_str(value)


def _read_int(value: AnyValue) -> int:
    """`_as_int`; a non-zero int_value can only be an int (the members of a oneof read as zero when unset)."""
    return value.int_value or _as_int(value)


def _read_float(value: AnyValue) -> float | None:
    """`_as_float`; a non-zero double_value can only be a double."""
    return value.double_value or _as_float(value)


#: How an attribute's value is read, by field type: `_READERS[kind]`; the per-span loop of
#: `_span_usage` inlines the common case of each (a non-empty string, a non-zero int or double).
_STR, _INT, _FLOAT, _BOOL = range(4)
_READERS: tuple[Callable[[AnyValue], Any], ...] = (_read_str, _read_int, _read_float, _as_bool)
#: What decoding does with one attribute: (index into the `SpanUsage` field values, how to read
#: the value (`_STR` ...), None for a canonical attribute or, for a deprecated or foreign spelling
#: that only fills a field the canonical attributes left empty, its rank: the first listed wins).
_Slot = tuple[int, int, "int | None"]
_FIELDS = [f.name for f in fields(SpanUsage) if f.name != "extra"]  # extra: a fresh dict per span
#: The fields a `SpanUsage` gets a new empty dict in (`extra`), as its `__init__` does.
_FRESH_DICTS = [f.name for f in fields(SpanUsage) if f.default_factory is dict]
_INDEX = {name: index for index, name in enumerate(_FIELDS)}
_SLOTS: dict[str, _Slot] = {}


def _read(attribute: str, field_name: str, read: int, *, if_empty: bool = False) -> None:
    _SLOTS[attribute] = (_INDEX[field_name], read, len(_SLOTS) if if_empty else None)


def _read_spellings(field_name: str, spellings: tuple[str, ...], read: int) -> None:
    """A field several attributes carry, in their precedence (`attributes.FIELD_SPELLINGS`)."""
    canonical, *others = spellings
    _read(canonical, field_name, read)
    for other in others:
        _read(other, field_name, read, if_empty=True)


_read(attr.GEN_AI_OPERATION_NAME, "operation", _STR)
_read_spellings("provider", attr.FIELD_SPELLINGS["provider"], _STR)
_read(attr.GEN_AI_REQUEST_MODEL, "request_model", _STR)
_read(attr.GEN_AI_RESPONSE_MODEL, "response_model", _STR)
for _field in ("input_tokens", "output_tokens", "cache_creation_tokens"):
    _read_spellings(_field, attr.FIELD_SPELLINGS[_field], _INT)
_read(attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, "cache_read_tokens", _INT)
_read(attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "reasoning_tokens", _INT)
_read(attr.GEN_AI_TOOL_NAME, "tool_name", _STR)
_read(attr.GEN_AI_AGENT_NAME, "agent_name", _STR)
_read(attr.GEN_AI_CONVERSATION_ID, "conversation_id", _STR)
_read(attr.ERROR_TYPE, "error_type", _STR)
_read(attr.COST_USD, "cost_usd", _FLOAT)
_read(attr.MODEL_CLASS, "model_class", _STR)
_read(attr.DOWNGRADED_FROM, "downgraded_from", _STR)
_read(attr.ROUTED_FROM, "routed_from", _STR)
_read(attr.ROUTE, "route", _STR)
_read(attr.ESCALATED_FROM, "escalated_from", _STR)
_read(attr.REFUSED, "refused", _STR)
_read(attr.STAKES, "stakes", _STR)
_read(attr.FALLBACK, "fallback", _BOOL)
_read(attr.TOOL_CALLS, "tool_calls", _INT)
_read("llm.request.type", "operation", _STR, if_empty=True)  # OpenLLMetry
for _dimension, _spellings in attr.ATTRIBUTION_SPELLINGS.items():
    _read_spellings(_dimension, _spellings, _STR)
#: The attribution spellings, also read from the resource (`resource_attribution`).
_ATTRIBUTION_SLOTS = {key: slot for key, slot in _SLOTS.items() if _FIELDS[slot[0]] in attr.ATTRIBUTION_KEYS}

#: Attributes whose presence makes a span a GenAI span worth accounting (`_is_accounted`).
_OPERATION_NAME, _PROVIDER_NAME = attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME
_SYSTEM, _DUPLICATE_OF = attr.GEN_AI_SYSTEM, attr.DUPLICATE_OF

#: The field values of a `SpanUsage` before any attribute is read, in field order; `_span_usage`
#: sets the fields without a default (trace_id ... end_ns, the first six by position, and operation).
_DEFAULTS: list[Any] = [
    None if field.default is MISSING else field.default for field in fields(SpanUsage) if field.name in _INDEX
]
_OPERATION, _SERVICE, _STATUS_ERROR_FIELD = _INDEX["operation"], _INDEX["service"], _INDEX["status_error"]


def detect_format(payload: bytes) -> str:
    """OTLP JSON starts with `{` (after whitespace); a protobuf request starts with field tag 0x0A.

    Only a guess: 0x0A is also a newline, so a protobuf request whose first `resource_spans`
    is 123 bytes long (a length written as `{`) looks like JSON; `parse_request` copes.

    The first byte past ASCII whitespace (what `bytes.lstrip` strips), found in the first few
    bytes without copying the message (a protobuf request's is its second byte, 0x0A being a
    newline); only a message that starts with more whitespace than that is stripped.
    """
    for byte in payload[:_FORMAT_LOOKAHEAD]:
        if byte not in _ASCII_WHITESPACE:
            return OTLP_JSON if byte == _JSON_START else OTLP_PROTO
    return OTLP_JSON if payload.lstrip()[:1] == b"{" else OTLP_PROTO


#: The bytes `bytes.lstrip()` strips, and the byte that starts a JSON request.
_ASCII_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_JSON_START = ord("{")
#: The bytes `detect_format` looks at before it strips the message's whitespace instead.
_FORMAT_LOOKAHEAD = 8


def parse_request(payload: bytes) -> tuple[Message, bytes]:
    """Parse one message as `otlp_proto` or `otlp_json` into a `TraceRequestView`, with the
    protobuf bytes it was parsed from (the payload, or the JSON request written as protobuf).

    Raises `MalformedSpans` with the reason.
    """
    if not payload:
        raise MalformedSpans("empty message")
    if detect_format(payload) == OTLP_PROTO:
        return _parse_proto(payload), payload
    try:
        return _parse_json_request(payload)
    except MalformedSpans as json_error:
        if payload[:1] != b"\n":
            raise
        try:  # "\n{" also starts a protobuf request (see `detect_format`)
            return _parse_proto(payload), payload
        except MalformedSpans:
            raise json_error from None


def _parse_proto(payload: bytes) -> Message:
    view = TraceRequestView()
    try:
        view.ParseFromString(payload)
    except DecodeError as exc:
        raise MalformedSpans(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from exc
    if not view.resource_spans:
        raise MalformedSpans("protobuf message holds no resource_spans")
    return view


def _parse_json_request(payload: bytes) -> tuple[Message, bytes]:
    request = _parse_json(payload)
    if not request.resource_spans:
        raise MalformedSpans("JSON message holds no resourceSpans: not an OTLP trace request")
    wire = request.SerializeToString()
    return TraceRequestView.FromString(wire), wire


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
    except (ValueError, json_format.ParseError, TypeError, AttributeError, RecursionError) as exc:  # too deep
        raise MalformedSpans(f"not an OTLP JSON ExportTraceServiceRequest: {exc}") from exc


@dataclass(slots=True)
class RejectedSpan:
    """A span that breaks a rule of `span_checks`: not counted, not stored, dead-lettered alone."""

    index: int  # its position among all spans of the message, in walk order: part of its identity
    kind: str  # one of `span_checks.REJECTION_KINDS`, the counter it is counted under
    reason: str
    #: a one-span `ExportTraceServiceRequest` with the span's resource and scope, as sent
    request: bytes


@dataclass(slots=True)
class DecodedSpans:
    """The GenAI spans of one message that may be counted, and the ones rejected."""

    usages: list[SpanUsage] = field(default_factory=list)
    rejected: list[RejectedSpan] = field(default_factory=list)


def check_spans(request: Message, wire: bytes, limits: SpanLimits = DEFAULT_LIMITS) -> DecodedSpans:
    """Decode every GenAI span of a `TraceRequestView`, setting aside those that break a rule.

    `wire`: the protobuf bytes the view was parsed from, read again only where the view lost an
    attribute (`_ExactAttributes`). The loop runs once per span of every message, GenAI or not:
    a span that is not accounted costs its attribute map, a look for unknown fields and three
    look-ups in the map; the resource's service and attribution are read once per resource.
    """
    decoded = DecodedSpans()
    usages, rejected = decoded.usages, decoded.rejected
    exact = _ExactAttributes(wire)
    unknown_fields = UnknownFieldSet
    index = -1
    for resource_index, resource_spans in enumerate(request.resource_spans):
        resource = resource_spans.resource
        resource_attributes = resource.attributes
        if unknown_fields(resource):
            resource_attributes = exact.resource(resource, resource_index, resource_attributes)
        service = resource_attributes.get(attr.SERVICE_NAME)
        service = service.string_value if service is not None else ""
        inherited = [(_INDEX[d], value) for d, value in resource_attribution(resource_attributes).items()]
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                index += 1
                attributes = span.attributes
                if unknown_fields(span):
                    attributes = exact.span(span, index, attributes)
                if not _is_accounted(attributes):
                    continue
                try:
                    usage = _span_usage(span, attributes, service, inherited)
                    problem = span_problem(usage, limits)
                except _RejectedValue as exc:
                    problem = (exc.kind, str(exc))
                if problem is None:
                    usages.append(usage)
                else:
                    single = _single_span_request(resource_spans, scope_spans, span)
                    rejected.append(RejectedSpan(index, *problem, single))
    return decoded


#: The field numbers of `Span.attributes` and `Resource.attributes`.
_SPAN_ATTRIBUTES = trace_pb2.Span.DESCRIPTOR.fields_by_name["attributes"].number
_RESOURCE_ATTRIBUTES = resource_pb2.Resource.DESCRIPTOR.fields_by_name["attributes"].number


class _ExactAttributes:
    """The attributes of a span or resource as the official `repeated KeyValue` reads them,
    for the few the map view got wrong.

    upb keeps a map entry that carries a field besides key (1) and value (2) (OTLP 1.10's
    `KeyValue.key_strindex`, any field a hostile or future encoder adds, a key or value of the
    wrong wire type) out of the map, as an unknown field of its span or resource. Protobuf's
    `KeyValue` is the same attribute with that field ignored: an app must not hide its marker,
    tenant or cost from accounting with one extra field. So a span or resource with such an
    unknown field takes its attributes from the official parse of the same bytes (made once per
    message, only then), in wire order: a repeated key keeps its last value, as in the map.
    """

    def __init__(self, wire: bytes) -> None:
        self._wire = wire
        self._request: ExportTraceServiceRequest | None = None
        self._spans: list[Any] = []

    def _official(self) -> ExportTraceServiceRequest:
        if self._request is None:
            try:
                self._request = ExportTraceServiceRequest.FromString(self._wire)
            except DecodeError as exc:  # the view's parse took it: the same schema, so not expected
                raise MalformedSpans(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from exc
            resources = self._request.resource_spans
            self._spans = [span for spans in resources for scope in spans.scope_spans for span in scope.spans]
        return self._request

    def span(self, span: Message, index: int, attributes: Mapping[str, AnyValue]) -> Mapping[str, AnyValue]:
        """The attributes of the `index`-th span of the message (in walk order)."""
        if not _lost_attributes(span, _SPAN_ATTRIBUTES):
            return attributes
        self._official()
        return {entry.key: entry.value for entry in self._spans[index].attributes}

    def resource(
        self, resource: Message, index: int, attributes: Mapping[str, AnyValue]
    ) -> Mapping[str, AnyValue]:
        """The attributes of the resource of the `index`-th `ResourceSpans`."""
        if not _lost_attributes(resource, _RESOURCE_ATTRIBUTES):
            return attributes
        official = self._official().resource_spans[index].resource
        return {entry.key: entry.value for entry in official.attributes}


def _lost_attributes(message: Message, number: int) -> bool:
    """An attribute entry the map view kept out of the map: an unknown field with its number."""
    return any(unknown.field_number == number for unknown in UnknownFieldSet(message))


def _single_span_request(resource_spans: Any, scope_spans: Any, span: Any) -> bytes:
    """The span alone, with its resource and scope: what the dead-letter topic receives."""
    single = TraceRequestView()
    resource = single.resource_spans.add(schema_url=resource_spans.schema_url)
    resource.resource.CopyFrom(resource_spans.resource)
    scope = resource.scope_spans.add(schema_url=scope_spans.schema_url)
    scope.scope.CopyFrom(scope_spans.scope)
    scope.spans.add().CopyFrom(span)
    return single.SerializeToString()


class _RejectedValue(ValueError):
    """`BadValue` with the attribute it was read from."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def resource_attribution(attributes: Mapping[str, AnyValue]) -> dict[str, str]:
    """The attribution a resource carries (`OTEL_RESOURCE_ATTRIBUTES=burnguard.tenant=...`), by dimension.

    The OTel way to say "this deployment serves one tenant". A resource value fills only what the
    span left empty: any spelling on the span, deprecated or foreign included, wins over the
    resource. Among the resource's own spellings the span's precedence applies (canonical first).
    """
    if not attributes:
        return {}
    values: dict[str, str] = {}
    fallbacks: list[tuple[int, str]] = []
    for key in attributes:
        slot = _ATTRIBUTION_SLOTS.get(key)
        if slot is None:
            continue
        if slot[2] is None:
            values[_FIELDS[slot[0]]] = _READERS[slot[1]](attributes[key])
        else:
            fallbacks.append((slot[2], key))
    for _rank, key in sorted(fallbacks):
        dimension = _FIELDS[_ATTRIBUTION_SLOTS[key][0]]
        if not values.get(dimension):
            values[dimension] = _READERS[_ATTRIBUTION_SLOTS[key][1]](attributes[key])
    return {dimension: value for dimension, value in values.items() if value}


def _is_accounted(attributes: Mapping[str, AnyValue]) -> bool:
    """A GenAI span, unless a second instrumentation's span of a call counted on burnguard's."""
    return (
        _OPERATION_NAME in attributes or _PROVIDER_NAME in attributes or _SYSTEM in attributes
    ) and _DUPLICATE_OF not in attributes


def _span_usage(
    span: Any, attributes: Mapping[str, AnyValue], service: str, inherited: list[tuple[int, str]]
) -> SpanUsage:
    """The attributes into a list of field values, one `SpanUsage` built from it.

    The positional constructor with every value costs less than keyword arguments followed
    by an attribute write per field, and the common case of each reader is inlined (a call
    per attribute cost more than the read). Attribute order is not known (a map): the
    spellings that only fill an empty field are read after the canonical ones, and the
    resource's attribution (`inherited`: field index, value) fills what is still empty.
    """
    values = _DEFAULTS.copy()
    slots = _SLOTS
    fallbacks: list[tuple[int, str]] = []
    key = ""
    try:
        for key in attributes:
            slot = slots.get(key)
            if slot is None:
                continue
            index, kind, rank = slot
            if rank is not None:
                fallbacks.append((rank, key))
            elif kind == _STR:
                value = attributes[key]
                values[index] = value.string_value or _as_str(value)
            elif kind == _INT:
                value = attributes[key]
                values[index] = value.int_value or _as_int(value)
            elif kind == _FLOAT:
                value = attributes[key]
                values[index] = value.double_value or _as_float(value)
            else:
                values[index] = _as_bool(attributes[key])
    except BadValue as exc:
        raise _RejectedValue(f"{key}: {exc}", exc.kind) from None
    if fallbacks:
        _fill_if_empty(values, attributes, fallbacks)
    values[0] = span.trace_id.hex()
    values[1] = span.span_id.hex()
    values[2] = span.parent_span_id.hex()
    values[3] = span.name
    values[4] = span.start_time_unix_nano
    values[5] = span.end_time_unix_nano
    if not values[_OPERATION]:
        values[_OPERATION] = attr.OP_CHAT
    values[_SERVICE] = service
    values[_STATUS_ERROR_FIELD] = span.status.code == _STATUS_ERROR
    for index, value in inherited:
        if not values[index]:
            values[index] = value
    return SpanUsage(*values)


def _fill_if_empty(
    values: list[Any], attributes: Mapping[str, AnyValue], found: list[tuple[int, str]]
) -> None:
    """Deprecated and foreign spellings fill the fields still empty, in the order of their rank."""
    for _rank, key in sorted(found):
        index, kind, _ = _SLOTS[key]
        if not values[index]:
            try:
                values[index] = _READERS[kind](attributes[key])
            except BadValue as exc:
                raise _RejectedValue(f"{key}: {exc}", exc.kind) from None


def decode_usage(payload: bytes) -> list[SpanUsage]:
    """Decode one `otlp_spans` message into the valid GenAI spans it carries."""
    return decode_spans(payload).usages


def decode_spans(payload: bytes, limits: SpanLimits = DEFAULT_LIMITS) -> DecodedSpans:
    """Decode one `otlp_spans` message: the spans to count, and the rejected ones with reasons.

    Raises `MalformedSpans` when the message as a whole is not an OTLP request: the whole
    message is checked, whatever it holds, by the upb parse, which is skipped only where the
    native check vouches that upb accepts it (`_natively_accepted`, `_natively_walked`).
    """
    if detect_format(payload) != OTLP_PROTO:
        return check_spans(*parse_request(payload), limits)
    # the native path takes `bytes` only (not a bytearray a caller may change meanwhile)
    native = native_in_use() if type(payload) is bytes else None
    if _without_markers(payload):  # no span counts: whether upb accepts it is all there is to know
        if native is None or not _natively_accepted(native, payload):
            parse_request(payload)  # raises where upb refuses, as it always did
        return DecodedSpans()
    if native is not None:
        return _natively_walked(native, payload, limits)
    return check_spans(*parse_request(payload), limits)


@dataclass(slots=True)
class NativeFailures:
    """Calls of the native walk that raised (a Rust panic included): each message was then
    decoded by the reference, so nothing was lost, but the crate has a bug to fix."""

    count: int = 0


native_failures = NativeFailures()


def _natively_accepted(native: Any, payload: bytes) -> bool:
    """Whether the native check vouches that the upb parse accepts the whole message as
    `_parse_proto` does (contracts/native/src/valid.rs), so the parse is skipped; False (not
    sure, or the check failed): upb parses it, and raises `MalformedSpans` where it refuses.

    A Collector's firehose of messages without GenAI spans then costs this check alone."""
    try:
        return native.accepts(payload)
    except NATIVE_ERRORS as exc:  # a panic must not end the worker: upb parses
        _native_failed(exc)
        return False


def _native_failed(exc: BaseException) -> None:
    native_failures.count += 1
    logger.error(
        "native OTLP decoder failed (%d so far), the Python decoder decodes: %r", native_failures.count, exc
    )


def _natively_walked(native: Any, payload: bytes, limits: SpanLimits) -> DecodedSpans:
    """A message that may hold GenAI spans, checked and decoded in one native walk
    (`Decoder.checked_decode`): what `_natively_accepted` then `_natively_decoded` answer.

    Where the check does not vouch for the message, upb parses it (raising where it refuses)
    and the native walk decodes what upb accepted; where the walk falls back, or the native
    call fails, the reference decodes (a rejection's reason and one-span request are made in
    one place).
    """
    try:
        accepted, usages = native.checked_decode(payload, limits.ceilings())
    except NATIVE_ERRORS as exc:  # a panic must not end the worker: upb parses, the reference decodes
        _native_failed(exc)
        return check_spans(*parse_request(payload), limits)
    if usages is not None:
        return DecodedSpans(usages)
    if accepted:  # the walk fell back
        return check_spans(_parse_proto(payload), payload, limits)
    request, _ = parse_request(payload)  # raises where upb refuses, as it always did
    decoded = _natively_decoded(native, payload, limits)
    return check_spans(request, payload, limits) if decoded is None else decoded


def _natively_decoded(native: Any, payload: bytes, limits: SpanLimits) -> DecodedSpans | None:
    """The native decoder's `SpanUsage`s, each inside `limits`, of bytes upb accepted.

    None when the native walk fell back, failed, or met a span it cannot vouch is inside the
    limits (`span_problem` may reject it): then the reference (`check_spans`) decodes the
    message, so a rejection's reason and one-span request are made in one place.
    """
    try:
        usages = native.decode(payload, limits.ceilings())
    except NATIVE_ERRORS as exc:  # a panic must not end the worker: the reference decodes
        _native_failed(exc)
        return None
    if usages is None:
        return None
    return DecodedSpans(usages)


#: What every marker key starts with, as it stands in a protobuf message (a string field's UTF-8
#: bytes, unescaped): a message without it holds no marker.
_MARKER_PREFIX = os.path.commonprefix([_OPERATION_NAME, _PROVIDER_NAME, _SYSTEM]).encode()  # noqa: RUF071


def _without_markers(payload: bytes) -> bool:
    """A protobuf message in which no attribute can be a GenAI marker: none of its spans counts.

    A Collector that sends its whole trace pipeline sends many messages of services that make
    no model calls; one search of the bytes spares walking their spans (it stops at the first
    GenAI span of any other message). Only for protobuf bytes: JSON may spell a key with escapes.
    """
    return _MARKER_PREFIX not in payload


def native_decoder() -> Any | None:
    """The native fast path of `decode_spans` (contracts/native), None when it is not built.

    The crate holds no rule of its own: the attribute table (`_SLOTS`, `_ATTRIBUTION_SLOTS`),
    the GenAI markers, the duplicate mark, the service key, the defaults, `SpanUsage` and the
    fields `span_checks` checks are handed to it here, as data (the ceilings with each call),
    and so is the schema upb parses by (`wire_schema`), which its check of whole messages
    (`accepts`, and `checked_decode`, which checks in the decoding walk) reads. It walks protobuf
    bytes upb accepts and answers None ("fall back") for anything outside its simple case;
    `check_spans` stays the reference.
    """
    try:
        from burnguard.contracts import _otlp_native  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return _native_decoder(_otlp_native)
    except (TypeError, ValueError) as exc:  # a build older than this file, or rules it cannot apply
        logger.warning("native OTLP decoder not used (the Python decoder is): %s; rebuild: make venv", exc)
        return None


def _native_errors() -> tuple[type[BaseException], ...]:
    """What a call of the native walk may raise: an error, or a Rust panic, which PyO3 raises as
    its `PanicException`, a BaseException that the stream's and the sink's `except Exception` let
    through (a build older than this file does not name it)."""
    try:
        from burnguard.contracts._otlp_native import PanicException  # type: ignore[import-not-found]
    except ImportError:
        return (Exception,)
    return (Exception, PanicException)


def _native_decoder(module: Any) -> Any:
    """The rules of this module, handed to the native decoder as data.

    The decoder makes each `SpanUsage` itself from the field values (allocated as `__new__` does,
    each slot set, a new dict per `_FRESH_DICTS` field): `__init__` does no more than that, which
    a `__post_init__` would change, so a `SpanUsage` with one is left to the reference.
    """
    if hasattr(SpanUsage, "__post_init__"):
        raise ValueError("SpanUsage has a __post_init__, which the native decoder would not run")
    schema, required = wire_schema()
    return module.Decoder(
        slots=_SLOTS,
        attribution_slots=_ATTRIBUTION_SLOTS,
        readers=(_STR, _INT, _FLOAT, _BOOL),
        markers=[_OPERATION_NAME, _PROVIDER_NAME, _SYSTEM],
        duplicate_of=_DUPLICATE_OF,
        service_key=attr.SERVICE_NAME,
        defaults=_DEFAULTS,
        positions=_INDEX,
        operation_default=attr.OP_CHAT,
        status_error_code=_STATUS_ERROR,
        usage_class=SpanUsage,
        usage_fields=_FIELDS,
        fresh_dicts=_FRESH_DICTS,
        cost_field=COST_FIELD,
        count_fields=COUNT_FIELDS,
        key_fields=KEY_FIELDS,
        schema=schema,
        required=required,
    )


def native_in_use() -> Any | None:
    """The native decoder `decode_spans` uses: None when not built or BURNGUARD_NATIVE is off.

    Chosen at the first decode, not at import: the environment of the process at work decides,
    as it decides every other setting (a process may import the modules before it has it).
    """
    global _native
    if _native is _NOT_CHOSEN:
        _native = native_decoder() if env_flag("BURNGUARD_NATIVE", True) else None
    return _native


_NOT_CHOSEN: Any = object()
_native: Any = _NOT_CHOSEN
#: What a call into the native module may raise (`_native_errors`).
NATIVE_ERRORS = _native_errors()
