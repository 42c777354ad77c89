"""Kafka records sent without Faust's topic layer, and table changes written once per batch of events.

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
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from faust.serializers import codecs
from faust.types import AppT, CollectionT

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

    One per agent: an agent acks its events once its own `send` returns, so
    no other agent's `send` may be holding its records then.
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
    """

    def __init__(self, app: AppT) -> None:
        self.records = PendingRecords(app)
        self.partition = 0
        self._changed: dict[tuple[CollectionT, int], dict[Any, Any]] = defaultdict(dict)

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

    async def write(self) -> None:
        """Hand the changed keys' records to the producer; call it before the events are acked."""
        for record in self.take_records():
            self.records.add(*record)
        await self.records.send()
