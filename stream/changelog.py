"""Kafka records sent without Faust's topic layer, and table changes written once per flush interval.

Faust writes one changelog record for every `table[key] = value`, through
its topic layer and a `FutureMessage` per record: ~150 µs a record, which was
most of the worker's time (BENCHMARKS.md). The job changes the same window
key many times in a burst, and only the last value matters to a recovery. So
the agent updates the table's store at once, remembers the changed keys, and
after each batch of events writes each changed key once, straight to
aiokafka's producer.

Why this keeps exactly-once accounting: Faust acks the events of a
`take_events` batch only after the agent's loop body returns, and flushes the
producer before it commits any acked offset. The body ends by handing every
pending change to the producer, so a committed offset always has its changes
in the changelog. A crash in between replays the batch, and the marks inside
each value (`WindowTotals.applied`) recognise what the changelog already holds.

A record cache, as Kafka Streams keeps one: with a flush interval
(`BURNGUARD_CHANGELOG_FLUSH_MS`) the changes stay pending across batches and
each changed key is written once per interval, not once per batch. Faust
still acks every batch, so its commits are capped instead: `write` returns,
per partition, the offset below which every processed record's changes are
now in the producer, and `stream/takeover.py:InOrderReads` never lets Faust
commit past it (Faust flushes the producer before it commits). A crash then
replays from a commit whose changes are all in the changelog, as before.
Before a rebalance hands the partitions away the pending changes are written
and flushed, so the next owner recovers them (`BudgetJob._on_revoked`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from faust.serializers import codecs
from faust.types import TP, AppT, CollectionT

#: The producer's record batch size at most (`producer_max_batch_size`): a burst of changelog
#: records or snapshots fills few batches, and the broker accepts 1 MiB by default.
MAX_BATCH_BYTES = 512 * 1024
#: Kafka record headers, as aiokafka takes them.
Headers = list[tuple[str, bytes]]


class PendingRecords:
    """Records for many (topic, partition)s, handed to aiokafka's producer together on `send`.

    Skips Faust's topic layer (a `FutureMessage`, a callback and a buffer
    per record). aiokafka's own `send` appends to the partition's open batch;
    its `send_batch` would wait for the previous batch of the partition to be
    drained, one produce round trip, which under load delayed every signal.

    One per agent (shared with its changelog-flush timer: a `send` takes only
    what was added before it). A signal goes out with the `send` right after
    its `add`; table changes need no `send` before the ack, as commits wait
    for `TableChanges.write` (module doc).
    """

    def __init__(self, app: AppT) -> None:
        self.app = app
        self._pending: list[tuple[str, int | None, bytes | None, bytes | None, Headers | None]] = []

    def add(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
    ) -> None:
        """Queue a record; partition None leaves it to the default partitioner (murmur2 of the key)."""
        self._pending.append((topic, partition, key, value, headers))

    async def send(self) -> None:
        """Hand every pending record to the producer (delivered by its next flush at the latest)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust runs
        for topic, partition, key, value, headers in pending:
            await producer.send(topic, value, key=key, partition=partition, headers=headers)


def encode(serializer: str, value: Any) -> bytes:
    """`value` as Faust's codec `serializer` writes it; JSON without Faust's encoder, 2-5x faster.

    Faust's JSON encoder checks every value against a list of types it can
    convert; the tables here hold JSON types and objects with `__json__`.
    """
    if serializer == "json":
        return json.dumps(value, default=_faust_json, separators=(",", ":")).encode()
    return codecs.dumps(serializer, value)


def _faust_json(value: Any) -> Any:
    if hasattr(value, "__json__"):
        return value.__json__()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class TableChanges:
    """Changes to Faust tables, applied to their stores at once and to their changelogs in batches.

    `partition` is the partition of the event being processed: a table is
    co-partitioned with the topic it is changed from, so a key's changelog
    records must go where the worker that owns that partition will recover
    them from.

    `flush_interval_s` is how long changes may stay pending (0: written after
    every batch); see the module doc for what makes that safe.
    """

    def __init__(self, app: AppT, flush_interval_s: float = 0.0) -> None:
        self.records = PendingRecords(app)
        self.partition = 0
        self.flush_interval_s = flush_interval_s
        self._changed: dict[tuple[CollectionT, int], dict[Any, Any]] = defaultdict(dict)
        #: per source partition, the offset after the last record whose processing has finished
        self._processed: dict[TP, int] = {}
        self._last_write = time.monotonic()
        self._writing: asyncio.Lock | None = None

    def set(self, table: CollectionT, key: str, value: Any) -> None:
        """Change a key; its record moves behind the batch's other changes (see `stream/eviction.py`)."""
        table.data[key] = value
        changed = self._changed[(table, self.partition)]
        changed.pop(key, None)
        changed[key] = value

    def delete(self, table: CollectionT, key: str) -> None:
        if table.data.pop(key, None) is not None:
            self._changed[(table, self.partition)][key] = None

    def take_records(self) -> list[tuple[str, int, bytes, bytes | None]]:
        """(changelog topic, partition, key, value) of each changed key's latest value, once.

        A deleted key's value is None: a tombstone, as Faust writes one.
        """
        changed, self._changed = self._changed, defaultdict(dict)
        records = []
        for (table, partition), values in changed.items():
            topic = table.changelog_topic.get_topic_name()
            key_serializer = table.key_serializer or table.app.conf.key_serializer
            value_serializer = table.value_serializer or table.app.conf.value_serializer
            for key, value in values.items():
                encoded = None if value is None else encode(value_serializer, value)
                records.append((topic, partition, encode(key_serializer, key), encoded))
        return records

    def processed(self, tp: TP, offset: int) -> None:
        """The record at `offset` of `tp` is fully processed: its changes are all pending or written."""
        if offset >= self._processed.get(tp, 0):
            self._processed[tp] = offset + 1

    def due(self) -> bool:
        """Whether the flush interval has passed since the last write."""
        return time.monotonic() - self._last_write >= self.flush_interval_s

    async def write(self) -> dict[TP, int]:
        """Hand the changed keys' records to the producer; per partition, the offset they now cover.

        Every record below the returned offset of its partition has its
        changes in the producer once this returns. One write at a time: two
        interleaved ones could put a key's older value after its newer one.
        """
        if self._writing is None:
            self._writing = asyncio.Lock()
        async with self._writing:
            covered = dict(self._processed)  # taken with the records: nothing runs in between
            for record in self.take_records():
                self.records.add(*record)
            self._last_write = time.monotonic()
            await self.records.send()
            return covered

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop what is kept for partitions this worker no longer reads."""
        for tp in tps:
            self._processed.pop(tp, None)
