"""Decoding `otlp_spans` messages (OTLP protobuf and OTLP/JSON) into SpanUsage records."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from burnguard.contracts.otlp import (
    OTLP_JSON,
    OTLP_PROTO,
    MalformedSpans,
    decode_spans,
    decode_usage,
    detect_format,
)
from burnguard.contracts.usage import SpanUsage
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

#: Every test here runs over both decoders (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("decode_impl")

FULL_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "anthropic",
    "gen_ai.request.model": "claude-opus-4-1",
    "gen_ai.response.model": "claude-opus-4-1-20250805",
    "gen_ai.response.id": "msg_01",
    "gen_ai.usage.input_tokens": 30_000,
    "gen_ai.usage.output_tokens": 1_500,
    "gen_ai.usage.cache_read.input_tokens": 20_000,
    "gen_ai.usage.cache_creation.input_tokens": 5_000,
    "gen_ai.usage.reasoning.output_tokens": 700,
    "gen_ai.tool.name": "web_search",
    "gen_ai.agent.name": "researcher",
    "gen_ai.conversation.id": "conv-9",
    "burnguard.tenant": "acme",
    "user.id": "u-42",
    "burnguard.workflow": "triage",
    "burnguard.feature": "summarize",
    "session.id": "sess-7",
    "burnguard.action": "click-summarize",
    "burnguard.cost.usd": 0.31125,
    "burnguard.model_class": "premium",
    "burnguard.downgraded_from": "claude-opus-4-1-big",
    "burnguard.tool_calls": 3,
    "error.type": "RateLimitError",
}


def finished_spans(*specs: dict[str, Any], service: str = "checkout-api") -> list[ReadableSpan]:
    """Run real SDK spans: each spec is {name, attributes, error?, child_of_previous?}."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for spec in specs:
        with tracer.start_as_current_span(spec.get("name", "span"), kind=SpanKind.CLIENT) as span:
            span.set_attributes(spec.get("attributes", {}))
            if spec.get("error"):
                span.set_status(Status(StatusCode.ERROR, "boom"))
            for child in spec.get("children", ()):
                with tracer.start_as_current_span(child.get("name", "child")) as inner:
                    inner.set_attributes(child.get("attributes", {}))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def proto_payload(spans: list[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def _ids_to_hex(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _ids_to_hex(value)
    elif isinstance(node, list):
        for item in node:
            _ids_to_hex(item)


def json_payload(spans: list[ReadableSpan]) -> bytes:
    """The request as OTLP/JSON: lowerCamelCase keys, integer enums, hex trace and span ids."""
    document = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    _ids_to_hex(document)
    return json.dumps(document).encode()


def test_every_field_lands() -> None:
    spans = finished_spans({"name": "chat claude-opus-4-1", "attributes": FULL_ATTRIBUTES, "error": True})
    (usage,) = decode_usage(proto_payload(spans))
    span = spans[0]
    assert usage.trace_id == f"{span.context.trace_id:032x}"
    assert usage.span_id == f"{span.context.span_id:016x}"
    assert usage.parent_span_id == ""
    assert usage.name == "chat claude-opus-4-1"
    assert (usage.start_ns, usage.end_ns) == (span.start_time, span.end_time)
    assert usage.operation == "chat"
    assert usage.provider == "anthropic"
    assert usage.request_model == "claude-opus-4-1"
    assert usage.response_model == "claude-opus-4-1-20250805"
    assert usage.model == "claude-opus-4-1-20250805"
    assert usage.service == "checkout-api"
    assert (usage.input_tokens, usage.output_tokens) == (30_000, 1_500)
    assert (usage.cache_read_tokens, usage.cache_creation_tokens) == (20_000, 5_000)
    assert usage.reasoning_tokens == 700
    assert usage.tool_calls == 3
    assert usage.tool_name == "web_search"
    assert usage.agent_name == "researcher"
    assert usage.conversation_id == "conv-9"
    assert (usage.tenant, usage.user, usage.workflow) == ("acme", "u-42", "triage")
    assert (usage.feature, usage.session, usage.action) == ("summarize", "sess-7", "click-summarize")
    assert usage.cost_usd == 0.31125
    assert usage.priced
    assert usage.model_class == "premium"
    assert usage.downgraded_from == "claude-opus-4-1-big"
    assert usage.error_type == "RateLimitError"
    assert usage.status_error is True


ROUTING_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4.1-mini",
    "burnguard.routed_from": "gpt-4.1",
    "burnguard.route": "routine",
    "burnguard.escalated_from": "gpt-4.1-nano",
    "burnguard.stakes": "low",
    "burnguard.fallback": True,
}


@pytest.mark.parametrize("encode", [proto_payload, json_payload], ids=["proto", "json"])
def test_routing_escalation_and_refusal_attributes_land(encode: Any) -> None:
    refused = {**ROUTING_ATTRIBUTES, "burnguard.refused": "step_cap", "burnguard.cost.usd": 0.0}
    spans = finished_spans({"attributes": ROUTING_ATTRIBUTES}, {"attributes": refused})
    made, refusal = decode_usage(encode(spans))
    assert (made.routed_from, made.route, made.escalated_from) == ("gpt-4.1", "routine", "gpt-4.1-nano")
    assert (made.stakes, made.fallback, made.refused) == ("low", True, "")
    assert made.is_model_call and not made.is_refused_call
    # A refused call is recorded, but it reached no model: no budget counts it as a call.
    assert refusal.refused == "step_cap"
    assert refusal.is_refused_call and not refusal.is_model_call


def test_defaults_for_a_minimal_genai_span() -> None:
    spans = finished_spans(
        {"attributes": {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4.1"}}
    )
    (usage,) = decode_usage(proto_payload(spans))
    assert usage.operation == "chat"  # the default operation of a span without one
    assert usage.cost_usd is None
    assert not usage.priced
    assert usage.status_error is False
    assert (usage.input_tokens, usage.output_tokens, usage.tenant, usage.error_type) == (0, 0, "", "")


def test_deprecated_spellings_are_accepted() -> None:
    spans = finished_spans(
        {
            "attributes": {
                "gen_ai.system": "openai",
                "gen_ai.request.model": "gpt-4.1-mini",
                "gen_ai.usage.prompt_tokens": 1000,
                "gen_ai.usage.completion_tokens": 200,
            }
        }
    )
    (usage,) = decode_usage(proto_payload(spans))
    assert usage.provider == "openai"
    assert (usage.input_tokens, usage.output_tokens) == (1000, 200)
    assert usage.is_model_call


def test_current_spelling_wins_over_deprecated() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "legacy",
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.prompt_tokens": 999,
    }
    (usage,) = decode_usage(proto_payload(finished_spans({"attributes": attributes})))
    assert usage.provider == "openai"
    assert usage.input_tokens == 10


def test_openllmetry_attribution() -> None:
    attributes = {
        "gen_ai.system": "openai",
        "llm.request.type": "chat",
        "gen_ai.request.model": "gpt-4.1",
        "traceloop.association.properties.tenant_id": "acme",
        "traceloop.association.properties.user_id": "u-1",
        "traceloop.association.properties.session_id": "s-1",
    }
    (usage,) = decode_usage(proto_payload(finished_spans({"attributes": attributes})))
    assert (usage.tenant, usage.user, usage.session) == ("acme", "u-1", "s-1")
    assert usage.operation == "chat"


def test_our_attribution_wins_over_openllmetry() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "burnguard.tenant": "acme",
        "traceloop.association.properties.tenant_id": "other",
    }
    (usage,) = decode_usage(proto_payload(finished_spans({"attributes": attributes})))
    assert usage.tenant == "acme"


def test_non_genai_spans_are_skipped() -> None:
    spans = finished_spans(
        {"name": "GET /checkout", "attributes": {"http.request.method": "GET", "burnguard.tenant": "acme"}},
        {
            "name": "chat gpt-4.1",
            "attributes": {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4.1"},
            "children": [{"name": "db", "attributes": {"db.system.name": "postgresql"}}],
        },
        {
            "name": "execute_tool search",
            "attributes": {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "s"},
        },
    )
    assert len(spans) == 4
    usages = decode_usage(proto_payload(spans))
    assert [u.name for u in usages] == ["chat gpt-4.1", "execute_tool search"]
    assert usages[1].is_tool_call and not usages[1].is_model_call


def test_parent_span_id_is_hex() -> None:
    spans = finished_spans(
        {
            "name": "invoke_agent a",
            "attributes": {"gen_ai.operation.name": "invoke_agent"},
            "children": [{"name": "chat x", "attributes": {"gen_ai.operation.name": "chat"}}],
        }
    )
    by_name = {u.name: u for u in decode_usage(proto_payload(spans))}
    assert by_name["chat x"].parent_span_id == by_name["invoke_agent a"].span_id
    assert by_name["chat x"].trace_id == by_name["invoke_agent a"].trace_id
    assert len(by_name["chat x"].parent_span_id) == 16


def test_otlp_json_decodes_identically() -> None:
    spans = finished_spans(
        {"name": "chat claude-opus-4-1", "attributes": FULL_ATTRIBUTES, "error": True},
        {
            "name": "invoke_agent a",
            "attributes": {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a"},
            "children": [
                {
                    "name": "chat gpt-4.1-mini",
                    "attributes": {
                        "gen_ai.system": "openai",
                        "gen_ai.usage.prompt_tokens": 11,
                        "traceloop.association.properties.tenant_id": "globex",
                    },
                }
            ],
        },
        {"name": "not genai", "attributes": {"http.route": "/x"}},
    )
    from_proto = decode_usage(proto_payload(spans))
    payload = json_payload(spans)
    assert detect_format(payload) == OTLP_JSON
    assert detect_format(b"  \n" + payload) == OTLP_JSON
    assert detect_format(proto_payload(spans)) == OTLP_PROTO
    from_json = decode_usage(payload)
    assert len(from_proto) == 3
    assert from_json == from_proto
    assert all(isinstance(u, SpanUsage) for u in from_json)
    assert (
        json.loads(payload)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
        == from_proto[0].trace_id
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe\x00\x13garbage bytes",
        b"hello world",
        b"{not json",
        b'{"resourceSpans": "x"}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
        b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # past json's recursion limit
        b'{"resourceSpans": [' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"]}",
    ],
)
def test_malformed_payloads_raise_with_a_reason(payload: bytes) -> None:
    with pytest.raises(MalformedSpans) as caught:
        decode_usage(payload)
    assert str(caught.value)


def test_empty_payload_reason() -> None:
    with pytest.raises(MalformedSpans, match="empty"):
        decode_usage(b"")


@pytest.mark.parametrize(
    "payload",
    [b'{"hello": "world"}', b'{"resourceMetrics": [{"scopeMetrics": []}]}', b'{"spans": [1, 2, 3]}', b"{}"],
)
def test_json_that_is_not_a_trace_request_raises(payload: bytes) -> None:
    # The protobuf path refuses a message without resource_spans; the JSON path must too,
    # or a misrouted JSON message (a metrics or log request, a signal) is silently accounted as nothing.
    with pytest.raises(MalformedSpans, match="resource"):
        decode_usage(payload)


def test_the_anthropic_sdk_spelling_of_cache_creation_is_accepted() -> None:
    from burnguard.contracts.otlp import decode_usage
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("chat claude-sonnet-4-5") as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-sonnet-4-5",
                "gen_ai.usage.input_tokens": 1500,
                "gen_ai.usage.cache_write.input_tokens": 1000,
            }
        )
    (usage,) = decode_usage(encode_spans(exporter.get_finished_spans()).SerializeToString())
    assert usage.cache_creation_tokens == 1000


@pytest.mark.parametrize(
    ("attribute", "value", "field", "expected"),
    [
        ("gen_ai.usage.input_tokens", 0, "input_tokens", 0),
        ("gen_ai.usage.input_tokens", 12.9, "input_tokens", 12),
        ("gen_ai.usage.input_tokens", "1200", "input_tokens", 1200),
        ("gen_ai.usage.input_tokens", "1.5e3", "input_tokens", 1500),
        ("burnguard.cost.usd", 0.0, "cost_usd", 0.0),  # priced at zero, not unpriced
        ("burnguard.cost.usd", 2, "cost_usd", 2.0),
        ("burnguard.cost.usd", 0, "cost_usd", 0.0),
        ("burnguard.cost.usd", "0.25", "cost_usd", 0.25),
        ("burnguard.tenant", 42, "tenant", "42"),
        ("burnguard.tenant", "", "tenant", ""),
        ("burnguard.fallback", "True ", "fallback", True),
        ("burnguard.fallback", 1, "fallback", True),
        ("burnguard.fallback", False, "fallback", False),
    ],
)
def test_attribute_values_of_other_types_are_converted(
    attribute: str, value: Any, field: str, expected: Any
) -> None:
    # A zero or empty value of the expected type reads like an unset oneof member: both ways must agree.
    attributes = {"gen_ai.operation.name": "chat", attribute: value}
    (usage,) = decode_usage(proto_payload(finished_spans({"attributes": attributes})))
    assert getattr(usage, field) == expected
    assert type(getattr(usage, field)) is type(expected)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("gen_ai.usage.input_tokens", "many"),
        ("gen_ai.usage.input_tokens", True),
        ("gen_ai.usage.output_tokens", [1, 2]),
        ("burnguard.cost.usd", "free"),
        ("burnguard.cost.usd", ["0.1"]),
    ],
)
def test_a_value_of_the_wrong_type_rejects_its_span_alone(attribute: str, value: Any) -> None:
    bad = {"gen_ai.operation.name": "chat", "burnguard.tenant": "acme", attribute: value}
    good = {"gen_ai.operation.name": "chat", "burnguard.tenant": "acme", "gen_ai.usage.input_tokens": 7}
    decoded = decode_spans(proto_payload(finished_spans({"attributes": bad}, {"attributes": good})))
    assert [usage.input_tokens for usage in decoded.usages] == [7]
    (rejected,) = decoded.rejected
    assert rejected.kind == "wrong_type" and rejected.reason.startswith(f"{attribute}: ")
    assert rejected.index == 0


def test_a_span_marked_as_a_duplicate_is_skipped_wherever_the_mark_is() -> None:
    first = {"burnguard.duplicate_of": "00f067aa0ba902b7", "gen_ai.operation.name": "chat"}
    last = {"gen_ai.operation.name": "chat", "burnguard.duplicate_of": "00f067aa0ba902b7"}
    spans = finished_spans(
        {"attributes": first}, {"attributes": last}, {"attributes": {"gen_ai.system": "x"}}
    )
    (usage,) = decode_usage(proto_payload(spans))
    assert (usage.provider, usage.operation) == ("x", "chat")


def _request_with_attributes(*pairs: tuple[str, str]) -> bytes:
    """One span whose attributes are `pairs` as written, in order, repeats included (no SDK in between)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    for key, value in pairs:
        kv = span.attributes.add()
        kv.key, kv.value.string_value = key, value
    return request.SerializeToString()


@pytest.mark.parametrize("reverse", [False, True], ids=["canonical-first", "canonical-last"])
def test_a_deprecated_spelling_fills_an_empty_canonical_value_in_any_order(reverse: bool) -> None:
    pairs = [("gen_ai.provider.name", ""), ("gen_ai.system", "openai"), ("gen_ai.operation.name", "chat")]
    (usage,) = decode_usage(_request_with_attributes(*(reversed(pairs) if reverse else pairs)))
    assert usage.provider == "openai"


@pytest.mark.parametrize("reverse", [False, True], ids=["as-listed", "reversed"])
def test_of_two_foreign_spellings_of_one_field_the_first_listed_wins_in_any_order(reverse: bool) -> None:
    pairs = [
        ("gen_ai.operation.name", "chat"),
        ("traceloop.association.properties.tenant", "acme"),
        ("traceloop.association.properties.tenant_id", "other"),
    ]
    (usage,) = decode_usage(_request_with_attributes(*(reversed(pairs) if reverse else pairs)))
    assert usage.tenant == "acme"


def test_a_repeated_attribute_key_keeps_its_last_value() -> None:
    # OTLP forbids repeated keys; a broken exporter's span still decodes, deterministically.
    pairs = [
        ("gen_ai.operation.name", "chat"),
        ("burnguard.tenant", "first"),
        ("gen_ai.system", "a"),
        ("burnguard.tenant", "last"),
        ("gen_ai.system", "b"),
    ]
    (usage,) = decode_usage(_request_with_attributes(*pairs))
    assert (usage.tenant, usage.provider) == ("last", "b")


def test_the_service_is_the_resource_service_name() -> None:
    spans = finished_spans({"attributes": {"gen_ai.operation.name": "chat"}}, service="billing")
    (usage,) = decode_usage(proto_payload(spans))
    assert usage.service == "billing"
    (usage,) = decode_usage(_request_with_attributes(("gen_ai.operation.name", "chat")))
    assert usage.service == ""  # a request without a resource


def test_invalid_utf8_anywhere_in_the_request_is_malformed() -> None:
    # The decoder reads attributes through a view of the request with map-typed attributes; it
    # must refuse what the official message class refuses, also in fields it never reads.
    spans = finished_spans(
        {"name": "chat", "attributes": {"gen_ai.operation.name": "chat", "x.unread": "zzzz"}}
    )
    payload = proto_payload(spans)
    for text in (b"zzzz", b"checkout-api", b"chat"):
        broken = payload.replace(text, b"\xff" + text[1:], 1)
        with pytest.raises(MalformedSpans, match="protobuf"):
            decode_usage(broken)


def test_a_protobuf_request_that_starts_like_json_is_decoded() -> None:
    # 0x0A (the tag of resource_spans) is a newline and a length of 123 is written as "{":
    # such a request was taken for JSON and dead-lettered.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    kv = span.attributes.add()
    kv.key, kv.value.string_value = "gen_ai.operation.name", "chat"
    span.name = "x" * (123 - request.resource_spans[0].ByteSize() - 2)  # 2: the name's tag and length
    payload = request.SerializeToString()
    assert payload[:2] == b"\n{"
    assert detect_format(payload) == OTLP_JSON
    (usage,) = decode_usage(payload)
    assert usage.name == span.name


@pytest.mark.parametrize("payload", [b"\n{not json", b'\n{"hello": "world"}', b"\n{\n\x12\x00"])
def test_json_with_a_leading_newline_that_is_neither_json_nor_protobuf_reports_the_json_error(
    payload: bytes,
) -> None:
    with pytest.raises(MalformedSpans, match="JSON"):
        decode_usage(payload)


def test_a_message_without_genai_spans_decodes_to_nothing_and_is_still_checked_whole() -> None:
    # Such a message is not walked span by span (no marker key in its bytes), but it must be the
    # same: no usages, no rejections, and refused when the official message class refuses it.
    plain = {"name": "GET /health", "attributes": {"http.request.method": "GET", "gen_ai_like": "x"}}
    payload = proto_payload(finished_spans(plain, plain))
    assert b"gen_ai." not in payload
    decoded = decode_spans(payload)
    assert decoded.usages == [] and decoded.rejected == []
    with pytest.raises(MalformedSpans, match="protobuf"):
        decode_spans(payload.replace(b"GET /health", b"\xffET /health", 1))
    # one GenAI span among them is found as before, and a bad one is still rejected alone
    mixed = proto_payload(
        finished_spans(plain, {"attributes": {"gen_ai.system": "openai", "gen_ai.usage.input_tokens": -1}})
    )
    decoded = decode_spans(mixed)
    assert [(r.index, r.kind) for r in decoded.rejected] == [(1, "negative")] and decoded.usages == []


@pytest.mark.parametrize("length", range(12))
def test_the_format_is_guessed_from_the_first_byte_past_whitespace_as_lstrip_finds_it(length: int) -> None:
    """`detect_format` looks at a few bytes instead of stripping a copy: the same guess for every
    start of whitespace (each ASCII one, and bytes that are not whitespace) before `{`, 0x0A or else."""
    alphabet = b" \t\n\r\x0b\x0c\x1c\x85\xa0{\x00"
    for start in itertools.product(alphabet, repeat=min(length, 3)):
        head = bytes(start) + b" " * max(length - 3, 0)
        for tail in (b"", b"{", b"\n\x05", b"\x0a{", b"x"):
            payload = head + tail
            expected = OTLP_JSON if payload.lstrip()[:1] == b"{" else OTLP_PROTO
            assert detect_format(payload) == expected, payload
            assert detect_format(bytearray(payload)) == expected, payload
