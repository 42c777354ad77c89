"""The native decoder (contracts/native) against the reference: the same outcome for every input.

`decode_spans` with the native fast path must return exactly what the pure-Python path returns
(`SpanUsage`s equal field by field, types included; the same rejections; the same
`MalformedSpans` reason) over generated OTLP requests written at the wire level (attributes of
every value type, repeated keys, merged values and statuses, deprecated and foreign spellings,
resource attribution, many resources and scopes), over the same bytes mutated or cut off, and
over the same requests written as another encoder may (fields reordered, unknown fields and
groups, needless varint bytes, a wrong wire type). Attribute entries and their values carry
fields their schema does not hold (`key_strindex`, unknown numbers, every wire type) on markers,
tenant, cost, tokens and resource attributes alike: protobuf reads them as without. On the same
inputs, the one walk that checks and decodes (`Decoder.checked_decode`, what `decode_spans` calls
for a message with a marker) answers what the check (`accepts`) then the walk (`decode`) answer
(`assert_walked_once`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import subprocess
import sys
from typing import Any
from unittest import mock

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts import otlp
from burnguard.contracts.otlp import MalformedSpans, decode_spans
from burnguard.contracts.span_checks import DEFAULT_LIMITS, SpanLimits
from burnguard.contracts.usage import SpanUsage
from burnguard.stream.partitioner import native_module
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from tests.fixtures.decoders import required_native_decoder
from tests.support.byte_mutations import mutate
from tests.support.protowire import field, fixed32, fixed64, varint, varint_field

#: BURNGUARD_DIFFERENTIAL_SCALE=20: the fuzz tests run 20 times their examples (a stress run,
#: with `--timeout=0`: it outlasts the per-test timeout).
SCALE = float(os.environ.get("BURNGUARD_DIFFERENTIAL_SCALE", "1"))
#: The limits `decode_spans` applies by default, whose ceilings the native walk is handed.
MAX = DEFAULT_LIMITS
#: Every key the decoder knows (fields in all spellings, markers, the duplicate mark, service.name).
KNOWN_KEYS = sorted(
    {*otlp._SLOTS, attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME, attr.GEN_AI_SYSTEM}
    | {attr.DUPLICATE_OF, attr.SERVICE_NAME}
)
MARKERS = [attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_PROVIDER_NAME, attr.GEN_AI_SYSTEM]


texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "chat", "acme", "12", "-5", "2.5", "nan", "inf", " 7 ", "true", "TRUE", "1", "0"]),
    st.text(max_size=300),
)
any_values = st.one_of(
    texts.map(lambda v: AnyValue(string_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([0, 1, -1, 10**8, 10**8 + 1, 2**63 - 1]),
    ).map(lambda v: AnyValue(int_value=v)),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.5, 2.0**63, 1e20, 5e-324, math.nan, 9999.5]),
    ).map(lambda v: AnyValue(double_value=v)),
    st.binary(max_size=6).map(lambda v: AnyValue(bytes_value=v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: AnyValue(string_value_strindex=v)),
    st.just(AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")]))),
    st.just(AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k")]))),
    st.just(AnyValue()),
)
#: A field a message may carry that its schema does not hold, of every wire type: for a
#: `KeyValue` OTLP 1.10's `key_strindex` (3), the next numbers and the largest; for an AnyValue
#: (its own are 1-8) numbers from 9 up.
entry_extra_numbers = st.sampled_from([3, 3, 4, 5, 15, 16, 2047, 2**29 - 1])
value_extra_numbers = st.sampled_from([9, 10, 100, 2**29 - 1])


def extra_fields(numbers: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(varint_field, numbers, st.integers(0, 2**64 - 1)),
        st.builds(fixed64, numbers, st.integers(0, 2**64 - 1)),
        st.builds(fixed32, numbers, st.integers(0, 2**32 - 1)),
        st.builds(field, numbers, st.binary(max_size=6)),
    )


@st.composite
def with_extras(draw: st.DrawFn, parts: list[bytes], numbers: st.SearchStrategy[int]) -> bytes:
    """The fields `parts` of one message, sometimes with 1-2 extra fields among them (protobuf
    ignores them: the message reads as without)."""
    parts = list(parts)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        parts.insert(draw(st.integers(0, len(parts))), draw(extra_fields(numbers)))
    return b"".join(parts)


@st.composite
def any_value_bytes(draw: st.DrawFn) -> bytes:
    """An AnyValue as bytes: usually one, sometimes two written back to back (protobuf merges
    them), sometimes with fields AnyValue does not hold."""
    values = [draw(any_values).SerializeToString() for _ in range(draw(st.sampled_from([1, 1, 1, 2])))]
    return (
        draw(with_extras(values, value_extra_numbers)) if draw(st.integers(0, 5)) == 0 else b"".join(values)
    )


keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(["http.method", "gen_ai"]), st.text(max_size=6))
#: Values of the kinds a field's reader takes (by `otlp._STR` ...): what real spans send.
fitting = {
    otlp._STR: st.one_of(
        st.text(max_size=12).map(lambda v: AnyValue(string_value=v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: AnyValue(int_value=v)),
        st.booleans().map(lambda v: AnyValue(bool_value=v)),
        st.just(AnyValue()),
    ),
    otlp._INT: st.one_of(
        st.integers(0, 10**8).map(lambda v: AnyValue(int_value=v)),
        st.floats(-0.99, 1e8).map(lambda v: AnyValue(double_value=v)),
        st.just(AnyValue()),
    ),
    otlp._FLOAT: st.one_of(
        st.floats(0, 1e4).map(lambda v: AnyValue(double_value=v)),
        st.integers(0, 10**4).map(lambda v: AnyValue(int_value=v)),
        st.just(AnyValue()),
    ),
    otlp._BOOL: st.one_of(
        st.booleans().map(lambda v: AnyValue(bool_value=v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: AnyValue(int_value=v)),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda v: AnyValue(double_value=v)),
        st.just(AnyValue()),
        st.just(AnyValue(array_value=ArrayValue())),
    ),
}


@st.composite
def attribute(draw: st.DrawFn, key: st.SearchStrategy[str] = keys, tame: bool = False) -> bytes:
    """One `KeyValue`: sometimes without its value, its key, with its value twice, or with
    fields besides key and value (`key_strindex`, unknown ones: the same attribute).

    `tame`: the value is of a kind its field reads (the native walk's simple case), written once.
    """
    name = draw(key)
    if tame:
        slot = otlp._SLOTS.get(name)
        value = draw(fitting[slot[1]] if slot else any_values)
        return draw(
            with_extras([field(1, name.encode()), field(2, value.SerializeToString())], entry_extra_numbers)
        )
    parts = [field(1, name.encode())] if draw(st.integers(0, 15)) else []
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 1, 1, 0, 2]))):
        parts.append(field(2, draw(any_value_bytes())))
    return draw(with_extras(parts, entry_extra_numbers))


@st.composite
def span(draw: st.DrawFn, tame: bool) -> bytes:
    ids = st.sampled_from([b"", b"\x00" * 8, bytes(range(16)), b"\xab\xcd"])
    out = field(1, draw(ids)) + field(2, draw(ids))
    if draw(st.booleans()):
        out += field(4, draw(ids))
    out += field(5, draw(st.text(max_size=8)).encode())
    out += fixed64(7, draw(st.integers(0, 2**64 - 1))) + fixed64(8, draw(st.integers(0, 2**64 - 1)))
    attributes = draw(st.lists(attribute(tame=tame), max_size=10))
    if draw(st.integers(0, 4)):  # most spans are GenAI spans
        marker = attribute(st.sampled_from(MARKERS), tame=tame)
        attributes.insert(draw(st.integers(0, len(attributes))), draw(marker))
    out += b"".join(field(9, entry) for entry in attributes)
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.sampled_from([0, 1, 2, 3, 2**32 + 2, 2**64 - 1]))
        out += field(15, field(2, b"boom") + varint_field(3, code) if draw(st.integers(0, 5)) else b"")
    return out


@st.composite
def request(draw: st.DrawFn) -> bytes:
    """An `ExportTraceServiceRequest` written field by field: 1-3 resources of 0-2 scopes each.

    Half are tame (values of the kinds their fields read): mostly the native walk's simple case.
    """
    out, tame = b"", draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        resource = b"".join(field(1, entry) for entry in draw(st.lists(attribute(tame=tame), max_size=6)))
        resource_spans = field(1, resource) if draw(st.integers(0, 5)) else b""
        for _ in range(draw(st.integers(0, 2))):
            spans = draw(st.lists(span(tame), max_size=4))
            resource_spans += field(2, field(1, field(1, b"scope")) + b"".join(field(2, s) for s in spans))
        if draw(st.integers(0, 20)) == 0:  # a second resource: protobuf merges the two
            resource_spans += field(1, field(1, field(1, attr.TENANT.encode()) + field(2, field(1, b"t2"))))
        out += field(1, resource_spans)
    return out


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated request with bytes flipped, inserted, deleted or cut off."""
    return mutate(draw, draw(request()), max_edits=3, max_inserted=6)


#: The sub-messages of each message the walk reads, by field number (the rest are scalars):
#: request, ResourceSpans, Resource, ScopeSpans, InstrumentationScope, Span, KeyValue, AnyValue,
#: ArrayValue, KeyValueList.
SCHEMA: dict[str, dict[int, str]] = {
    "request": {1: "resource_spans"},
    "resource_spans": {1: "resource", 2: "scope_spans"},
    "resource": {1: "key_value"},
    "scope_spans": {1: "scope", 2: "span"},
    "scope": {3: "key_value"},
    "span": {9: "key_value", 15: "status"},
    "status": {},
    "key_value": {2: "any_value"},
    "any_value": {5: "array", 6: "kvlist"},
    "array": {1: "any_value"},
    "kvlist": {1: "key_value"},
}


def wire_fields(message: bytes) -> list[tuple[int, int, Any]] | None:
    """(number, wire type, value) of each field, value an int or bytes; None: not a message."""
    out, at = [], 0
    try:
        while at < len(message):
            tag, at = read_varint(message, at)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                value, at = read_varint(message, at)
            elif wire in (1, 5):
                width = 8 if wire == 1 else 4
                value, at = message[at : at + width], at + width
            elif wire == 2:
                length, at = read_varint(message, at)
                value, at = message[at : at + length], at + length
            else:
                return None
            if at > len(message) or number == 0:
                return None
            out.append((number, wire, value))
    except IndexError:
        return None
    return out


def read_varint(message: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = message[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if not byte & 0x80:
            return value, at


def padded_varint(number: int, padding: int) -> bytes:
    """`number` as a varint with `padding` needless bytes (0x80 ... 0x00): the same value."""
    if not padding:
        return varint(number)
    out = bytearray(varint(number))
    out[-1] |= 0x80
    return bytes(out) + b"\x80" * (padding - 1) + b"\x00"


#: Fields no message the walk reads has: skipped by both (a group too, where the walk falls back).
unknown_fields = st.one_of(
    st.tuples(st.integers(16, 40), st.just(0), st.integers(0, 2**64 - 1)),
    st.tuples(st.integers(16, 40), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(16, 40), st.just(5), st.binary(min_size=4, max_size=4)),
    st.tuples(st.integers(16, 40), st.just(2), st.binary(max_size=4)),
)
#: A group (wire types 3 and 4), which the walk leaves to the reference: rarely, or few walk.
unknown_group = st.tuples(st.integers(16, 40), st.just(3), st.just(b""))


@st.composite
def reencoded(draw: st.DrawFn, message: bytes, kind: str = "request") -> bytes:
    """`message` written again as another encoder (or a hostile one) may: fields in another
    order, unknown fields of every wire type (groups included) between them, tags, lengths and
    varints with needless bytes, a known field given a wrong wire type."""
    parsed = wire_fields(message)
    if parsed is None:
        return message
    fields_ = list(parsed)
    if draw(st.integers(0, 3)) == 0:
        fields_ = draw(st.permutations(fields_))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))):
        noise = unknown_group if draw(st.integers(0, 30)) == 0 else unknown_fields
        fields_.insert(draw(st.integers(0, len(fields_))), draw(noise))
    if fields_ and draw(st.integers(0, 40)) == 0:  # a known field with another wire type
        at = draw(st.integers(0, len(fields_) - 1))
        fields_[at] = (fields_[at][0], draw(st.sampled_from([0, 1, 2, 5])), fields_[at][2])
    padding = st.sampled_from([0] * 15 + [1, 2])
    out = b""
    for number, wire, value in fields_:
        tag = padded_varint(number << 3 | wire, draw(padding))
        sub = SCHEMA[kind].get(number)
        if wire == 0:
            number_value = value if isinstance(value, int) else int.from_bytes(value[:8] or b"\0", "little")
            out += tag + padded_varint(number_value, draw(padding))
        elif wire == 1:
            out += tag + (value if isinstance(value, bytes) else value.to_bytes(8, "little"))[:8].ljust(
                8, b"\0"
            )
        elif wire == 5:
            out += tag + (value if isinstance(value, bytes) else value.to_bytes(8, "little"))[:4].ljust(
                4, b"\0"
            )
        elif wire == 3:
            out += tag + varint_field(number + 1, 7) + padded_varint(number << 3 | 4, 0)
        else:
            data = value if isinstance(value, bytes) else varint(value)
            if sub is not None and isinstance(value, bytes):
                data = draw(reencoded(data, sub))
            out += tag + padded_varint(len(data), draw(padding)) + data
    return out


def outcome(payload: bytes, decoder: Any) -> tuple[Any, ...]:
    """What `decode_spans` makes of the payload with `decoder` (None: the reference), typed.

    Values compare by type and `repr`, so `-0.0` is not `0.0` and `1` is not `1.0` or `True`.
    """
    with mock.patch.object(otlp, "_native", decoder):
        try:
            decoded = decode_spans(payload)
        except MalformedSpans as exc:
            return ("malformed", str(exc))
    usages = [
        [(name, type(value), repr(value)) for name, value in vars_of(usage)] for usage in decoded.usages
    ]
    return ("decoded", usages, decoded.rejected)


def vars_of(usage: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(usage, name)) for name in usage.__dataclass_fields__]


def typed(usages: list[Any] | None) -> list[list[tuple[str, type, str]]] | None:
    """Usages (or None) compared by type and `repr` of each field, as `outcome` compares them."""
    if usages is None:
        return None
    return [[(name, type(value), repr(value)) for name, value in vars_of(usage)] for usage in usages]


def assert_walked_once(payload: bytes, ceilings: tuple[float, int, int] = MAX.ceilings()) -> bool:
    """The one walk (`checked_decode`) answers what `accepts` then `decode` answer: whether the
    check vouches for the message, and where it does, the walk's usages (None: fall back);
    where it does not, None (upb parses first). Returns whether it vouched."""
    native = required_native_decoder()
    assert native.walks_once(), "the schema holds the walk's path: the check runs inside the walk"
    accepted, usages = native.checked_decode(payload, ceilings)
    assert accepted is native.accepts(payload)
    assert typed(usages) == typed(native.decode(payload, ceilings) if accepted else None)
    return accepted


def assert_same(payload: bytes) -> None:
    native = required_native_decoder()
    expected = outcome(payload, None)
    assert outcome(payload, native) == expected
    assert_walked_once(payload)
    if expected[0] == "decoded":
        event("native walk" if native.decode(payload, MAX.ceilings()) is not None else "fell back")


@settings(max_examples=int(500 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request())
def test_native_decoding_equals_the_reference(payload: bytes) -> None:
    assert_same(payload)


@settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_native_decoding_of_mutated_bytes_equals_the_reference(payload: bytes) -> None:
    assert_same(payload)


@settings(max_examples=int(100 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request().flatmap(reencoded))
def test_native_decoding_of_reencoded_requests_equals_the_reference(payload: bytes) -> None:
    """The same requests as another encoder writes them: order, unknown fields, needless bytes."""
    assert_same(payload)


def test_the_synthetic_load_takes_the_native_walk_and_decodes_alike() -> None:
    """The common case is not a fallback: every message of the benchmark load decodes natively."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from span_load import SpanMix

    native = required_native_decoder()
    mix = SpanMix(plain_fraction=0.2)
    for _ in range(20):
        payload = mix.message()[1]
        assert native.decode(payload, MAX.ceilings()) is not None
        assert outcome(payload, native) == outcome(payload, None)
        assert assert_walked_once(payload)


def double(number: float) -> bytes:
    return fixed64(4, int.from_bytes(struct.pack("<d", number), "little"))


def count(number: int) -> bytes:
    return varint_field(3, number % 2**64)  # an int64 as protobuf writes it


@pytest.mark.parametrize(
    ("key", "value", "vouched"),
    [
        (attr.COST_USD, double(math.nan), False),
        (attr.COST_USD, double(-1e-9), False),
        (attr.COST_USD, double(-0.0), True),
        (attr.COST_USD, double(MAX.max_cost_usd), True),
        (attr.COST_USD, double(math.nextafter(MAX.max_cost_usd, math.inf)), False),
        (attr.GEN_AI_USAGE_INPUT_TOKENS, count(MAX.max_tokens), True),
        (attr.GEN_AI_USAGE_INPUT_TOKENS, count(MAX.max_tokens + 1), False),
        (attr.TOOL_CALLS, count(-1), False),
        (attr.TENANT, field(1, b"t" * MAX.max_key_chars), True),
        (attr.TENANT, field(1, b"t" * (MAX.max_key_chars + 1)), False),
        (attr.TENANT, field(1, "\u00e9".encode() * MAX.max_key_chars), True),  # twice as many bytes
        (attr.TENANT, field(1, "\u00e9".encode() * (MAX.max_key_chars + 1)), False),
    ],
    ids=[
        "cost-nan",
        "cost-negative",
        "cost-minus-zero",
        "cost-at-ceiling",
        "cost-past-ceiling",
        "tokens-at-ceiling",
        "tokens-past-ceiling",
        "tool-calls-negative",
        "tenant-at-ceiling",
        "tenant-past-ceiling",
        "tenant-2-byte-chars-at-ceiling",
        "tenant-2-byte-chars-past-ceiling",
    ],
)
def test_the_walk_vouches_for_a_span_exactly_when_span_problem_passes_it(
    key: str, value: bytes, vouched: bool
) -> None:
    """At and just past each ceiling: the walk returns the span when `span_problem` would pass
    it, and falls back when it would not, so the reference rejects it with its reason."""
    native = required_native_decoder()
    marker = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + field(2, field(1, b"chat"))
    checked = field(1, key.encode()) + field(2, value)
    payload = field(1, field(2, field(2, field(9, marker) + field(9, checked))))
    assert (native.decode(payload, MAX.ceilings()) is not None) is vouched
    assert assert_walked_once(payload)
    kind, usages, rejected = outcome(payload, native)
    assert kind == "decoded" and (len(usages), len(rejected)) == ((1, 0) if vouched else (0, 1))
    assert outcome(payload, native) == outcome(payload, None)


def test_the_walk_takes_the_ceilings_of_each_call() -> None:
    """The limits of `decode_spans` (`SpanLimits.from_env`), not the defaults; a ceiling past an
    int64 is handed in as the int64 bound."""
    native = required_native_decoder()
    payload = genai_request()  # tenant "acme"
    assert native.decode(payload, SpanLimits(max_key_chars=3).ceilings()) is None
    assert native.decode(payload, SpanLimits(max_tokens=10**30, max_key_chars=10**30).ceilings())
    assert native.checked_decode(payload, SpanLimits(max_key_chars=3).ceilings()) == (True, None)
    for limits in (SpanLimits(max_key_chars=3), SpanLimits(max_tokens=10**30, max_key_chars=10**30)):
        assert_walked_once(payload, limits.ceilings())
    with mock.patch.object(otlp, "_native", native):
        rejected = decode_spans(payload, SpanLimits(max_key_chars=3)).rejected
    assert [r.kind for r in rejected] == ["too_long"]


@pytest.mark.parametrize(("setting", "native"), [("0", False), ("1", True)])
def test_burnguard_native_switches_the_native_path(setting: str, native: bool) -> None:
    required_native_decoder()
    # set after the import (as a warm test worker gets its environment): the first decode decides
    code = (
        "import os, sys; from burnguard.contracts import otlp; os.environ['BURNGUARD_NATIVE'] = sys.argv[1];"
        " print(otlp.native_in_use() is not None)"
    )
    env = {**os.environ, "BURNGUARD_NATIVE": "1" if setting == "0" else "0"}
    result = subprocess.run(
        [sys.executable, "-c", code, setting], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == str(native)


def test_rules_the_native_walk_cannot_apply_leave_the_python_decoder_in_charge(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two canonical spellings of one field would make attribute order matter: the native
    decoder refuses such a table, and `native_decoder` leaves decoding to the reference."""
    required_native_decoder()
    index = otlp._INDEX["tenant"]
    monkeypatch.setitem(otlp._SLOTS, "another.tenant", (index, otlp._STR, None))
    assert otlp.native_decoder() is None
    assert "native OTLP decoder not used" in caplog.text


def span_usage_copy(*more: tuple[str, type, Any], **namespace: Any) -> type:
    """A class with `SpanUsage`'s fields, defaults and slots, the fields `more` and `namespace` added."""
    copied = [
        (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(SpanUsage)
    ]
    return dataclasses.make_dataclass("SpanUsageCopy", [*copied, *more], slots=True, namespace=namespace)


class SpanUsageSubclass(SpanUsage):
    __slots__ = ()


@pytest.mark.parametrize(
    "usage_class",
    [
        span_usage_copy(__post_init__=lambda self: None),
        span_usage_copy(__new__=lambda cls, *args, **kwargs: object.__new__(cls)),
        SpanUsageSubclass,
        span_usage_copy(("spare", str, dataclasses.field(default=""))),
    ],
    ids=["post_init", "own_new", "subclass", "slot_no_field_names"],
)
def test_a_usage_class_the_walk_cannot_make_as_its_init_would_leaves_the_python_decoder_in_charge(
    usage_class: type, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The walk makes each `SpanUsage` without `__init__` (allocated, every slot set): a class
    whose construction does more than that is refused, not made differently."""
    required_native_decoder()
    assert otlp.native_decoder() is not None
    monkeypatch.setattr(otlp, "SpanUsage", usage_class)
    assert otlp.native_decoder() is None
    assert "native OTLP decoder not used" in caplog.text


def test_the_walk_makes_span_usages_each_with_its_own_extra_dict() -> None:
    """As `SpanUsage(...)` does: `extra` is a new dict per span (the worker writes to it when it
    moves a span's clock), and the objects are `SpanUsage`s equal to the reference's."""
    native = required_native_decoder()
    operation = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + field(2, field(1, b"chat"))
    span = field(1, bytes(16)) + field(9, operation)
    payload = field(1, field(2, field(2, span) + field(2, span)))
    usages = native.decode(payload, MAX.ceilings())
    assert [type(usage) for usage in usages] == [SpanUsage, SpanUsage]
    assert usages[0].extra == {} and usages[0].extra is not usages[1].extra
    with mock.patch.object(otlp, "_native", None):
        assert usages == decode_spans(payload).usages


def genai_request() -> bytes:
    """One resource with a tenant, one GenAI span: the native walk's simple case."""
    tenant = field(1, attr.TENANT.encode()) + field(2, field(1, b"acme"))
    operation = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + field(2, field(1, b"chat"))
    span = field(1, bytes(16)) + field(2, bytes(8)) + field(5, b"call") + field(9, operation)
    return field(1, field(1, field(1, tenant)) + field(2, field(2, span)))


@pytest.mark.parametrize("where", ["span", "resource"])
def test_an_attribute_with_an_unknown_field_counts_in_both_and_the_walk_does_not_fall_back(
    where: str,
) -> None:
    """A `KeyValue` with a field besides key and value (OTLP 1.10's `key_strindex`, field 3) is
    the same attribute for protobuf. The view's map lost it (upb keeps such a map entry as an
    unknown field of the span or resource); the reference now reads it from the official parse,
    and the native walk reads it without falling back."""
    native = required_native_decoder()
    strindex = varint_field(3, 0)
    marker = field(1, attr.GEN_AI_SYSTEM.encode()) + field(2, field(1, b"openai")) + strindex
    operation = field(1, attr.GEN_AI_OPERATION_NAME.encode()) + field(2, field(1, b"chat"))
    service = field(1, attr.SERVICE_NAME.encode()) + strindex + field(2, field(1, b"svc"))
    if where == "span":
        payload = field(1, field(2, field(2, field(1, bytes(16)) + field(9, marker))))
    else:
        payload = field(1, field(1, field(1, service)) + field(2, field(2, field(9, operation))))
    expected = outcome(payload, None)
    assert expected[0] == "decoded" and len(expected[1]) == 1
    if where == "span":
        assert ("provider", str, "'openai'") in expected[1][0]
    else:
        assert ("service", str, "'svc'") in expected[1][0]
    assert native.decode(payload, MAX.ceilings()) is not None
    assert assert_walked_once(payload)
    assert outcome(payload, native) == expected


class PanickingDecoder:
    """A native decoder whose `call` (the check of the whole message, the walk, or both in one
    walk) panics: PyO3 raises the panic as its `PanicException`; the other calls answer as the
    real ones."""

    def __init__(self, call: str) -> None:
        self.call = call
        self.real = required_native_decoder()

    def _panic(self) -> None:
        from burnguard.contracts import _otlp_native  # type: ignore[attr-defined]

        raise _otlp_native.PanicException("index out of bounds: the len is 3 but the index is 7")

    def accepts(self, payload: bytes) -> bool:
        if self.call == "accepts":
            self._panic()
        return self.real.accepts(payload)

    def decode(self, payload: bytes, ceilings: tuple[float, int, int]) -> Any:
        if self.call == "decode":
            self._panic()
        return self.real.decode(payload, ceilings)

    def checked_decode(self, payload: bytes, ceilings: tuple[float, int, int]) -> Any:
        if self.call == "checked_decode":
            self._panic()
        return self.real.checked_decode(payload, ceilings)


#: A GenAI span and an unknown group (upb skips it, the check does not vouch for it): upb parses
#: the message, then `decode` walks it.
NOT_VOUCHED = genai_request() + varint(20 << 3 | 3) + varint(20 << 3 | 4)
#: Per native call, a message `decode_spans` makes it on: a marker-free message is checked alone
#: (`accepts`), a GenAI message is checked and decoded in one walk (`checked_decode`), and one the
#: check does not vouch for is decoded after upb's parse (`decode`).
PANIC_PAYLOADS = {
    "accepts": field(1, field(2, field(2, field(5, b"GET /")))),
    "checked_decode": genai_request(),
    "decode": NOT_VOUCHED,
}


@pytest.mark.parametrize("call", PANIC_PAYLOADS)
def test_a_panic_in_the_native_walk_is_logged_counted_and_the_reference_decodes(
    call: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Rust panic reaches Python as `PanicException`, a BaseException: the stream's and the
    sink's per-message `except Exception` would let it end the worker. The message is parsed by
    upb and decoded by the reference instead, and the failure is logged and counted."""
    payload = PANIC_PAYLOADS[call]
    before = otlp.native_failures.count
    expected = outcome(payload, None)
    assert expected[0] == "decoded" and len(expected[1]) == (0 if call == "accepts" else 1)
    assert outcome(payload, PanickingDecoder(call)) == expected
    assert otlp.native_failures.count == before + 1
    assert "native OTLP decoder failed" in caplog.text and "index out of bounds" in caplog.text


def test_a_bytearray_decodes_as_the_reference_does() -> None:
    """The native walk takes `bytes` only; a bytearray (a buffer a caller reuses) is the
    reference's to decode, not a failure of the native path."""
    native = required_native_decoder()
    payload = bytearray(genai_request())
    before = otlp.native_failures.count
    assert outcome(payload, native) == outcome(payload, None)
    assert otlp.native_failures.count == before


def tenant_request(tenant: bytes, model: bytes = b"gpt-4.1") -> bytes:
    """One GenAI span with a tenant and a model of these bytes (the texts the decoder keeps)."""
    attributes = [
        (attr.GEN_AI_OPERATION_NAME, b"chat"),
        (attr.TENANT, tenant),
        (attr.GEN_AI_REQUEST_MODEL, model),
    ]
    span = field(1, bytes(16)) + field(2, bytes(8)) + field(5, b"call")
    for key, value in attributes:
        span += field(9, field(1, key.encode()) + field(2, field(1, value)))
    return field(1, field(2, field(2, span)))


def test_one_decoder_gives_each_message_its_own_texts_when_they_differ_by_one_byte() -> None:
    """The decoder keeps the `str` of each attribute text from one message to the next
    (contracts/native/src/texts.rs): a text one byte apart from a kept one, shorter, longer or
    of other characters, is its own value, never the kept one."""
    native = required_native_decoder()  # one decoder for every message: its kept texts carry over
    tenants = [b"acme", b"acmf", b"acm", b"acme ", b"Acme", "acm\u00e9".encode(), b"acme", b"acmf"]
    models = [b"gpt-4.1", b"gpt-4.2", b"gpt-4.1-mini", b"gpt-4.", b"gpt-4.1"]
    for tenant in tenants:
        for model in models:
            payload = tenant_request(tenant, model)
            (usage,) = native.decode(payload, MAX.ceilings())
            assert (usage.tenant, usage.request_model) == (tenant.decode(), model.decode())
            assert outcome(payload, native) == outcome(payload, None)


def test_the_texts_one_decoder_keeps_are_bounded() -> None:
    """Keys are user ids and sessions: the kept texts are emptied at `MAX_KEPT_TEXTS`, and a text
    decoded after that is made again, the same."""
    native = required_native_decoder()
    ceiling = native_module().MAX_KEPT_TEXTS
    for number in range(ceiling + 100):
        tenant = f"tenant-{number}".encode()
        (usage,) = native.decode(tenant_request(tenant), MAX.ceilings())
        assert usage.tenant == tenant.decode()
        assert native.kept_texts_count() <= ceiling
    (usage,) = native.decode(tenant_request(b"tenant-0"), MAX.ceilings())
    assert usage.tenant == "tenant-0"
