"""The usage topic's records (`stream/records.py`): named fields, the wire format as it always was."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest
from burnguard.stream import partitioner
from burnguard.stream.accounting import MIX_FIELDS, STATE_FIELDS, STATE_LAYOUTS, UsageDelta, WindowTotals
from burnguard.stream.changelog import encode
from burnguard.stream.records import (
    RECORD_VERSION,
    RECORD_VERSION_SINGLE,
    USAGE_RECORDS_CODEC,
    BatchRecord,
    DeltaRow,
    MicroBatch,
    Step,
    _combined,
    batches_record,
    combined_row,
    decoded,
    encode_record,
    keys_record,
    message_rows,
    new_group_rows,
    record_version,
    removal_rows,
    step_row,
    sub_batches,
    tick_rows,
)
from faust.serializers import codecs
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.decoders import required_native_combined, required_native_part

ROW = ["tenant-cost", "acme", 0, 1.5, 2, 10, 20, 0]
#: 24 digits (three of the native reading's eight-digit reads): an int past u64 that a reading
#: without its overflow checks would take as its value modulo 2**64, an int64.
BIG_WRAPPING = 10**23 + 12345


def test_a_delta_row_is_the_same_json_list_with_or_without_its_mix() -> None:
    assert DeltaRow.from_wire(ROW).to_wire() == ROW  # no mix: 8 fields, as before the mix existed
    assert DeltaRow.from_wire(ROW).mix is None
    mixed = [*ROW, [2.0, 0.0, 0.0, 0.0]]
    row = DeltaRow.from_wire(json.loads(json.dumps(mixed)))
    assert (row.budget, row.key, row.amount, row.mix) == ("tenant-cost", "acme", 1.5, [2.0, 0.0, 0.0, 0.0])
    assert row.to_wire() == mixed


def test_a_deltas_row_is_the_delta_row_of_its_fields_with_or_without_its_mix() -> None:
    for mix in (None, [2.0, 1.0, 0.0, 0.25]):
        delta = UsageDelta("tenant-cost", "acme", 7, 1.5, 2, 10, 20, 3, 41, 60_000_000_000, mix)
        fields = (delta.budget, delta.key, delta.window_start_ns, delta.amount, delta.spans)
        times = (delta.first_event_ns, delta.last_event_ns, delta.bucket_ns)
        assert delta.to_row() == DeltaRow(*fields, *times, mix).to_wire()
        assert UsageDelta.from_row(delta.to_row(), 3, 41) == delta


def floats_and_values(value: Any) -> Any:
    """`value` with each float as its bits (`float.hex`), so -0.0, 0.0 and the last bit differ."""
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, list):
        return [floats_and_values(item) for item in value]
    if isinstance(value, dict):
        return {key: floats_and_values(item) for key, item in value.items()}
    return value


def test_stage_1_encodes_a_record_that_reads_back_as_fausts_json_codec_wrote_it() -> None:
    """Stage 2 reads what Faust's JSON codec would have written: the same values, floats bit for bit;
    other bytes where msgspec writes text unescaped or `1e16` for `1e+16`."""
    floats = [0.1 + 0.2, -0.0, 5e-324, 1e16, 1e300, 1 / 3, 2.5e-7]
    rows = [
        ROW,
        [*ROW, [2.0, 0.0, 1.0, 0.1 + 0.2]],
        ["b", 'é ☃ "x" \\ \n', -1, 1e300, 0, 1 << 62, 2**64, 0, None, [[3, *floats, None]]],
    ]
    record = batches_record([BatchRecord(3, 77, rows, [["long-context", "s1", [10, 20]]])])
    faust_wrote = json.loads(encode("json", record))
    assert floats_and_values(json.loads(encode_record(record))) == floats_and_values(faust_wrote)
    surrogate = batches_record([BatchRecord(0, 1, [["b", "\ud800", *ROW[2:]]], [])])  # msgspec refuses
    assert encode_record(surrogate) == encode("json", surrogate)


def test_a_non_finite_amount_is_written_as_null_not_as_a_number_stage_2_would_sum() -> None:
    """None reaches a row (span values are bounded before they are summed); if one did, the stdlib
    wrote NaN, which stage 2 summed into the window for good; now it is null, which stage 2 refuses
    (`tests/test_combined_steps.py::test_a_row_whose_amount_is_null_fails_its_record_loudly`)."""
    odd = {"kind": "batches", "batches": [[0, 1, [[*ROW[:3], math.inf, *ROW[4:]]], []]]}
    assert json.loads(encode_record(odd))["batches"][0][2][0][3] is None


def test_a_batch_record_keeps_its_keys_on_the_wire() -> None:
    batch = BatchRecord(3, 77, [ROW], [["long-context", "s1", [10, 20]]])
    wire = json.loads(json.dumps(batch.to_wire()))
    assert wire == {
        "kind": "batch",
        "source_partition": 3,
        "source_offset": 77,
        "deltas": [ROW],
        "contexts": [["long-context", "s1", [10, 20]]],
    }
    assert BatchRecord.from_wire(wire) == batch and batch.source == (3, 77)


def test_a_micro_batch_keeps_each_message_as_a_sub_batch_with_its_source() -> None:
    batch = MicroBatch(max_rows=3)
    batch.add(1, BatchRecord(0, 10, [ROW, ROW], []))
    batch.add(2, BatchRecord(3, 4, [], [["long-context", "s1", [10]]]))
    batch.add(1, BatchRecord(2, 11, [ROW], []))
    batch.add(1, BatchRecord(0, 12, [ROW, ROW], []))  # would make 5 rows: a new record
    records = [(p, json.loads(json.dumps(r))) for p, r in batch.records()]
    assert [p for p, _ in records] == [1, 1, 2]
    assert all(r["kind"] == "batches" and record_version(r) == RECORD_VERSION for _, r in records)
    sources = [[b.source for b in sub_batches(r)] for _, r in records]
    assert sources == [[(0, 10), (2, 11)], [(0, 12)], [(3, 4)]]
    assert sub_batches(records[2][1])[0].contexts == [["long-context", "s1", [10]]]


def test_a_record_with_a_combined_row_is_a_groups_record_older_workers_park_whole() -> None:
    """A worker older than combined rows reads `batches` rows until the first tenth field and then
    fails half way; under its own kind it parks the whole record (unknown kind: not counted)."""
    batch = MicroBatch(max_rows=3)
    batch.add(1, BatchRecord(0, 10, [ROW], []))
    batch.add(1, BatchRecord(0, 12, [[*ROW, [[11, 0.5, 1, 1, 0], [12, 0.5, 1, 1, 0]]]], []), 2, combined=True)
    batch.add(2, BatchRecord(0, 12, [ROW], []))
    records = [(p, json.loads(json.dumps(r))) for p, r in batch.records()]
    assert [(p, r["kind"]) for p, r in records] == [(1, "batches"), (1, "groups"), (2, "batches")]
    assert all(record_version(r) == RECORD_VERSION for _, r in records)


WIRE_STEPS = st.lists(
    st.tuples(
        st.integers(0, 2**62),
        st.floats(0.0, 1e6) | st.sampled_from([0.0, 1.0]),
        st.integers(0, 500),
        st.integers(0, 2**62),
        st.integers(0, 10**12),
        st.just([])  # a plain step: no mix field
        | st.just([None])
        | st.lists(st.floats(0.0, 40.0) | st.integers(0, 9), min_size=4, max_size=4).map(lambda mix: [mix]),
    ),
    min_size=1,
    max_size=8,
)


@given(steps=WIRE_STEPS, counts_calls=st.booleans(), bucket_ns=st.sampled_from([0, 60 * 10**9]))
def test_a_steps_row_is_the_row_its_step_reads_as(
    steps: list[tuple[Any, ...]], counts_calls: bool, bucket_ns: int
) -> None:
    """`step_row` (stage 2's row of a step handed back alone) is the row of `Step.from_wire`'s fields,
    value for value and type for type: the plain mix made for a step without its own (floats, in a
    row that counts calls), a step's own mix or null kept as it is, its last event its first plus
    its span."""
    wire = [[offset, amount, spans, first, span, *mix] for offset, amount, spans, first, span, mix in steps]
    row = ["cost", "acme", 7, 1.5, 9, 0, 1, bucket_ns, [1.0, 0.0, 0.0, 0.0] if counts_calls else None, wire]
    for step in json.loads(json.dumps(wire)):
        _, amount, spans, first_ns, last_ns, mix = Step.from_wire(step, counts_calls)
        expected = DeltaRow("cost", "acme", 7, amount, spans, first_ns, last_ns, bucket_ns, mix)
        made = step_row(row, step)
        assert type(made) is DeltaRow and made == expected
        assert [type(value) for value in made] == [type(value) for value in expected]
        if mix is not None:
            assert [type(value) for value in made.mix] == [type(value) for value in mix]


@pytest.mark.usefixtures("combine_impl", "groups_impl")
def test_a_combined_row_reads_back_as_each_messages_own_row_and_sums_them() -> None:
    """A group's wire rows (`GroupRows` or the native `Groups`: steps without a plain mix, an
    explicit null for a row without one, mixes summed field by field) read back (`message_rows`)
    as the rows each message made."""
    own = {
        4: [["cost", "acme", 0, 0.0625, 1, 50, 60, 0, [1.0, 0.0, 0.0, 0.5]]],
        5: [
            ["cost", "acme", 0, 0.25, 3, 40, 70, 0, [2.0, 1.0, 1.0, 0.5]],
            ["tools", "acme", 0, 1.0, 1, 5, 6, 0],
        ],
        6: [["cost", "acme", 0, 0.5, 2, 30, 50, 0, [2.0, 0.0, 0.0, 0.0]]],
        7: [["cost", "acme", 0, 0.125, 1, 0, 90, 0]],
        8: [
            ["cost", "acme", 0, 1.0, 4, 35, 45, 0, [3.0, 0.0, 2.0, 0.25]],
            ["cost", "beta", 0, 2.0, 1, 8, 9, 0, [1.0, 0, 0, 0]],
        ],
    }
    group = new_group_rows()
    for offset, rows in own.items():
        group.add(offset, json.loads(json.dumps(rows)))
    combined = [row for row, _ in group.rows()]
    acme, tools, beta = json.loads(encode_record({"rows": combined}))["rows"]
    assert acme[3:9] == [1.9375, 11, 30, 90, 0, [8.0, 1.0, 3.0, 1.25]]
    assert acme[9] == [
        [4, 0.0625, 1, 50, 10, [1.0, 0.0, 0.0, 0.5]],
        [5, 0.25, 3, 40, 30, [2.0, 1.0, 1.0, 0.5]],
        [6, 0.5, 2, 30, 20],
        [7, 0.125, 1, 0, 90, None],
        [8, 1.0, 4, 35, 10, [3.0, 0.0, 2.0, 0.25]],
    ]
    assert tools[9] == 5 and len(beta) == 9  # one message's row: its offset, unless it is the group's last
    read = [pair for row in (acme, tools, beta) for pair in message_rows(row, (3, 8))]
    expected = [((3, offset), DeltaRow(*row)) for offset, rows in own.items() for row in rows]

    def order(pair: tuple[tuple[int, int], DeltaRow]) -> tuple[str, str, int]:
        return pair[1].budget, pair[1].key, pair[0][1]

    assert sorted(read, key=order) == sorted(expected, key=order)


def test_ticks_and_removals_read_by_name() -> None:
    ticks = json.loads(json.dumps(keys_record("ticks", [["b", "k"]])))
    assert [(t.budget, t.key) for t in tick_rows(ticks)] == [("b", "k")]
    removals = keys_record("removals", [["b", "k", "tenant"]])
    assert [r.scope for r in removal_rows(removals)] == ["tenant"]


def test_single_key_records_are_version_1() -> None:
    assert record_version({"kind": "batch"}) == record_version({"kind": "ticks"}) == RECORD_VERSION
    assert record_version({"budget": "b", "key": "k", "tick": True}) == RECORD_VERSION_SINGLE
    assert record_version({"kind": "context", "guard": "g"}) == RECORD_VERSION_SINGLE


def test_window_totals_in_every_earlier_layout_read_back() -> None:
    current = WindowTotals(2.0, 3, 5, 9, {"0": 4}, mix=[3.0, 1.0, 0.0, 0.0])
    state = json.loads(json.dumps(current.to_state()))
    assert len(state) == STATE_FIELDS == max(STATE_LAYOUTS)
    for fields in sorted(STATE_LAYOUTS):
        totals = WindowTotals.from_state(state[:fields])
        assert (totals.spent, totals.spans, totals.first_event_ns, totals.last_event_ns) == (2.0, 3, 5, 9)
        assert totals.applied == ({"0": 4} if fields >= 5 else {})
        assert totals.mix == (current.mix if fields >= 8 else None)


def test_context_observations_count_toward_a_records_size() -> None:
    """Sessions under context guards give few deltas and many observations: records stay small."""
    batch = MicroBatch(max_rows=1000)
    session = "s" * 128
    for offset in range(200):  # a micro-batch of messages, 100 sessions x 2 guards on each
        contexts = [[f"guard-{g}", f"{session}{i}", [1234, 2345]] for i in range(100) for g in range(2)]
        batch.add(0, BatchRecord(0, offset, [ROW], contexts))
    records = [record for _, record in batch.records()]
    assert [len(json.dumps(record)) < 1_000_000 for record in records] == [True] * len(records)
    sizes = [sum(len(b.deltas) + len(b.contexts) for b in sub_batches(record)) for record in records]
    assert max(sizes) <= 1000
    assert [b.source for record in records for b in sub_batches(record)] == [(0, o) for o in range(200)]


def _decoded_or_error(decode: Any, payload: bytes) -> Any:
    """What `decode` makes of `payload`, floats as their bits; or the type of its error."""
    try:
        return floats_and_values(decode(payload))
    except Exception as exc:  # compared by type: the codecs' messages differ
        return ("error", type(exc).__name__)


def test_stage_2_decodes_usage_records_as_fausts_json_codec_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """`UsageRecordsJson` (msgspec, Faust's decoding for what it refuses) gives `json.loads`'s value
    for records as either encoder writes them, for numbers written with any digits (correct
    rounding) and for what msgspec refuses; it fails where Faust's codec fails, as Faust's does.
    (Without the native `UsageRecord`, which reads stage 1's records from their bytes instead.)"""
    monkeypatch.setitem(partitioner.native_parts, "UsageRecord", None)
    rng = random.Random(7)
    usage_codec, faust_json = codecs.get_codec(USAGE_RECORDS_CODEC), codecs.get_codec("json")
    floats = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(3000)]
    finite = [value for value in floats if math.isfinite(value)] + [0.1 + 0.2, -0.0, 5e-324, 1e16]
    rows = [
        ["b", f"k{n} é ☃", n, value, 1 << 70, -(1 << 64), [value, 0.0, 1.0, 2.5]]
        for n, value in enumerate(finite)
    ]
    record = batches_record([BatchRecord(3, 77, rows, [["long-context", "s1", [10, 20]]])])
    written = [encode_record(record), encode("json", record)]
    digits = [f"{rng.randrange(10**25)}e{rng.randrange(-340, 300)}".encode() for _ in range(3000)]
    digits += [f"-0.{rng.randrange(10**30):030d}".encode() for _ in range(500)]
    odd = [b"NaN", b"[Infinity, -Infinity]", b"1e400", b"[-1.8e308]", b'"\\ud800"', b'{"a": "\\udfff x"}']
    refused = [b"\xef\xbb\xbf[1]", b'"\xff"', b'"\xed\xa0\x80"', b"[1] x", b"", b"[1,]", b"01", b'"\t"']
    for payload in [*written, *digits, b"[" + b",".join(digits) + b"]", *odd, *refused]:
        expected = _decoded_or_error(faust_json.loads, payload)
        assert _decoded_or_error(usage_codec.loads, payload) == expected, payload
    assert all(_decoded_or_error(faust_json.loads, payload)[0] == "error" for payload in refused)
    assert _decoded_or_error(usage_codec.loads, b"NaN") == ("float", "nan")  # msgspec refuses it
    assert usage_codec.dumps(record) == faust_json.dumps(record)  # the timers' records as before


def test_the_native_reading_takes_stage_1s_records_and_leaves_any_doubt_to_the_reference() -> None:
    """`UsageRecord.parse` takes a `batches` or `groups` record as stage 1 writes it (or as JSON with
    whitespace), rows of other types included (those are handed back whole); it refuses (None: the
    reference decodes the record) every other kind or shape and anything it could read otherwise:
    an escape, a number past a double or not JSON, bytes that are not UTF-8, trailing bytes."""
    parse = required_native_part("UsageRecord").parse
    steps = [[3, 0.5, 1, 10, 5], [4, 1.0, 1, 11, 5, None]]
    rows = [
        [*ROW, None],
        ["b", "k é ☃", 0, 1.5, 2, 10, 20, None, [1.0, 0.0, 0.0, 0.0], steps],
        ["b", "k", 0, 1, True, 1 << 70, 2],  # not TotalsRows' types: handed back as its bytes
    ]
    batches = [BatchRecord(3, 77, rows, [["g", "s1", [10, 20]]]), BatchRecord(1, 2, [], [])]
    record = batches_record(batches, combined=True)
    spaced = [json.dumps(record, ensure_ascii=False, indent=indent).encode() for indent in (None, 1)]
    for payload in [encode_record(record), *spaced]:
        parsed = parse(payload)
        assert parsed is not None and parsed.rows() == 3 and parsed.payload == payload
    text = encode_record(record).decode()
    refused = [
        text.replace('"k"', '"\\u006b"'),  # an escape
        text.replace("1.5", "1e400"),
        text.replace("1.5", "NaN"),
        text.replace("1.5", "01.5"),
        text.replace("1.5", "1."),
        text.replace('"groups"', '"ticks"'),
        text.replace('"groups"', '"groups","x":1'),
        text.replace('"kind":"groups",', ""),
        text.replace("[3,77,", "[3,77.0,"),  # a sub-batch's source of another type
        text.replace("[3,77,", "[3,"),  # a sub-batch of three fields
        text.replace("[1,2,[],[]]", "[1,2,{},[]]"),
        text + "x",
        text[:-1],
        text.replace("☃", "\\n"),  # an escape
        text.replace("☃", "\t"),  # a control character in a string: not JSON
    ]
    for payload in refused:
        assert parse(payload.encode()) is None, payload
    assert parse(text.encode().replace("é".encode(), b"\xff")) is None
    assert parse(encode_record(keys_record("ticks", [["b", "k"]]))) is None


def test_the_native_reading_reads_each_row_as_the_reference_decodes_its_bytes() -> None:
    """Every row `UsageRecord` reads into fields is what the reference decoder makes of its bytes:
    floats bit for bit (random doubles, short decimals, -0.0, subnormals, written by msgspec and by
    the stdlib with any digits), ints up to int64's ends, steps with and without their own mix; a
    row it does not read (a bool, an int past int64, a legacy row) is kept as its exact bytes."""
    parse = required_native_part("UsageRecord").parse
    rng = random.Random(16)
    floats = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(2000)]
    floats = [value for value in floats if math.isfinite(value)]
    floats += [0.1 + 0.2, -0.0, 0.0, 5e-324, 1e16, 1e22, 1e23, 9007199254740993.0, 123.456, 2.5e-8]
    floats += [rng.randrange(10**6) / 10 ** rng.randrange(12) for _ in range(500)]
    ints = [0, -1, 2**63 - 1, -(2**63) + 1, 1 << 53, rng.randrange(1 << 62)]
    rows: list[list[Any]] = []
    for n, value in enumerate(floats):
        mix = rng.choice([None, [], [value, 0.0, 1.0, 2.5]])
        first, last = rng.choice(ints), rng.choice(ints)
        row = [
            "b",
            f"k{n} é",
            rng.choice(ints),
            value,
            rng.choice(ints),
            first,
            last,
            rng.choice([None, 0, 60]),
            mix,
        ]
        roll = rng.random()
        if roll < 0.3:
            row.append(rng.choice(ints))
        elif roll < 0.6:
            row.append([[n, value, 2, first, 5], [n + 1, -value, 1, last, 0, [1.0, value, 0.0, 0.0]]])
        elif roll < 0.65:
            row[4] = rng.choice([True, 2**63, -(2**63), 1 << 70, BIG_WRAPPING, -(10**40)])  # not int64: bytes
        elif roll < 0.7:
            row = row[:8]
        rows.append(row)
    record = batches_record([BatchRecord(0, 5, rows, [])], combined=True)
    texts = [encode_record(record), json.dumps(record, ensure_ascii=False).encode()]
    texts.append(json.dumps(record, ensure_ascii=False).replace("e-", "E-").replace(".0,", ".000,").encode())
    for payload in texts:
        parsed = parse(payload)
        assert parsed is not None
        read = parsed.read_rows()
        assert len(read) == len(rows)
        for (raw, fields), row in zip(read, rows, strict=True):
            expected = floats_and_values(json.loads(raw))
            assert floats_and_values(row) == expected  # the bytes are the row's own
            if fields is not None:
                assert floats_and_values(fields) == expected, raw
        taken = sum(fields is not None for _, fields in read)
        assert len(rows) * 0.8 < taken < len(rows), taken


#: A group's row's mix: null, `[]` (its steps without their own get a plain mix: it is not None),
#: floats, or ints (the native reading leaves such a row to the reference).
_ROW_MIXES = st.sampled_from([None, [], [1.0, 0.0, 2.0, 0.5], [1, 0, 0, 0]])
#: A step's own mix as written after its five numbers: none, null, `[]`, floats, ints.
_STEP_MIXES = st.sampled_from([[], [None], [[]], [[0.5, 1.0, 0.0, -0.0]], [[3, 0, 1, 0]]])
_STEP_AMOUNTS = st.floats(width=64, allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 5e-324, 0.1 + 0.2, 1e22, 1e23, 3, 0]
)


@given(
    rows=st.lists(
        st.tuples(
            _ROW_MIXES,
            st.sampled_from([None, 0, 60 * 10**9]),
            st.lists(
                st.tuples(
                    st.integers(0, 2**62),
                    _STEP_AMOUNTS,
                    st.integers(0, 2**62) | st.just(2**53 + 1),
                    st.integers(-(2**62), 2**62),
                    st.integers(0, 2**62),
                    _STEP_MIXES,
                ),
                min_size=1,
                max_size=5,
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    stdlib=st.booleans(),
)
def test_a_step_the_native_rows_hand_back_alone_is_the_row_the_reference_reads(
    rows: list[tuple[Any, ...]], stdlib: bool
) -> None:
    """The fields `TotalsRows.add_record` hands back for a step applied alone (`UsageRecord.step_rows`:
    the same `WireRow::step_row`) are `step_row` of the row the reference decodes from its bytes,
    and the step's own offset: value for value and type for type (ints stay ints, floats bit for
    bit, a plain mix of floats made where the row has a mix, `[]` included, a step's own null or
    `[]` kept), whether msgspec or the stdlib wrote the record. A row the reading does not take
    (an int amount or mix) has no step here (the reference decodes it); a step whose last event
    is past int64 has no fields (the native rows hand its row back whole)."""
    parse = required_native_part("UsageRecord").parse
    wire = [
        ["cost", "acme é", 7, 1.5, 9, 0, 1, bucket, mix, [list(step[:5]) + step[5] for step in steps]]
        for mix, bucket, steps in rows
    ]
    record = batches_record([BatchRecord(0, 5, wire, [])], combined=True)
    payload = json.dumps(record, ensure_ascii=False).encode() if stdlib else encode_record(record)
    parsed = parse(payload)
    assert parsed is not None
    read = parsed.step_rows(MIX_FIELDS)
    for raw, step, own in read:
        row = decoded(raw)
        expected = step_row(row, row[-1][step])
        if own is None:  # its last event past int64: never handed back alone (not a row the native rows add)
            assert expected.last_event_ns >= 2**63
            continue
        fields, offset = own
        assert type(fields) is tuple and offset == row[-1][step][0]
        assert [floats_and_values(value) for value in fields] == [
            floats_and_values(value) for value in expected
        ]
    taken = [
        (mix is None or all(type(value) is float for value in mix))
        and all(
            type(step[1]) is float and not (step[5] and step[5][0] and type(step[5][0][0]) is int)
            for step in steps
        )
        for mix, _, steps in rows
    ]
    assert len(read) == sum(len(steps) for (_, _, steps), took in zip(rows, taken, strict=True) if took)


#: A row's number as stage 1 makes it (True) or of another type the native loop leaves to the reference.
_AMOUNTS = st.one_of(
    st.tuples(st.floats(width=64), st.just(True)),
    st.tuples(st.sampled_from([0.0, -0.0, 0.5, 1e-300, 1e300]), st.just(True)),
    st.tuples(st.integers(-5, 5), st.just(False)),
)
_PLAIN, _NO_MIX, _NULL_MIX, _FLOAT_MIX, _INT_MIX = range(5)


@st.composite
def _rows_of_messages(draw: st.DrawFn) -> tuple[list[Any], bool]:
    """`GroupRows`' made list of one key, and whether every row is of stage 1's types."""
    made: list[Any] = []
    usual = True
    for offset in sorted(draw(st.sets(st.integers(0, 10**6), min_size=2, max_size=6))):
        amount, amount_usual = draw(_AMOUNTS)
        spans = draw(st.one_of(st.integers(0, 1_000), st.just(2**53 + 1)))
        first, last = draw(st.integers(0, 2**62)), draw(st.integers(0, 2**62))
        row: list[Any] = ["cost", "acme", 7, amount, spans, first, last, 0]
        kind = draw(st.sampled_from([_PLAIN, _NO_MIX, _NULL_MIX, _FLOAT_MIX, _INT_MIX]))
        if kind == _PLAIN:
            row.append([float(spans), 0.0, 0.0, 0.0])
        elif kind == _NULL_MIX:
            row.append(None)
        elif kind == _FLOAT_MIX:
            row.append(draw(st.lists(st.floats(width=64), min_size=4, max_size=4)))
        elif kind == _INT_MIX:
            row.append([spans, 0, 0, 0])
        usual &= amount_usual and spans < 2**53 and kind != _INT_MIX
        made += [offset, row]
    return made, usual


@given(_rows_of_messages())
def test_the_native_combined_row_is_the_references_bit_for_bit(case: tuple[list[Any], bool]) -> None:
    """Every row of stage 1's types the native loop combines as the reference does (the same JSON,
    floats to the bit, ints staying ints); any other it leaves to the reference (None)."""
    native = required_native_combined()
    made, usual = case
    expected = _combined([*made])
    found = native([*made])
    if found is None:
        assert not usual
        return
    assert repr(found) == repr(expected)
    assert combined_row([*made]) is not None


def test_a_native_combining_that_fails_or_declines_leaves_the_row_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = [3, ["cost", "acme", 0, 0.5, 1, 10, 20, 0], 4, ["cost", "acme", 0, 0.25, 2, 15, 30, 0]]
    expected = _combined([*made])

    def fails(rows: list[Any]) -> list[Any]:
        raise ValueError("broken")

    for native in (fails, lambda rows: None):
        monkeypatch.setitem(partitioner.native_parts, "combined", native)
        assert combined_row([*made]) == expected == ["cost", "acme", 0, 0.75, 3, 10, 30, 0, None, [
            [3, 0.5, 1, 10, 10], [4, 0.25, 2, 15, 15]]]  # fmt: skip
