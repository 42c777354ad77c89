"""The window-totals changelog value: its cheaper encoding reads back exactly as the one before it.

Recovery decodes a changelog value with Faust's JSON codec (`json.loads`) and turns it back with
`WindowTotals.from_state`; these tests hold the state and its bytes to the encoding of main
65b6545 (`_reference_ring_state`, the stdlib encoder) on generated totals: calendar and rolling
windows, applied marks, call mixes, rings with gaps and any float bit pattern in a slot. The
values msgspec cannot write as the stdlib did (non-finite floats, odd keys) take the stdlib's path.
Every test runs over both encoders (`changelog_json_impl`: the Python reference `_json_value`, the
native `ChangelogJson`), and the differential tests below hold the native one to the reference's
bytes and check that it writes the common records itself.
"""

from __future__ import annotations

import json
import math
import struct
from array import array
from typing import Any

import pytest
from burnguard.stream import changelog
from burnguard.stream.accounting import RECENT_MINUTES, ROLLING_BUCKETS, Ring, WindowTotals
from burnguard.stream.changelog import _json_value, _new_changelog_json, encode
from faust.serializers import codecs
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.decoders import required_native_part

pytestmark = pytest.mark.usefixtures("changelog_json_impl")

_NS_PER_MINUTE = 60 * 1_000_000_000
BUCKET_NS = 90 * _NS_PER_MINUTE // ROLLING_BUCKETS  # a "90m" window's buckets
RING_SIZES = (RECENT_MINUTES, ROLLING_BUCKETS + 1)

#: any 64-bit pattern as a double: zeros of either sign, subnormals, NaNs, and bytes that are
#: ASCII whitespace (what the leading-slot strip must not take for empty slots)
any_double = st.binary(min_size=8, max_size=8).map(lambda raw: struct.unpack("<d", raw)[0])
slot_amounts = st.one_of(
    st.just(0.0),
    st.just(-0.0),
    st.sampled_from([struct.unpack("<d", bytes([c]) + bytes(7))[0] for c in b"\t\n\x0b\x0c\r "]),
    any_double,
    st.floats(min_value=0.0, max_value=1e6),
)
amounts = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)


def _reference_ring_state(ring: Ring) -> list[Any]:
    """`Ring.to_state` as main 65b6545 wrote it: the ring oldest first, its leading zero bytes' slots cut."""
    _, ordered = ring._since(ring.newest - len(ring.amounts) + 1)
    raw = ordered.tobytes()
    skip = (len(raw) - len(raw.lstrip(b"\0"))) // ordered.itemsize
    return [ring.newest, ordered[skip:].tolist()]


def _old_encoding(totals: WindowTotals) -> bytes:
    """The changelog value as main 65b6545 wrote it: the stdlib encoder over the reference state."""
    state = totals.to_state()
    state[5] = _reference_ring_state(totals.recent)
    state[6] = _reference_ring_state(totals.buckets) if totals.buckets is not None else None
    return json.dumps(state, separators=(",", ":")).encode()


def _bits(value: Any) -> Any:
    """`value` with each float as its bit pattern: NaN equals itself, -0.0 differs from 0.0."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, list):
        return [_bits(item) for item in value]
    if isinstance(value, dict):
        return {key: _bits(item) for key, item in value.items()}
    return value


@st.composite
def rings(draw: st.DrawFn) -> Ring:
    """A ring of either size, any slot contents, its newest index anywhere (also empty: -1)."""
    size = draw(st.sampled_from(RING_SIZES))
    slots = draw(st.lists(slot_amounts, min_size=size, max_size=size))
    newest = draw(st.integers(min_value=-1, max_value=2**40))
    return Ring(size, newest, array("d", slots))


@st.composite
def window_totals(draw: st.DrawFn) -> WindowTotals:
    """Totals built as stage 2 builds them: deltas from several source partitions, calendar or
    rolling, with or without a call mix, event times spread so the rings wrap and keep gaps."""
    rolling = draw(st.booleans())
    with_mix = draw(st.booleans())
    totals = WindowTotals()
    start_ns = draw(st.integers(min_value=0, max_value=2**62))
    offsets: dict[int, int] = {}
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        partition = draw(st.integers(min_value=-1, max_value=5))
        offsets[partition] = offsets.get(partition, -1) + draw(st.integers(min_value=1, max_value=2**40))
        first = start_ns + draw(st.integers(min_value=0, max_value=3 * 60 * _NS_PER_MINUTE))
        last = first + draw(st.integers(min_value=0, max_value=45 * _NS_PER_MINUTE))
        mix = draw(st.lists(amounts, min_size=4, max_size=4)) if with_mix else None
        spans = draw(st.integers(min_value=0, max_value=2**31))
        totals.add(partition, offsets[partition], draw(amounts), spans, first, last, BUCKET_NS * rolling, mix)
    return totals


@settings(max_examples=500, deadline=None)
@given(ring=rings())
def test_a_rings_state_is_the_one_written_before_bit_for_bit(ring: Ring) -> None:
    assert _bits(ring.to_state()) == _bits(_reference_ring_state(ring))


@settings(max_examples=300, deadline=None)
@given(totals=window_totals())
def test_recovery_reads_the_totals_exactly_as_written(totals: WindowTotals) -> None:
    """new encoding -> Faust's JSON decode -> `from_state`: the same totals, and the same JSON value
    as the encoding before."""
    written = encode("json", totals)
    recovered = WindowTotals.from_state(json.loads(written))
    assert _bits(recovered.to_state()) == _bits(totals.to_state())
    assert recovered.recent.amounts == totals.recent.amounts
    assert recovered.recent.newest == totals.recent.newest
    if totals.buckets is None:
        assert recovered.buckets is None
    else:
        assert recovered.buckets is not None
        assert (recovered.buckets.newest, recovered.buckets.amounts) == (
            totals.buckets.newest,
            totals.buckets.amounts,
        )
    assert _bits(json.loads(written)) == _bits(json.loads(_old_encoding(totals)))


@settings(max_examples=200, deadline=None)
@given(recent=rings(), buckets=st.none() | rings(), spent=any_double)
def test_any_ring_contents_read_back_as_written(recent: Ring, buckets: Ring | None, spent: float) -> None:
    """Slots of any bit pattern (NaN, infinities, -0.0) read back as the encoding before read them."""
    if len(recent.amounts) != RECENT_MINUTES:
        recent = Ring(RECENT_MINUTES, recent.newest, recent.amounts[:RECENT_MINUTES])
    if buckets is not None and len(buckets.amounts) != ROLLING_BUCKETS + 1:
        buckets = None
    totals = WindowTotals(spent=spent, spans=1, applied={"0": 3}, recent=recent, buckets=buckets)
    assert _bits(json.loads(encode("json", totals))) == _bits(json.loads(_old_encoding(totals)))


def _totals(**fields: Any) -> WindowTotals:
    """A rolling window's totals with a mark, a mix and one amount in each ring, and `fields`."""
    totals = WindowTotals.from_state(
        [0.5, 3, 1, 2, {"0": 9}, [4, [0.25, 0.0, 1.5]], [7, [1.5]], [1.0, 0, 0, 0]]
    )
    for name, value in fields.items():
        setattr(totals, name, value)
    return totals


@pytest.mark.parametrize(
    "totals",
    [
        _totals(spent=math.nan),
        _totals(spent=-math.inf),
        _totals(mix=[1.0, 0.0, math.inf, 0.0]),
        _totals(recent=Ring(RECENT_MINUTES, 3, array("d", [math.nan] * RECENT_MINUTES))),
        _totals(buckets=None, mix=None, spent=math.inf),  # nulls of its own, and one from the infinity
        _totals(applied={"null": 4}),  # "null" in a text
        _totals(applied={1: 4, "2": 5}),
        _totals(applied={1e16: 4}),  # msgspec writes the key as "1e16", the stdlib "1e+16"
        _totals(applied={"\ud800": 4}),  # a lone surrogate: msgspec refuses it, the stdlib escapes it
        _totals(spent=2**70, spans=-(2**64)),  # ints past 64 bits
    ],
)
def test_what_msgspec_would_write_otherwise_is_written_as_before(totals: WindowTotals) -> None:
    written = encode("json", totals)
    assert _bits(codecs.loads("json", written)) == _bits(json.loads(_old_encoding(totals)))
    assert written == _old_encoding(totals)  # these states' text is the stdlib's, byte for byte


def test_fausts_json_codec_is_the_stdlibs() -> None:
    """Recovery reads the changelog with `json.loads`: with orjson installed Faust's codec would use
    it instead (NaN refused, ints past 64 bits read as floats, a `WindowTotals` written as an object
    of its fields), so nothing may pull orjson into the worker's environment."""
    import faust.utils.json

    assert faust.utils.json.orjson is None
    assert faust.utils.json.loads.__defaults__ == (json.loads,)


# --- signal states: flat objects of text and ints --------------------------------------------

_any_text = st.text(max_size=12)  # any code point: non-ASCII, control characters, quotes, surrogates
_flat_values = st.one_of(
    _any_text,
    st.sampled_from(["ok", "warn", "downgrade", "throttle"]),
    st.integers(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.integers(min_value=(1 << 63) - 2, max_value=(1 << 64)),
    st.floats(),
    st.booleans(),
    st.none(),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(_any_text | st.sampled_from(["action", "window_start_ns", "retire_at_ns"]), _flat_values)
)
def test_a_flat_value_is_written_as_the_stdlib_writes_it(value: dict[str, Any]) -> None:
    try:
        expected = json.dumps(value, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # not reached: the stdlib escapes every non-ASCII code point
        pytest.fail("stdlib refused")
    assert encode("json", value) == expected


@pytest.mark.parametrize(
    "state",
    [
        {"action": "throttle", "window_start_ns": 1_764_720_000_000_000_000},
        {"action": "ok", "window_start_ns": 0, "retire_at_ns": 1_764_720_120_000_000_000},
    ],
)
def test_a_signal_state_is_written_by_msgspec(state: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the change: a signal state does not take the stdlib's encoder (~1.5 us a record)."""
    expected = json.dumps(state, separators=(",", ":")).encode()

    def refused(value: Any) -> str:
        raise AssertionError("stdlib encoder called")

    monkeypatch.setattr(changelog, "_encode_json", refused)
    assert encode("json", state) == expected


# --- the native encoder against the reference --------------------------------------------------


def _native_without_reference() -> Any:
    """The native encoder with a reference that fails the test: what it writes, it writes itself."""

    def reference(value: Any) -> bytes:
        raise AssertionError(f"handed to the reference: {value!r}")

    return _new_changelog_json(lambda *shapes: required_native_part("ChangelogJson")(reference, *shapes[1:]))


def _native() -> Any:
    return _new_changelog_json(required_native_part("ChangelogJson"))


@settings(max_examples=500, deadline=None)
@given(totals=window_totals(), key=_any_text)
def test_the_native_encoder_writes_the_references_bytes(totals: WindowTotals, key: str) -> None:
    native = _native()
    assert native(totals) == _json_value(totals)
    assert native(key) == _json_value(key)
    state = {"action": key, "window_start_ns": totals.spans}
    assert native(state) == _json_value(state)


@settings(max_examples=300, deadline=None)
@given(recent=rings(), buckets=st.none() | rings(), spent=any_double, mix=st.none() | st.lists(any_double))
def test_the_native_encoder_writes_any_slots_as_the_reference(
    recent: Ring, buckets: Ring | None, spent: float, mix: list[float] | None
) -> None:
    """Any bit pattern in a ring, the spend or the mix: the reference's bytes (a non-finite one is
    handed to it)."""
    totals = WindowTotals(spent=spent, spans=1, applied={"0": 3}, recent=recent, buckets=buckets, mix=mix)
    assert _native()(totals) == _json_value(totals)


@settings(max_examples=200, deadline=None)
@given(totals=window_totals())
def test_the_native_encoder_writes_finite_totals_and_plain_keys_itself(totals: WindowTotals) -> None:
    """The common records never reach the reference: a window's totals (finite floats, int64 marks),
    its key, a signal state."""
    native = _native_without_reference()
    assert native(totals) == _json_value(totals)
    assert native("budget|tenant-a|1764720000000000000") == b'"budget|tenant-a|1764720000000000000"'
    state = {"action": "throttle", "window_start_ns": 1_764_720_000_000_000_000, "retire_at_ns": -1}
    assert native(state) == _json_value(state)


@pytest.mark.parametrize(
    "value",
    [
        _totals(spent=math.nan),
        _totals(mix=[1.0, 0.0, math.inf, 0.0]),
        _totals(applied={"null": 4}),
        _totals(applied={1: 4}),
        _totals(applied={'a"b': 4}),
        _totals(spent=2**63),
        _totals(spans=True),
        _totals(mix=(1.0, 0.0, 0.0, 0.0)),
        _totals(recent=Ring(RECENT_MINUTES, 3, array("f", [0.5] * RECENT_MINUTES))),
        "caf\u00e9",
        'a"b',
        {"action": "ok", "window_start_ns": 2**64},
        {"action": 1.5},
        [1, 2],
    ],
)
def test_what_the_native_encoder_does_not_write_exactly_goes_to_the_reference(value: Any) -> None:
    handed: list[Any] = []

    def reference(given: Any) -> bytes:
        handed.append(given)
        return _json_value(given)

    native = _new_changelog_json(
        lambda *shapes: required_native_part("ChangelogJson")(reference, *shapes[1:])
    )
    assert native(value) == _json_value(value)
    assert handed == [value]
