"""The native check of whole messages (`Decoder.accepts`, contracts/native/src/valid.rs) against
upb, whose parse `decode_spans` skips where the check vouches for the message.

Vouching is one-sided: a message the check accepts, upb accepts (as `TraceRequestView`, with a
`resource_spans`, as `_parse_proto` requires); a message it is not sure of, upb parses as
before. Over valid requests of the whole schema (events, links, status, scope, entity refs,
AnyValue arrays and kvlists), the benchmark's messages, the decoding fuzz's requests and their
re-encodings, each mutated (truncations, flips, inserted and removed bytes), and targeted
hostile encodings (bad UTF-8 in each string field, wrong wire types of each known field,
unknown fields of each wire type, deep nesting, overlong tags, lengths and varints, groups),
`decode_spans` returns the same with and without the parse (`check`), and valid traffic
does not fall back to the parse. On each of them, alone and beside a GenAI span before or after
it, the check made inside the decoding walk (`checked_decode`) answers as `accepts` does.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts import otlp
from burnguard.contracts.otlp_view import PACKABLE, UTF8, TraceRequestView, wire_schema
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    EntityRef,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from tests.fixtures.decoders import required_native_decoder
from tests.support.byte_mutations import mutate
from tests.support.protowire import field, fixed32, fixed64, varint, varint_field
from tests.test_native_decode import (
    KNOWN_KEYS,
    SCALE,
    assert_walked_once,
    genai_request,
    outcome,
    padded_varint,
    reencoded,
    request,
)

#: The deepest submessage the check vouches for (valid.rs `MAX_DEPTH`; upb refuses past 100).
MAX_DEPTH = 64


#: A request of one GenAI span (more `resource_spans` when written after another request's).
GENAI = genai_request()


def upb_accepts(payload: bytes) -> bool:
    """What `_parse_proto` makes of the payload: a request with a `resource_spans`, or not."""
    try:
        return len(TraceRequestView.FromString(payload).resource_spans) > 0
    except DecodeError:
        return False


def check(payload: bytes) -> bool:
    """The check vouches only for what upb accepts, and decoding is the same with and without
    the parse. Returns whether the check vouched."""
    native = required_native_decoder()
    accepted = native.accepts(payload)
    if accepted:
        assert upb_accepts(payload), "the native check vouched for a message upb refuses"
    assert outcome(payload, native) == outcome(payload, None)
    assert assert_walked_once(payload) is accepted
    for beside in (payload + GENAI, GENAI + payload):  # the walk decodes a span before or after it
        assert_walked_once(beside)
    if currently_in_test_context():  # a hypothesis test: the share of each case
        event("accepted" if accepted else ("upb accepts, not vouched" if upb_accepts(payload) else "refused"))
    return accepted


texts = st.one_of(st.text(max_size=10), st.sampled_from(["", "chat", "acme", "é", "\u4e2d", "\U0001f600"]))
keys = st.one_of(st.sampled_from(KNOWN_KEYS), texts)
scalars = st.one_of(
    texts.map(lambda v: AnyValue(string_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: AnyValue(int_value=v)),
    st.floats().map(lambda v: AnyValue(double_value=v)),
    st.binary(max_size=6).map(lambda v: AnyValue(bytes_value=v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: AnyValue(string_value_strindex=v)),
    st.just(AnyValue()),
)
any_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda v: AnyValue(array_value=ArrayValue(values=v))),
        st.lists(st.tuples(keys, inner), max_size=3).map(
            lambda v: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=x) for k, x in v]))
        ),
    ),
    max_leaves=6,
)
key_values = st.lists(st.builds(KeyValue, key=keys, value=any_values), max_size=5)
uint32s, fixed64s, ids = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=16)
enums = st.integers(-(2**31), 2**31 - 1)  # open enums (proto3): any int32


@st.composite
def full_span(draw: st.DrawFn) -> Span:
    """A span with every field of the schema, its events, links and status."""
    span = Span(
        trace_id=draw(ids),
        span_id=draw(ids),
        trace_state=draw(texts),
        parent_span_id=draw(ids),
        flags=draw(uint32s),
        name=draw(texts),
        kind=draw(enums),
        start_time_unix_nano=draw(fixed64s),
        end_time_unix_nano=draw(fixed64s),
        attributes=draw(key_values),
        dropped_attributes_count=draw(uint32s),
        dropped_events_count=draw(uint32s),
        dropped_links_count=draw(uint32s),
    )
    if draw(st.booleans()):
        span.attributes.add(key=draw(st.sampled_from(KNOWN_KEYS)), value=AnyValue(string_value="chat"))
    for _ in range(draw(st.integers(0, 2))):
        span.events.add(
            time_unix_nano=draw(fixed64s),
            name=draw(texts),
            attributes=draw(key_values),
            dropped_attributes_count=draw(uint32s),
        )
    for _ in range(draw(st.integers(0, 2))):
        span.links.add(
            trace_id=draw(ids),
            span_id=draw(ids),
            trace_state=draw(texts),
            attributes=draw(key_values),
            dropped_attributes_count=draw(uint32s),
            flags=draw(uint32s),
        )
    if draw(st.booleans()):
        span.status.CopyFrom(Status(message=draw(texts), code=draw(enums)))
    return span


@st.composite
def full_request(draw: st.DrawFn) -> bytes:
    """A valid `ExportTraceServiceRequest` over the whole schema, as the official classes write it."""
    resources = []
    for _ in range(draw(st.integers(1, 3))):
        refs = [
            EntityRef(
                schema_url=draw(texts),
                type=draw(texts),
                id_keys=draw(st.lists(texts, max_size=2)),
                description_keys=draw(st.lists(texts, max_size=2)),
            )
            for _ in range(draw(st.integers(0, 2)))
        ]
        resource = Resource(
            attributes=draw(key_values), dropped_attributes_count=draw(uint32s), entity_refs=refs
        )
        scopes = [
            ScopeSpans(
                scope=InstrumentationScope(
                    name=draw(texts),
                    version=draw(texts),
                    attributes=draw(key_values),
                    dropped_attributes_count=draw(uint32s),
                ),
                spans=draw(st.lists(full_span(), max_size=3)),
                schema_url=draw(texts),
            )
            for _ in range(draw(st.integers(0, 2)))
        ]
        resources.append(ResourceSpans(resource=resource, scope_spans=scopes, schema_url=draw(texts)))
    return ExportTraceServiceRequest(resource_spans=resources).SerializeToString()


@settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(full_request())
def test_every_valid_request_of_the_whole_schema_is_vouched_for_and_decodes_alike(payload: bytes) -> None:
    """Valid traffic does not fall back to the parse: not one generated request."""
    assert check(payload)


#: Mutations checked per generated request. Generating a request and its re-encoding costs some
#: 90 ms of hypothesis draws, mutating it a tenth of that: 400 mutations of 100 requests take a
#: third of the time of 400 of 400 (the 300 s timeout was hit under load).
MUTATIONS_PER_REQUEST = 4


@settings(max_examples=int(100 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_requests_are_vouched_for_only_where_upb_accepts_them(data: st.DataObject) -> None:
    """Valid and re-encoded requests with bytes flipped, inserted, deleted or cut off."""
    valid = data.draw(st.one_of(full_request(), request()))
    payload = data.draw(st.just(valid) | reencoded(valid))
    for _ in range(MUTATIONS_PER_REQUEST):
        check(data.draw(mutated(payload)))


def mutated(payload: bytes) -> st.SearchStrategy[bytes]:
    @st.composite
    def edits(draw: st.DrawFn) -> bytes:
        return mutate(draw, payload, max_edits=3, max_inserted=6)

    return edits()


@settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(full_request(), request()).flatmap(reencoded))
def test_reencoded_requests_are_vouched_for_only_where_upb_accepts_them(payload: bytes) -> None:
    """Fields reordered, unknown fields (groups too), needless varint bytes, wrong wire types."""
    check(payload)


def message_paths() -> dict[int, list[int]]:
    """The field numbers from the request down to each message type of the schema (shortest)."""
    messages, _ = wire_schema()
    paths, queue = {0: []}, deque([0])
    while queue:
        index = queue.popleft()
        for number, sub in messages[index].items():
            if isinstance(sub, int) and sub not in paths:
                paths[sub] = [*paths[index], number]
                queue.append(sub)
    assert len(paths) == len(messages), "every message type is reachable from the request"
    return paths


def nested(path: list[int], content: bytes) -> bytes:
    """`content` as the fields of the message at `path`, inside a request that holds a
    `resource_spans` (the path's first step, or one added)."""
    for number in reversed(path):
        content = field(number, content)
    return content if path else content + field(1, b"")


def schema_fields() -> Iterator[tuple[list[int], int, str | int]]:
    messages, _ = wire_schema()
    for index, path in message_paths().items():
        for number, check_ in messages[index].items():
            yield path, number, check_


STRING_FIELDS = [(path, number) for path, number, check_ in schema_fields() if check_ == UTF8]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\x80"]


@pytest.mark.parametrize(("path", "number"), STRING_FIELDS, ids=lambda v: str(v))
def test_bad_utf8_in_each_string_field_is_left_to_upb(path: list[int], number: int) -> None:
    """Every string field of the schema (map keys included): UTF-8 is vouched for, anything
    else (a stray byte, a cut sequence, an overlong form, a surrogate, past U+10FFFF) is not,
    and upb refuses it; `decode_spans` raises its `MalformedSpans` as before."""
    native = required_native_decoder()
    good = nested(path, field(number, "é\U0001f600".encode()))
    assert native.accepts(good) and upb_accepts(good)
    for bad in BAD_UTF8:
        payload = nested(path, field(number, bad))
        assert not native.accepts(payload)
        assert not upb_accepts(payload)
        check(payload)


WIRE_VALUES = {0: varint(300), 1: bytes(8), 2: varint(1) + b"x", 5: bytes(4)}


@pytest.mark.parametrize(("path", "number", "expected"), list(schema_fields()), ids=lambda v: str(v))
def test_a_known_field_with_another_wire_type_is_an_unknown_field_to_both(
    path: list[int], number: int, expected: str | int
) -> None:
    """upb reads a known field with the wrong wire type as an unknown field (its bytes are not
    checked): vouched for, and decoded alike (the decoding walk falls back where it reads it)."""
    native = required_native_decoder()
    for wire, value in WIRE_VALUES.items():
        if wire == 2:
            continue  # the field's own wire type for strings and messages: the tests above
        payload = nested(path, varint(number << 3 | wire) + value)
        assert native.accepts(payload) and upb_accepts(payload)
        check(payload)


@pytest.mark.parametrize("path", list(message_paths().values()), ids=lambda v: str(v))
def test_unknown_fields_of_each_wire_type_in_each_message(path: list[int]) -> None:
    """Unknown numbers (the next free ones, the largest) of every wire type are skipped by both;
    a group (wire type 3, with its end) is for upb to judge."""
    native = required_native_decoder()
    for number in (17, 100, 2**29 - 1):
        for wire, value in WIRE_VALUES.items():
            payload = nested(path, varint(number << 3 | wire) + value)
            assert native.accepts(payload) and upb_accepts(payload)
            check(payload)
        group = varint(number << 3 | 3) + varint_field(1, 7) + varint(number << 3 | 4)
        assert not native.accepts(nested(path, group))
        check(nested(path, group))


def nested_arrays(depth: int) -> bytes:
    """A span attribute whose value is an array in an array ... `depth` messages below the request."""
    value = b""
    for _ in range(max(depth - 5, 0) // 2):  # AnyValue -> ArrayValue -> AnyValue ...
        value = field(5, field(1, value))
    entry = field(1, b"deep") + field(2, value)
    return field(1, field(2, field(2, field(9, entry))))


@pytest.mark.parametrize("depth", [6, 20, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 2, 99, 101, 102, 150])
def test_deep_nesting_is_vouched_for_only_below_the_checks_limit(depth: int) -> None:
    """upb refuses submessages nested past 100 levels; the check vouches only up to 64."""
    payload = nested_arrays(depth)
    assert check(payload) is (depth <= MAX_DEPTH)


@pytest.mark.parametrize(
    ("payload", "vouched", "upb"),
    [
        (field(1, b""), True, True),
        (padded_varint(1 << 3 | 2, 4) + varint(0), True, True),  # a 5-byte tag
        (padded_varint(1 << 3 | 2, 5) + varint(0), False, False),  # a 6-byte tag: upb refuses it
        (varint(1 << 3 | 2) + padded_varint(0, 4), True, True),  # a 5-byte length
        (varint(1 << 3 | 2) + padded_varint(0, 5), False, False),  # a 6-byte length: upb refuses it
        (field(1, b"") + varint_field(2**29 - 1, 1), True, True),  # the largest field number
        (field(1, b"") + varint(2**32) + varint(1), False, False),  # a tag past u32
        (field(1, b"") + varint(0 << 3) + varint(1), False, False),  # field number 0
        (field(1, b"") + varint_field(20, 2**64 - 1), True, True),  # a 10-byte varint
        (field(1, b"") + varint(20 << 3) + b"\xff" * 9 + b"\x01", True, True),
        (field(1, b"") + varint(20 << 3) + b"\xff" * 9 + b"\x02", False, True),  # past u64: upb drops bits
        (field(1, b"") + varint(20 << 3) + b"\xff" * 10 + b"\x00", False, False),  # an 11-byte varint
        (field(1, b"") + varint(20 << 3) + b"\xff" * 3, False, False),  # cut off
        (field(1, b"") + varint(20 << 3 | 3) + varint(20 << 3 | 4), False, True),  # a group: upb's
        (field(1, b"") + varint(20 << 3 | 4), False, False),  # an end of group outside a group
        (field(1, b"") + varint(20 << 3 | 6), False, False),
        (field(1, b"") + varint(20 << 3 | 7), False, False),
        (field(1, b"") + fixed64(20, 1)[:-1], False, False),
        (field(1, b"") + fixed32(20, 1)[:-1], False, False),
        (varint(1 << 3 | 2) + varint(5) + b"\x00", False, False),  # a length past the end
        (b"", False, False),  # empty: "empty message"
        (varint_field(20, 1), False, False),  # no resource_spans: `_parse_proto` refuses it
        (varint_field(1, 1), False, False),  # resource_spans as a varint: an unknown field, none held
        (fixed64(7, 1), False, False),
    ],
)
def test_tags_lengths_and_varints_as_upb_reads_them(payload: bytes, vouched: bool, upb: bool) -> None:
    """Where upb's reader (upb/wire/reader.c) refuses, the check does not vouch; needless bytes
    within upb's bounds (a tag or length of up to 5 bytes, a varint of up to 10) are vouched for.
    `upb`: what upb makes of it (so a change of upb's bounds shows here)."""
    assert upb_accepts(payload) is upb
    assert check(payload) is vouched


SHAPES = {
    "realistic": {},
    "plain-0.9": {"plain_fraction": 0.9},
    "small": {"batch_min": 10, "batch_max": 20},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_benchmark_load_skips_the_upb_parse_and_decodes_alike(shape: str) -> None:
    """The bench's messages (the three load shapes of BENCHMARKS.md): not one falls back to
    the parse, and each decodes as the reference does."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from span_load import SpanMix

    native = required_native_decoder()
    mix = SpanMix(tenants=20, users_per_tenant=10, calls_per_session=40, **SHAPES[shape])
    payloads = [mix.message()[1] for _ in range(40)]
    parses = mock.Mock(wraps=otlp._parse_proto)
    with mock.patch.object(otlp, "_native", native), mock.patch.object(otlp, "_parse_proto", parses):
        decoded = [otlp.decode_spans(payload) for payload in payloads]
    fell_back = parses.call_count
    assert fell_back == 0, f"{fell_back} of {len(payloads)} messages fell back to the upb parse"
    with mock.patch.object(otlp, "_native", None):
        assert decoded == [otlp.decode_spans(payload) for payload in payloads]
    assert sum(len(d.usages) for d in decoded) > 0


def test_a_message_the_check_does_not_vouch_for_is_parsed_by_upb_as_before() -> None:
    """A group anywhere: upb parses the message (and accepts it), and the native walk decodes it."""
    native = required_native_decoder()
    marker = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + field(2, field(1, b"chat"))
    group = varint(20 << 3 | 3) + varint(20 << 3 | 4)
    payload = field(1, field(2, field(2, field(9, marker))) + group)
    assert not native.accepts(payload) and upb_accepts(payload)
    parses = mock.Mock(wraps=otlp._parse_proto)
    with mock.patch.object(otlp, "_native", native), mock.patch.object(otlp, "_parse_proto", parses):
        assert len(otlp.decode_spans(payload).usages) == 1
    assert parses.call_count == 1


def test_a_repeated_scalar_written_packed_is_left_to_upb(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema has no repeated scalar today; one (`PACKABLE`) may come packed (wire type 2),
    whose content upb checks by rules the check does not copy: not vouched for. Written unpacked
    (its own wire type), it is. Span's `dropped_attributes_count` (10) stands in for one here."""
    real = required_native_decoder()
    messages, required = wire_schema()
    span = message_paths()
    (span_index,) = [index for index, checks in enumerate(messages) if checks.get(9) is not None]
    messages[span_index][10] = PACKABLE
    monkeypatch.setattr(otlp, "wire_schema", lambda: (messages, required))
    native = otlp.native_decoder()
    assert native is not None
    path = span[span_index]
    assert native.accepts(nested(path, varint_field(10, 3)))
    assert not native.accepts(nested(path, field(10, varint(3) + varint(4))))
    assert real.accepts(nested(path, field(10, varint(3))))  # a scalar of another wire type: unknown


@pytest.mark.parametrize(
    ("messages", "required"),
    [([], 1), ([{1: 5}], 1), ([{1: "text"}], 1), ([{1: 0}], 2), ([{1: "utf8"}], 1)],
    ids=["no-message", "no-such-message", "no-such-check", "required-not-there", "required-not-a-message"],
)
def test_a_schema_the_check_cannot_read_leaves_the_python_decoder_in_charge(
    messages: list[dict[int, Any]],
    required: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    required_native_decoder()
    monkeypatch.setattr(otlp, "wire_schema", lambda: (messages, required))
    assert otlp.native_decoder() is None
    assert "native OTLP decoder not used" in caplog.text


class CountingDecoder:
    """The real native decoder, counting its calls by name."""

    def __init__(self) -> None:
        self.real = required_native_decoder()
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.real, name)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_message_of_the_benchmark_load_is_walked_once(shape: str) -> None:
    """A message with a marker takes one native call (`checked_decode`), no parse; a message
    without one takes the check alone (`accepts`), as before."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from span_load import SpanMix

    mix = SpanMix(tenants=20, users_per_tenant=10, calls_per_session=40, **SHAPES[shape])
    for _ in range(20):
        payload = mix.message()[1]
        native = CountingDecoder()
        with mock.patch.object(otlp, "_native", native):
            decoded = otlp.decode_spans(payload)
        assert native.calls == (["accepts"] if otlp._without_markers(payload) else ["checked_decode"])
        with mock.patch.object(otlp, "_native", None):
            assert decoded == otlp.decode_spans(payload)


def test_a_schema_without_the_walks_path_checks_and_decodes_in_two_walks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A schema in which a message the decoding walk descends into is not a message field (here
    `Span.attributes`): the check cannot run inside the walk, so `checked_decode` checks
    (`accepts`) then decodes, and answers the same."""
    messages, required = wire_schema()
    (span_index,) = [index for index, checks in enumerate(messages) if checks.get(9) is not None]
    del messages[span_index][9]
    monkeypatch.setattr(otlp, "wire_schema", lambda: (messages, required))
    native = otlp.native_decoder()
    assert native is not None and not native.walks_once()
    ceilings = otlp.DEFAULT_LIMITS.ceilings()
    for payload in (GENAI, GENAI + b"\xff", b"", field(1, b"")):
        accepted, usages = native.checked_decode(payload, ceilings)
        assert accepted is native.accepts(payload)
        expected = native.decode(payload, ceilings) if accepted else None
        assert (usages is None) is (expected is None) and len(usages or []) == len(expected or [])


OPERATION = attr.GEN_AI_OPERATION_NAME.encode()


@pytest.mark.parametrize(
    ("keys", "vouched"),
    [
        ([OPERATION], True),
        ([b"\xff"], False),  # a key the walk's table lacks: checked
        ([b"\xff", OPERATION], False),  # a key a later one replaces, the later one in the table
        ([OPERATION, b"\xff"], False),
        ([b"http.method", OPERATION], True),
        ([OPERATION, "é".encode()], True),
    ],
    ids=["known", "bad", "bad-then-known", "known-then-bad", "unknown-then-known", "known-then-utf8"],
)
def test_every_key_of_an_attribute_entry_is_checked(keys: list[bytes], vouched: bool) -> None:
    """The walk checks an entry's key only where its table lacks it (a key there is UTF-8): each
    key of an entry, the last one (which counts) and any earlier one, beside a GenAI span."""
    native = required_native_decoder()
    entry = b"".join(field(1, key) for key in keys) + field(2, field(1, b"chat"))
    payload = field(1, field(2, field(2, field(9, entry) + field(9, field(1, OPERATION)))))
    assert native.accepts(payload) is vouched is upb_accepts(payload)
    assert check(payload) is vouched
    assert native.checked_decode(payload, otlp.DEFAULT_LIMITS.ceilings())[0] is vouched


@pytest.mark.parametrize("after", [b"", field(1, field(2, field(1, field(1, b"\xff"))))])
def test_a_walk_that_falls_back_leaves_the_check_to_accepts(after: bytes) -> None:
    """A span the walk cannot vouch for (its tenant past the key ceiling) ends the walk early:
    what it has not read yet (here a scope name, valid or not) is then checked by `accepts`."""
    native = required_native_decoder()
    marker = field(1, OPERATION) + field(2, field(1, b"chat"))
    tenant = field(1, attr.TENANT.encode()) + field(2, field(1, b"t" * 1000))
    payload = field(1, field(2, field(2, field(9, marker) + field(9, tenant)))) + after
    accepted = not after
    assert native.checked_decode(payload, otlp.DEFAULT_LIMITS.ceilings()) == (accepted, None)
    assert check(payload) is accepted
