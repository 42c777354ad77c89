"""The records of the internal usage topic (stage 1 -> stage 2), their fields named.

Stage 1 sends four kinds of record, each to the usage partition that holds its keys' state
(`stream/partitioner.py`): a `batch` (one OTLP message's deltas and context observations for
that partition), `ticks` (keys to re-decide), `removals` (keys of a removed budget) and
`sweep` (the clock by which the partition forgets state nothing can count in, `stream/eviction.py`). On
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
"""

from __future__ import annotations

from typing import Any, NamedTuple

BATCH, TICKS, REMOVALS, SWEEP = "batch", "ticks", "removals", "sweep"
#: The usage topic's records by version: 1, one record per key; 2, `BATCH`/`TICKS`/`REMOVALS`
#: (and `SWEEP`, added with eviction: a worker without it parks a sweep on the dead-letter topic).
RECORD_VERSION_SINGLE = 1
RECORD_VERSION = 2
_CURRENT_KINDS = frozenset((BATCH, TICKS, REMOVALS, SWEEP))
#: The fields of a delta row written before the call mix existed (no `mix`).
DELTA_ROW_FIELDS_BEFORE_MIX = 8


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
