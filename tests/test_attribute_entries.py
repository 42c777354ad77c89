"""Attribute entries as a hostile or future encoder writes them: each counts as protobuf reads it.

A `KeyValue` with a field besides key and value (OTLP 1.10's `key_strindex`, or any unknown
field) is, for the official `repeated KeyValue`, the same attribute: key and value, the extra
field ignored. The decoder reads attributes through a map view (`contracts/otlp_view.py`), where
upb keeps such an entry out of the map; a span whose marker, tenant, cost or tokens carried one
extra field was not accounted, or accounted to the wrong key (a guardrail bypass). Every test
here runs over both decoders (`decode_impl`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.otlp import decode_spans, decode_usage
from burnguard.contracts.usage import SpanUsage
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.protowire import field, fixed32, fixed64, varint_field

pytestmark = pytest.mark.usefixtures("decode_impl")

SPAN = {
    attr.GEN_AI_OPERATION_NAME: "chat",
    attr.GEN_AI_PROVIDER_NAME: "openai",
    attr.GEN_AI_REQUEST_MODEL: "gpt-4.1",
    attr.GEN_AI_USAGE_INPUT_TOKENS: 1200,
    attr.GEN_AI_USAGE_OUTPUT_TOKENS: 300,
    attr.COST_USD: 0.0625,
    attr.TENANT: "acme",
}
RESOURCE = {attr.SERVICE_NAME: "billing", attr.TENANT: "from-resource", attr.WORKFLOW: "triage"}
#: The fields an attribute entry may carry besides key and value: every wire type, the field
#: OTLP 1.10 added (3, `key_strindex`), the next ones and the largest field number.
EXTRA_FIELDS = {
    "key_strindex": varint_field(3, 7),
    "varint-4": varint_field(4, 2**63),
    "fixed64-5": fixed64(5, 0x7FF8000000000000),
    "fixed32-6": fixed32(6, 1),
    "bytes-7": field(7, b"gen_ai.operation.name"),
    "big-varint": varint_field(2**29 - 1, 1),
    "big-bytes": field(100_000, b""),
}


def set_attributes(target: Any, attributes: Mapping[str, Any], extra: bytes, on: Iterable[str]) -> None:
    """`attributes` into a repeated KeyValue, in order; the entries of the keys `on` get `extra`."""
    marked = set(on)
    for key, value in attributes.items():
        entry = target.add(key=key)
        if isinstance(value, str):
            entry.value.string_value = value
        elif isinstance(value, float):
            entry.value.double_value = value
        else:
            entry.value.int_value = value
        if key in marked:
            entry.MergeFromString(extra)  # unknown to KeyValue: kept, written back as it came


def request(
    span: Mapping[str, Any] = SPAN,
    resource: Mapping[str, Any] = RESOURCE,
    extra: bytes = b"",
    on: Iterable[str] = (),
) -> bytes:
    """One span under one resource; the attributes named in `on` carry the field `extra`."""
    out = ExportTraceServiceRequest()
    resource_spans = out.resource_spans.add()
    set_attributes(resource_spans.resource.attributes, resource, extra, on)
    one = resource_spans.scope_spans.add().spans.add(name="chat gpt-4.1", trace_id=bytes(range(16)))
    one.span_id, one.start_time_unix_nano, one.end_time_unix_nano = bytes(8), 1, 2
    set_attributes(one.attributes, span, extra, on)
    return out.SerializeToString()


def only(payload: bytes) -> SpanUsage:
    decoded = decode_spans(payload)
    assert decoded.rejected == []
    (usage,) = decoded.usages
    return usage


def test_without_extra_fields_the_span_is_accounted_as_sent() -> None:
    usage = only(request())
    assert (usage.tenant, usage.cost_usd, usage.input_tokens, usage.output_tokens) == (
        "acme",
        0.0625,
        1200,
        300,
    )
    assert (usage.service, usage.workflow, usage.operation, usage.provider) == (
        "billing",
        "triage",
        "chat",
        "openai",
    )


@pytest.mark.parametrize("extra", EXTRA_FIELDS.values(), ids=EXTRA_FIELDS.keys())
def test_span_attributes_with_an_extra_field_are_accounted_exactly_as_without(extra: bytes) -> None:
    """The marker, tenant, cost and token attributes each carry the extra field."""
    hidden = [attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME, attr.TENANT, attr.COST_USD]
    hidden += [attr.GEN_AI_USAGE_INPUT_TOKENS, attr.GEN_AI_USAGE_OUTPUT_TOKENS, attr.GEN_AI_REQUEST_MODEL]
    assert only(request(extra=extra, on=hidden)) == only(request())


@pytest.mark.parametrize(
    "marker", [attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME, attr.GEN_AI_SYSTEM]
)
def test_a_span_whose_only_marker_carries_an_extra_field_is_accounted(marker: str) -> None:
    span = {marker: "openai" if marker != attr.GEN_AI_OPERATION_NAME else "chat", attr.TENANT: "acme"}
    usage = only(request(span, {}, EXTRA_FIELDS["key_strindex"], [marker]))
    assert usage.tenant == "acme"


def test_a_duplicate_mark_with_an_extra_field_still_skips_the_span() -> None:
    span = {**SPAN, attr.DUPLICATE_OF: "00f067aa0ba902b7"}
    assert decode_usage(request(span, extra=EXTRA_FIELDS["varint-4"], on=[attr.DUPLICATE_OF])) == []


@pytest.mark.parametrize("extra", EXTRA_FIELDS.values(), ids=EXTRA_FIELDS.keys())
def test_resource_attributes_with_an_extra_field_attribute_exactly_as_without(extra: bytes) -> None:
    """service.name and the resource's attribution carry the extra field; the span has no tenant."""
    span = {key: value for key, value in SPAN.items() if key != attr.TENANT}
    hidden = [attr.SERVICE_NAME, attr.TENANT, attr.WORKFLOW]
    usage = only(request(span, extra=extra, on=hidden))
    assert usage == only(request(span))
    assert (usage.service, usage.tenant, usage.workflow) == ("billing", "from-resource", "triage")


def test_the_span_tenant_with_an_extra_field_still_wins_over_the_resource() -> None:
    usage = only(request(extra=EXTRA_FIELDS["bytes-7"], on=[attr.TENANT]))
    assert usage.tenant == "acme"


def test_a_repeated_key_keeps_its_last_value_whichever_entry_carries_the_extra_field() -> None:
    """Today's rule for a key given twice (OTLP forbids it): the last one on the wire wins."""
    out = ExportTraceServiceRequest()
    span = out.resource_spans.add().scope_spans.add().spans.add()
    for key, value, extra in [
        (attr.GEN_AI_OPERATION_NAME, "chat", b""),
        (attr.TENANT, "first", EXTRA_FIELDS["key_strindex"]),
        (attr.TENANT, "second", b""),
        (attr.GEN_AI_PROVIDER_NAME, "a", b""),
        (attr.GEN_AI_PROVIDER_NAME, "b", EXTRA_FIELDS["varint-4"]),
    ]:
        entry = span.attributes.add(key=key)
        entry.value.string_value = value
        entry.MergeFromString(extra)
    usage = only(out.SerializeToString())
    assert (usage.tenant, usage.provider) == ("second", "b")


def test_an_entry_whose_key_is_only_a_key_strindex_is_an_attribute_without_a_name() -> None:
    """Traces carry no string table: `key_strindex` names nothing, the key is "" and ignored."""
    payload = request(extra=EXTRA_FIELDS["key_strindex"], on=[attr.TENANT])
    official = ExportTraceServiceRequest.FromString(payload)
    for entry in official.resource_spans[0].scope_spans[0].spans[0].attributes:
        if entry.key == attr.TENANT:
            entry.ClearField("key")
    usage = only(official.SerializeToString())
    assert usage.tenant == "from-resource"


def test_a_key_written_twice_in_one_entry_is_its_last() -> None:
    """Protobuf reads a string field given twice as the last one."""
    entry = (
        field(1, b"burnguard.tenant")
        + field(1, attr.GEN_AI_OPERATION_NAME.encode())
        + field(2, field(1, b"chat"))
    )
    span = field(1, bytes(16)) + field(2, bytes(8)) + field(9, entry)
    usage = only(field(1, field(2, field(2, span))))
    assert (usage.operation, usage.tenant) == ("chat", "")


#: Fields AnyValue does not know (its own are 1-8), of every wire type.
ANY_VALUE_EXTRAS = {
    "varint-9": varint_field(9, 1),
    "fixed64-10": fixed64(10, 0),
    "fixed32-11": fixed32(11, 0),
    "bytes-12": field(12, b"x"),
    "big-bytes": field(2**29 - 1, b"gen_ai.system"),
}


@pytest.mark.parametrize("extra", ANY_VALUE_EXTRAS.values(), ids=ANY_VALUE_EXTRAS.keys())
def test_an_any_value_with_an_unknown_field_reads_as_without_it(extra: bytes) -> None:
    """Protobuf ignores what it does not know; the value stands."""
    out = ExportTraceServiceRequest.FromString(request())
    for entry in out.resource_spans[0].scope_spans[0].spans[0].attributes:
        entry.value.MergeFromString(extra)
    assert only(out.SerializeToString()) == only(request())


def test_a_value_given_as_a_string_index_reads_as_an_int_does() -> None:
    """OTLP 1.10's `AnyValue.string_value_strindex` (8) names nothing in a trace (no string
    table): text fields read it as an int is read (its digits), number fields reject the span."""
    out = ExportTraceServiceRequest.FromString(request())
    for entry in out.resource_spans[0].scope_spans[0].spans[0].attributes:
        if entry.key == attr.TENANT:
            entry.value.string_value_strindex = 5
        if entry.key == attr.GEN_AI_USAGE_INPUT_TOKENS:
            entry.value.MergeFromString(varint_field(8, 9))  # the last member set wins
    decoded = decode_spans(out.SerializeToString())
    assert decoded.usages == [] and [r.kind for r in decoded.rejected] == ["wrong_type"]
    del out.resource_spans[0].scope_spans[0].spans[0].attributes[3]  # input tokens
    assert only(out.SerializeToString()).tenant == "5"


def test_an_entry_whose_value_has_the_wrong_wire_type_is_an_attribute_without_value() -> None:
    """A value written as a varint is not an AnyValue: protobuf keeps the entry with an empty
    value, so the marker is there (the span counts) and the operation reads as the default."""
    entry = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + varint_field(2, 5)
    tenant = field(1, attr.TENANT.encode()) + field(2, field(1, b"acme"))
    span = field(1, bytes(16)) + field(2, bytes(8)) + field(9, entry) + field(9, tenant)
    usage = only(field(1, field(2, field(2, span))))
    assert (usage.operation, usage.tenant) == ("chat", "acme")


def test_otlp_json_with_key_strindex_counts_too() -> None:
    payload = request(extra=EXTRA_FIELDS["key_strindex"], on=[attr.GEN_AI_OPERATION_NAME, attr.TENANT])
    document = MessageToDict(ExportTraceServiceRequest.FromString(payload))
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    for name in ("traceId", "spanId"):  # OTLP JSON writes ids as hex
        span[name] = base64.b64decode(span[name]).hex()
    assert "keyStrindex" in json.dumps(span["attributes"])
    assert only(json.dumps(document).encode()) == only(request())
