"""The records of the internal usage topic (stage 1 -> stage 2), their fields named.

Stage 1 sends these kinds of record, each to the usage partition that holds its keys' state
(`stream/partitioner.py`): `batches` (the deltas and context observations of every OTLP message
of one stage-1 micro-batch for that partition, each message's rows a sub-batch with its own
source offset, or a group of messages' rows summed per key with each message's part as a step:
`GroupRows`), `ticks` (keys
to re-decide), `removals` (keys of a removed budget) and `sweep` (the clock by which the
partition forgets state nothing can count in, `stream/eviction.py`).
A `batch` (one message's rows) is what stage 1 sent before micro-batches; stage 2 still reads it. On
the wire a record is a JSON object and each row in it a JSON list, exactly as before these
shapes had names: a worker of either version reads the other's records during a rolling
upgrade. Rows are lists, not objects, because a batch holds up to `BATCH_ROWS` of them.

Legacy records. Before batch records (commit 54298bf, 2026-11-28) stage 1 sent one record per
key: a delta as an object, `{"tick": true, ...}`, `{"removed": true, ...}` or
`{"kind": "context", ...}` (`RECORD_VERSION_SINGLE`). Before the call mix (commit 73411b7,
2026-11-28) a delta row had no `mix` field (`DELTA_ROW_FIELDS_BEFORE_MIX`). Both are still
read, because such records may wait in the usage topic across an upgrade. Support for them can
go once no worker older than those commits runs and the usage topic's retention has passed
since the last one stopped (Kafka's default: 7 days).

`batches` (2026-12-01) is not read by a worker older than it: during a rolling upgrade such a
worker parks it on the dead-letter topic (not counted). Upgrade every worker together. Nor is
`groups` (2026-12-02): a `batches` record holding a combined row (its tenth field), under a kind
of its own so that an older worker parks the record whole rather than counting its rows up to the
first combined one and then failing; a rolling upgrade from an older worker runs with
`BURNGUARD_COMBINE_MESSAGES=false` until every worker reads it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple, Protocol

import msgspec
from burnguard.contracts.otlp import NATIVE_ERRORS
from burnguard.stream.partitioner import native_part
from faust.serializers import codecs

logger = logging.getLogger(__name__)

BATCH, BATCHES, TICKS, REMOVALS, SWEEP = "batch", "batches", "ticks", "removals", "sweep"
#: A `BATCHES` record with combined rows (`GroupRows`): read as one, named apart for older workers.
GROUPS = "groups"
#: The usage topic's records by version: 1, one record per key; 2, `BATCH`/`TICKS`/`REMOVALS`
#: (and `SWEEP`, added with eviction, and `BATCHES`, with stage 1's micro-batches: a worker without
#: them parks such a record on the dead-letter topic).
RECORD_VERSION_SINGLE = 1
RECORD_VERSION = 2
_CURRENT_KINDS = frozenset((BATCH, BATCHES, GROUPS, TICKS, REMOVALS, SWEEP))
#: The fields of a delta row written before the call mix existed (no `mix`), and of one now.
DELTA_ROW_FIELDS_BEFORE_MIX = 8
DELTA_ROW_FIELDS = 9
#: A combined row (`GroupRows`): a delta row's fields, its mix written even when None, then its
#: origin: the offset of the one message that made it, or the per-message `Step`s it sums.
DELTA_ROW_FIELDS_WITH_STEPS = 10


def record_version(record: dict[str, Any]) -> int:
    """The version of a usage record: its `kind` says it (version 1 records have another or none)."""
    return RECORD_VERSION if record.get("kind") in _CURRENT_KINDS else RECORD_VERSION_SINGLE


class DeltaRow(NamedTuple):
    """What one OTLP message added to one budget key in one window (a row of a batch record).

    The source (partition, offset) of the message is the batch's, so it is not repeated.
    """

    budget: str
    key: str
    window_start_ns: int
    amount: float
    spans: int
    first_event_ns: int
    last_event_ns: int
    bucket_ns: int  # rolling windows: the size of their time buckets; 0 otherwise
    #: The call mix (`accounting.MIX_*`); None for tool-call budgets and rows written before it.
    mix: list[float] | None = None

    def to_wire(self) -> list[Any]:
        """The JSON list; without the mix when there is none, as the rows always were."""
        return list(self) if self.mix is not None else list(self[:DELTA_ROW_FIELDS_BEFORE_MIX])

    @classmethod
    def from_wire(cls, row: list[Any]) -> DeltaRow:
        """A row as sent; one written before the call mix reads with `mix` None (the default)."""
        return cls(*row)


class Step(NamedTuple):
    """One message's own contribution to a combined row: what its row alone would have carried.

    Stage 2 applies a combined row step by step wherever that could differ from applying its sum
    (a step already counted, a rung crossed): exactly as the messages' own rows would be applied.
    On the wire (`to_wire`) a step is `[offset, amount, spans, first_event_ns, last - first]`, and
    its call mix only when it is not a plain one's (`spans` calls made, nothing else; null: none,
    in a row with one): a step is most of a combined row's bytes, and most steps are a few plain calls.
    """

    source_offset: int
    amount: float
    spans: int
    first_event_ns: int
    last_event_ns: int
    mix: list[float] | None = None

    @classmethod
    def from_wire(cls, step: list[Any], counts_calls: bool) -> Step:
        """A step of a row whose budget counts model calls (`counts_calls`: the row has a mix) or not."""
        offset, amount, spans, first_ns, span_ns, *mix = step
        if mix:
            return cls(offset, amount, spans, first_ns, first_ns + span_ns, mix[0])
        plain = [float(spans), 0.0, 0.0, 0.0] if counts_calls else None  # as `_settle_call_mix` makes it
        return cls(offset, amount, spans, first_ns, first_ns + span_ns, plain)


def message_rows(row: list[Any], source: tuple[int, int]) -> list[tuple[tuple[int, int], DeltaRow]]:
    """The (source, row) of each message a delta row stands for, in offset order.

    A plain row is its sub-batch's message's; a combined row (`DELTA_ROW_FIELDS_WITH_STEPS`)
    names one message's offset, or carries the `Step`s of several.
    """
    if len(row) != DELTA_ROW_FIELDS_WITH_STEPS:
        return [(source, DeltaRow.from_wire(row))]
    origin = row[-1]
    if isinstance(origin, int):
        return [((source[0], origin), DeltaRow(*row[:DELTA_ROW_FIELDS]))]
    return [((source[0], step[0]), step_row(row, step)) for step in origin]


def step_row(row: list[Any], step: list[Any]) -> DeltaRow:
    """The delta row one step (as on the wire) of a combined row stands for: its message's own row.

    `Step.from_wire`'s fields without the `Step` (one per step stage 2 applies alone, most of
    them publishing: the named tuple was a tenth of handing such a step back, BENCHMARKS.md, hSig).
    """
    _, amount, spans, first_ns, span_ns, *own_mix = step
    plain = row[8] is not None and not own_mix  # as `Step.from_wire`
    mix = own_mix[0] if own_mix else [float(spans), 0.0, 0.0, 0.0] if plain else None
    return DeltaRow(row[0], row[1], row[2], amount, spans, first_ns, first_ns + span_ns, row[7], mix)


class RowGroup(Protocol):
    """What stage 1 asks of a source partition's group: `GroupRows`, or the native `Groups`."""

    @property
    def last_offset(self) -> int: ...

    def add(self, offset: int, rows: Any) -> None: ...

    def rows(self) -> list[tuple[list[Any], int]]: ...


class GroupRows:
    """A source partition's consecutive messages' delta rows, combined into one row per key.

    Each message's rows are what it would send alone (`usage_rows` over its spans). A key that
    one message touched keeps that message's row (with its offset unless it is the group's
    last); a key that several touched gets their sum, and the `Step` of each, in offset order:
    stage 2 can then apply it exactly as the messages' own rows (docs/ARCHITECTURE.md §7).
    The reference of the native `Groups` (`new_group_rows`), which must make the same wire rows.
    """

    __slots__ = ("_rows", "last_offset")

    def __init__(self) -> None:
        self.last_offset = -1
        #: (budget, key, window start) -> [offset, row, offset, row, ...] of the messages that made one
        self._rows: dict[tuple[str, str, int], list[Any]] = {}

    def add(self, offset: int, rows: list[list[Any]]) -> None:
        """A message's rows, messages in offset order."""
        self.last_offset = offset
        found = self._rows
        for row in rows:
            slot = (row[0], row[1], row[2])
            made = found.get(slot)
            if made is None:
                found[slot] = [offset, row]
            else:
                made += (offset, row)

    def rows(self) -> list[tuple[list[Any], int]]:
        """(wire row, its weight: 1 + its steps) of every key, in the order keys first appeared.

        Once per group: a one-message row not at the group's last offset gets its offset appended
        in place (the rows are the group's own, as `usage_rows` made them for it).
        """
        last = self.last_offset
        out = []
        for made in self._rows.values():
            if len(made) > 2:
                out.append((combined_row(made), 1 + len(made) // 2))
                continue
            offset, row = made
            if offset != last:  # the row is this group's own (`usage_rows` made it): extended in place
                row += (offset,) if len(row) > DELTA_ROW_FIELDS_BEFORE_MIX else (None, offset)
            out.append((row, 1))
        return out


def new_group_rows() -> RowGroup:
    """A source partition's group for one micro-batch: the native module's `Groups` where it is
    built and in use (the decoder's choice, `BURNGUARD_NATIVE`), else `GroupRows`, the reference.

    Both take a message's rows as `usage_rows`' lists and give the same wire rows; the native one
    also takes the native loop's own rows (`accounting.usage_rows_detached`), so that per (message,
    key) no Python row is made at all (contracts/native/src/groups.rs).
    """
    native = native_part("Groups")
    return GroupRows() if native is None else native(combined_row)


def native_groups_in_use() -> bool:
    """Whether `new_group_rows` makes native groups (which take `MessageRows`)."""
    return native_part("Groups") is not None


def combined_row(made: list[Any]) -> list[Any]:
    """`_combined(made)`, by the native module's `combined` where it is built and in use.

    The native loop (contracts/native/src/combine.rs) takes the rows stage 1 makes (float amounts
    and mixes, int counts and times) and answers None for anything else, which the reference
    (`_combined`) then makes; so does a call that raises (it changes nothing). Per (message, key)
    row it is what remained of the combining's Python work (BENCHMARKS.md, "Stage 1's per-message rest").
    """
    native = native_part("combined")
    if native is not None:
        try:
            row = native(made)
        except NATIVE_ERRORS as exc:  # a panic must not end the worker: the reference combines
            logger.error("native combining failed, the Python loop combines: %r", exc)
            row = None
        if row is not None:
            return row
    return _combined(made)


def _combined(made: list[Any]) -> list[Any]:
    """The row of a key several messages touched: their sums (spans, event range, mix) and steps.

    Each message's step is `[offset, amount, spans, first_ns, last - first]`, then its mix unless
    it is a plain one's (`[spans, 0, 0, 0]`: what a missing mix reads as); a row without a mix in a
    combined row with one (a budget's metric changed within the micro-batch) says so with an
    explicit null. One loop, no call per step: a micro-batch of small messages makes ~4 steps per
    row, and this was a fifth of stage 1 (BENCHMARKS.md, "Stage 1's per-message rest").
    """
    rows = made[1::2]
    counts_calls = False
    for row in rows:
        if len(row) > DELTA_ROW_FIELDS_BEFORE_MIX and row[DELTA_ROW_FIELDS_BEFORE_MIX] is not None:
            counts_calls = True
            break
    steps = []
    total: list[float] | None = None
    amount, spans, first_ns, last_ns = 0.0, 0, 0, 0
    for offset, row in zip(made[0::2], rows, strict=True):
        row_amount, row_spans, row_first, row_last = row[3], row[4], row[5], row[6]
        step = [offset, row_amount, row_spans, row_first, row_last - row_first]
        amount += row_amount
        spans += row_spans
        if row_first and (not first_ns or row_first < first_ns):
            first_ns = row_first
        if row_last > last_ns:
            last_ns = row_last
        mix = row[DELTA_ROW_FIELDS_BEFORE_MIX] if len(row) > DELTA_ROW_FIELDS_BEFORE_MIX else None
        if mix is None:
            if counts_calls:
                step.append(None)
        else:
            if mix[0] != row_spans or mix[1] or mix[2] or mix[3]:  # not plain: [spans, 0, 0, 0]
                step.append(mix)
            if total is None:
                total = list(mix)
            elif len(total) == len(mix) == 4:  # a call mix (`accounting.MIX_FIELDS`): unrolled
                total[0] += mix[0]
                total[1] += mix[1]
                total[2] += mix[2]
                total[3] += mix[3]
            else:
                for field, value in enumerate(mix):
                    total[field] += value
        steps.append(step)
    head = made[1]
    return [head[0], head[1], head[2], amount, spans, first_ns, last_ns, head[7], total, steps]


class ContextRow(NamedTuple):
    """A session's model-call input sizes in event order, for one context guard."""

    guard: str
    session: str
    inputs: list[int]


class BatchRecord(NamedTuple):
    """One OTLP message's rows for one usage partition; the message is the rows' source."""

    source_partition: int
    source_offset: int
    deltas: list[list[Any]]  # `DeltaRow.to_wire()` each
    contexts: list[list[Any]]  # `ContextRow` each, as a list

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": BATCH,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "deltas": self.deltas,
            "contexts": self.contexts,
        }

    @classmethod
    def from_wire(cls, record: dict[str, Any]) -> BatchRecord:
        return cls(record["source_partition"], record["source_offset"], record["deltas"], record["contexts"])

    @property
    def source(self) -> tuple[int, int]:
        return self.source_partition, self.source_offset


def batches_record(batches: list[BatchRecord], combined: bool = False) -> dict[str, Any]:
    """A `BATCHES` record: the sub-batches of many OTLP messages for one usage partition, in order.

    Each sub-batch keeps its own message's source, so stage 2's per-key replay check
    (`WindowTotals.add`) is exactly what it is for one `batch` record per message. `combined`:
    some row is a group's (`DELTA_ROW_FIELDS_WITH_STEPS`), and the record is a `GROUPS` one.
    """
    return {"kind": GROUPS if combined else BATCHES, "batches": [list(batch) for batch in batches]}


#: `encode("json", record)` of `stream/changelog.py` for records of JSON types only, without the
#: check for containers that hold themselves (a dict and a look-up per row and per call mix).
_ENCODE_RECORD = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
#: msgspec's JSON encoder: 5x the stdlib's on a record of a thousand rows (its floats written by
#: `repr` were 6% of the worker's main thread). Not orjson: Faust would adopt it (`changelog.py`).
_ENCODE_RECORD_FAST = msgspec.json.Encoder().encode


def encode_record(record: dict[str, Any]) -> bytes:
    """A usage record as stage 1 sends it: JSON that stage 2 (Faust's JSON codec) reads back as the
    stdlib encoder's, floats bit for bit.

    Stage 1 encodes one `BATCHES` record per usage partition per micro-batch, each with up to
    `BATCH_ROWS` rows of plain lists, strings and numbers. msgspec writes text as UTF-8 where the
    stdlib escapes it, and `1e16` for `1e+16`: other bytes, the same values. What it refuses (a
    lone surrogate) the stdlib writes. A non-finite float it writes as null, where the stdlib
    wrote NaN, which stage 2 summed into a window for good. None reaches a row (every amount is
    a sum of span values `contracts/span_checks.py` bounded); if one did, its null amount fails
    the record loudly (dead-lettered with its reason) instead (`test_usage_records`).
    """
    try:
        return _ENCODE_RECORD_FAST(record)
    except (TypeError, ValueError, UnicodeEncodeError):
        return _ENCODE_RECORD(record).encode()


class UsageRecordsJson(codecs.json):
    """Faust's JSON codec, decoding with msgspec: stage 2 reads every usage record through it.

    The stdlib decoder was ~4% of the worker's event loop with small OTLP messages (many steps
    per span). For every input msgspec accepts it gives what `json.loads` gives (ints of any
    size, floats bit for bit, dicts with the last of a repeated key); what it refuses (NaN and
    Infinity, a number past a float's range, a lone surrogate escape, bytes that are not UTF-8)
    goes to Faust's own decoding, which reads it or fails as before (`test_usage_records`).
    Encoding (the timers' ticks and sweeps, `usage_topic.send`) is Faust's.

    Where the native module is in use, a `batches` or `groups` record in stage 1's exact shape is
    not decoded into lists at all: it comes as the native `UsageRecord` (contracts/native/src/
    record.rs), its rows read from the bytes for the native `TotalsRows.add_record`; each row
    that path hands back is decoded here (`decoded`). Building and freeing the Python lists of
    every row and step was most of stage 2's decoding and garbage (BENCHMARKS.md, issue 16).
    """

    def _loads(self, s: bytes) -> Any:
        parse = native_part("UsageRecord")
        if parse is not None and type(s) is bytes and (record := parse.parse(s)) is not None:
            return record
        return decoded(s)


_DECODE_RECORD = msgspec.json.Decoder().decode
_FAUST_JSON = codecs.json()


def decoded(s: bytes) -> Any:
    """A usage record's (or a row's) JSON decoded into Python values: msgspec, or Faust's own
    decoding for what msgspec refuses (see `UsageRecordsJson`)."""
    try:
        return _DECODE_RECORD(s)
    except msgspec.DecodeError:
        return _FAUST_JSON._loads(s)


def native_record(value: Any) -> bool:
    """Whether a usage topic value is a record the native module read from its bytes (`UsageRecord`)."""
    parse = native_part("UsageRecord")
    return parse is not None and type(value) is parse


#: The usage topic's value serializer: `UsageRecordsJson`, in Faust's codec registry under this name.
USAGE_RECORDS_CODEC = "burnguard-usage-json"
codecs.register(USAGE_RECORDS_CODEC, UsageRecordsJson())


def sub_batches(record: dict[str, Any]) -> list[BatchRecord]:
    """The sub-batches of a `BATCHES` record, in the order stage 1 read their messages."""
    return [BatchRecord(*batch) for batch in record["batches"]]


class MicroBatch:
    """Stage 1's output for one micro-batch: per usage partition, `BATCHES` records in message order.

    A record holds at most `max_rows` delta rows and context observations together, unless one
    message's sub-batch alone has more (its deltas are split at `max_rows` into sub-batches of the
    same source, as its `batch` records were), so no record nears Kafka's limit. Observations count
    too: a micro-batch of sessions under context guards can hold few deltas and thousands of
    observations (uncounted, past the producer's 1 MB request limit in one record).
    A sub-batch is a `BatchRecord`, or the JSON a native group wrote for it (`add_encoded`).
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        #: usage partition -> its records, each a list of sub-batches and [its rows and observations,
        #: whether one of its rows is combined]
        self._records: dict[int, list[tuple[list[BatchRecord | bytes], list[int]]]] = {}

    def add(self, partition: int, batch: BatchRecord, steps: int = 0, combined: bool = False) -> None:
        """Append one message's sub-batch (at most `max_rows` delta rows) for `partition`.

        `steps`: the `Step`s its combined rows carry, each weighed as a row (a step is a third
        of a row's bytes; a key summed over 2,000 messages carries 2,000). `combined`: one of its
        rows is a group's, so its record is a `GROUPS` one.
        """
        self._add(partition, batch, len(batch.deltas) + len(batch.contexts) + steps, combined)

    def add_encoded(self, partition: int, sub_batch: bytes, size: int, combined: bool) -> None:
        """`add` for a sub-batch as its JSON (`group_sub_batches`): `size` its rows and steps."""
        self._add(partition, sub_batch, size, combined)

    def _add(self, partition: int, batch: BatchRecord | bytes, size: int, combined: bool) -> None:
        records = self._records.setdefault(partition, [])
        if not records or records[-1][1][0] + size > self.max_rows:
            records.append(([], [0, 0]))
        batches, rows = records[-1]
        batches.append(batch)
        rows[0] += size
        rows[1] |= combined

    def records(self) -> list[tuple[int, dict[str, Any]]]:
        """(usage partition, `BATCHES` or `GROUPS` record) for everything added, partitions in order."""
        return [
            (partition, batches_record([_sub_batch(batch) for batch in batches], bool(rows[1])))
            for partition, records in sorted(self._records.items())
            for batches, rows in records
        ]

    def encoded_records(self) -> list[tuple[int, str, bytes]]:
        """(usage partition, kind, `encode_record` of the record) of each of `records`, in their order.

        A record of sub-batches a native group wrote is their JSON joined, not decoded and encoded.
        """
        return [
            (partition, GROUPS if rows[1] else BATCHES, encoded_batches(batches, bool(rows[1])))
            for partition, records in sorted(self._records.items())
            for batches, rows in records
        ]


def _sub_batch(batch: BatchRecord | bytes) -> Any:
    """A sub-batch as its list: a native group's JSON decoded (the values msgspec wrote)."""
    return decoded(batch) if type(batch) is bytes else batch


def encoded_batches(batches: list[BatchRecord | bytes], combined: bool) -> bytes:
    """`encode_record(batches_record(batches, combined))`, the JSON of sub-batches a native group
    wrote (`group_sub_batches`) taken as it is.

    msgspec writes a record's list as its items' JSON joined by commas, so a record is its head
    and its sub-batches' JSON, each written alone. A sub-batch msgspec refuses (a lone surrogate)
    makes the whole record the stdlib encoder's, as `encode_record` writes it: then the native
    sub-batches are decoded into the values they hold and the record is encoded whole.
    """
    if not any(type(batch) is bytes for batch in batches):
        return encode_record(batches_record(batches, combined))  # type: ignore[arg-type]
    try:
        parts = [batch if type(batch) is bytes else _ENCODE_RECORD_FAST(list(batch)) for batch in batches]
    except (TypeError, ValueError, UnicodeEncodeError):
        return encode_record(batches_record([_sub_batch(batch) for batch in batches], combined))
    head = _GROUPS_HEAD if combined else _BATCHES_HEAD
    return b"".join((head, b",".join(parts), b"]}"))


_GROUPS_HEAD = b'{"kind":"' + GROUPS.encode() + b'","batches":['
_BATCHES_HEAD = b'{"kind":"' + BATCHES.encode() + b'","batches":['


def group_sub_batches(
    group: RowGroup, source_partition: int, partitions: int, max_rows: int
) -> list[tuple[int, bytes, int, bool]] | None:
    """A native group's sub-batches as `BudgetJob._close_group` makes them from its rows, written
    natively: (usage partition, JSON, rows and steps, whether combined) each; None for `GroupRows`
    (the reference), or a group the native writer cannot vouch for (then the caller makes its rows).

    contracts/native/src/sub_batches.rs: no Python list per key, no hashing of `budget|key` and
    no encoding of the rows in Python (a sixth of stage 1 per realistic message, BENCHMARKS.md).
    """
    native = native_part("group_sub_batches")
    if native is None or type(group) is GroupRows:
        return None
    try:
        return native(group, source_partition, partitions, max_rows)
    except NATIVE_ERRORS as exc:  # a panic must not end the worker: the reference path sends the group
        logger.error("native sub-batches failed, the Python path makes them: %r", exc)
        return None


class TickRow(NamedTuple):
    """A key to re-decide: refresh its signal, or lift it once its window rolled over."""

    budget: str
    key: str


class RemovalRow(NamedTuple):
    """A key of a removed budget: forget its state, delete its signal."""

    budget: str
    key: str
    scope: str


def keys_record(kind: str, rows: list[Any]) -> dict[str, Any]:
    """A `TICKS` or `REMOVALS` record: `rows` are `TickRow`s or `RemovalRow`s (JSON lists)."""
    return {"kind": kind, "keys": rows}


def tick_rows(record: dict[str, Any]) -> list[TickRow]:
    return [TickRow(*row) for row in record["keys"]]


def removal_rows(record: dict[str, Any]) -> list[RemovalRow]:
    return [RemovalRow(*row) for row in record["keys"]]


class SweepRecord(NamedTuple):
    """Forget this partition's state that nothing can count in at `clock_ns` (`stream/eviction.py`).

    The clock travels in the record, so a replay of the partition decides as the first reading did.
    """

    clock_ns: int

    def to_wire(self) -> dict[str, Any]:
        return {"kind": SWEEP, "clock_ns": self.clock_ns}

    @classmethod
    def from_wire(cls, record: dict[str, Any]) -> SweepRecord:
        return cls(int(record["clock_ns"]))
