"""Signals into the producer's open batch of their partition, one delivery future per batch.

A signal must leave at once: enforcement latency matters more than anything the worker does.
aiokafka's `send` appends a record to the open batch of its partition in the producer's
accumulator, which the sender drains with its next request; `send_batch` (`RecordBatches`) would
instead queue a batch behind that one, a round trip later under load. So a signal goes where
`send` puts it, without what `send` costs per record (~3% of the worker's main thread at 0.12
signals per span): its coroutines, the metadata check, a future per record and, at delivery,
setting each. The partition is the producer's own choice for the key (its partitioner, the
worker's `stream/partitioner.py:producer_partitioner`), so a key's signals stay on one partition,
in publish order.

Delivery is checked per batch. Before, a signal whose delivery failed was dropped unseen (its
per-record future was never read: asyncio's "exception never retrieved" at garbage collection
was the only trace) while `signal-states` recorded it as published, so nothing re-published it
before the key's next change or refresh. Now a failed batch is logged and counted, and each of
its signals that is still its key's latest is published again, in a batch of its own (the broker
refuses a batch whole: a record it refuses must not take the others down again), up to
`ATTEMPTS` times in all; one given up is logged and counted too. A newer signal of the key
supersedes a failed one (the compacted topic keeps the latest), so that one is not sent again.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from functools import partial
from typing import Any

from aiokafka.errors import ProducerClosed
from aiokafka.structs import TopicPartition
from burnguard.stream.record_batches import RECORD_OVERHEAD_BYTES, check_size
from faust.types import AppT

logger = logging.getLogger(__name__)

#: How many times a signal is handed to the producer at most (the first time included) while
#: its batches fail: aiokafka itself retries what can be retried for `request_timeout_ms` first.
ATTEMPTS = 3
#: `dict.get`'s default for a key with no signal in flight (None is a tombstone).
_ABSENT = object()


class SignalRecords:
    """Records of one topic appended to the producer's open batch of their partition, as `send` does.

    `publish` hands a record over before it returns (no task, no queue): the next request of the
    producer's sender carries it. Per batch, the records this publisher put in it; per key, the
    latest value not yet delivered (`_latest`), so a failed batch re-publishes only what no newer
    signal replaced.
    """

    def __init__(self, app: AppT, topic: str) -> None:
        self.app = app
        self.topic = topic
        #: records whose batch failed (each failure counted), and those given up after `ATTEMPTS`
        self.failed = 0
        self.given_up = 0
        self._latest: dict[bytes, bytes | None] = {}
        self._attempts: dict[bytes, int] = {}
        self._records: dict[Any, list[tuple[bytes, bytes | None]]] = {}
        self._max_bytes: int | None = None  # the producer's max request size, read at the first append
        #: The producer's metadata of the topic (aiokafka replaces it whole when it changes) and its
        #: partitions as `send` lists them: made once per metadata, not per record.
        self._metadata: Any = None
        self._partitions: list[int] = []
        #: The topic's `TopicPartition` per partition (a named tuple: ~0.4 us to make one per record).
        self._topic_partitions: dict[int, TopicPartition] = {}

    async def publish(self, key: bytes, value: bytes | None) -> None:
        """Append the record to its partition's open batch; waits only for the topic's metadata, once."""
        if not self.publish_at_once(key, value):
            producer = self.app.producer._ensure_producer()
            partitions = await producer.client._wait_on_metadata(self.topic)
            self._append(producer, key, value, list(partitions))

    def publish_at_once(self, key: bytes, value: bytes | None) -> bool:
        """`publish` where the topic's metadata is known (False, nothing done, where it is not): a
        caller that awaits `publish` only then saves a coroutine per signal."""
        producer = self.app.producer._ensure_producer()
        metadata = producer.client.cluster._partitions.get(self.topic)
        if metadata is not self._metadata:  # `partitions_for_topic`'s set, listed as `send` lists it
            self._metadata, self._partitions = metadata, list(set(metadata.keys())) if metadata else []
        if not self._partitions:
            return False
        self._append(producer, key, value, self._partitions)
        return True

    def _append(
        self, producer: Any, key: bytes, value: bytes | None, partitions: list[int], alone: bool = False
    ) -> None:
        """Into the accumulator's newest batch of the partition, or a new one when it is full or none is open.

        The partition is the one `send` picks: the producer's partitioner over the topic's
        partitions (`send` also passes those with a leader, which a partitioner reads only for a
        record without a key; a signal always has one). As `send`: a closed producer raises
        `ProducerClosed`, a failed one its error, a record above `producer_max_request_size`
        `MessageSizeTooLargeError`. `alone`: in a batch of its
        own, closed at once (a record sent again: the broker refuses a batch whole, so a record it
        refuses must not take other signals down with it again).
        """
        accumulator = producer._message_accumulator
        if accumulator._closed:
            raise ProducerClosed()
        if accumulator._exception is not None:
            raise copy.copy(accumulator._exception)
        if (max_bytes := self._max_bytes) is None:
            max_bytes = self._max_bytes = int(self.app.conf.producer_max_request_size)
        if len(key) + (len(value) if value else 0) > max_bytes - RECORD_OVERHEAD_BYTES:
            check_size(self.topic, key, value, max_bytes)
        partition = producer._partitioner(key, partitions, partitions)
        tp = self._topic_partitions.get(partition)
        if tp is None:
            tp = self._topic_partitions[partition] = TopicPartition(self.topic, partition)
        timestamp = int(time.time() * 1000)
        pending = accumulator._batches.get(tp)
        batch = pending[-1] if pending else None
        if alone or batch is None or batch._builder.append(timestamp=timestamp, key=key, value=value) is None:
            builder = accumulator.create_builder()  # none open, the open one is full, or alone: a new batch
            builder.append(timestamp=timestamp, key=key, value=value)
            if alone:
                builder.close()  # later signals open the next batch
            batch = accumulator._append_batch(builder, tp)  # wakes the sender, as for `send`
        records = self._records.get(batch)
        if records is None:
            records = self._records[batch] = []
            batch.future.add_done_callback(partial(self._settle, batch))
        records.append((key, value))
        self._latest[key] = value

    def _settle(self, batch: Any, delivered: asyncio.Future[Any]) -> None:
        """A batch's outcome: its keys settled, or its failure reported and its latest records sent again."""
        records = self._records.pop(batch, [])
        failure = asyncio.CancelledError() if delivered.cancelled() else delivered.exception()
        if failure is None:
            for key, value in records:
                if self._latest.get(key, _ABSENT) is value:
                    del self._latest[key]
                    self._attempts.pop(key, None)
            return
        self.failed += len(records)
        again = [(key, value) for key, value in records if self._latest.get(key, _ABSENT) is value]
        logger.error(
            "%d signals to %s[%d] not delivered (%r): %d sent again",
            len(records), self.topic, batch.tp.partition, failure, len(again),
        )  # fmt: skip
        for key, value in again:
            self._again(key, value, failure)

    def _again(self, key: bytes, value: bytes | None, failure: BaseException) -> None:
        """Hand a failed record over once more; after `ATTEMPTS` hand-overs (or if this one raises) it
        is given up: logged and counted."""
        attempt = self._attempts.get(key, 1) + 1
        if attempt <= ATTEMPTS:
            self._attempts[key] = attempt
            try:
                producer = self.app.producer._ensure_producer()
                partitions = list(producer.client.cluster.partitions_for_topic(self.topic) or ())
                self._append(producer, key, value, partitions, alone=True)
                return
            except Exception as exc:  # a stopped producer, say: nothing will deliver it
                failure = exc
        self.given_up += 1
        self._latest.pop(key, None)
        self._attempts.pop(key, None)
        logger.error("signal %r not published (%d attempts): %r", key[:200], attempt - 1, failure)

    def in_flight(self) -> int:
        """Keys whose latest signal is handed over and not yet delivered."""
        return len(self._latest)
