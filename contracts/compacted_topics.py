"""Reading burnguard's compacted topics: the latest value per key is the current state.

`burnguard.signals` (read by every BudgetGuard) and `burnguard.budgets`
(read by every stream worker and by the CLI) are compacted: a reader that
starts from the beginning and reads to the end knows the whole current state,
and then follows changes. Every reader needs all partitions, so no consumer
group: partitions are assigned by hand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from burnguard.contracts.fetched_batches import use_native_batches
from burnguard.contracts.topics import KafkaSettings
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

logger = logging.getLogger(__name__)
RecordHandler = Callable[[bytes | None, bytes | None], None]
#: Given the consumer and each partition's end offset, where to start reading some of them (others:
#: the beginning).
StartOffsets = Callable[[KafkaConsumer, dict[int, int]], dict[int, int]]


def _consumer(
    kafka: KafkaSettings, client_id: str, options: Mapping[str, Any] | None = None
) -> KafkaConsumer:
    """A reader of current state: an offset out of range (records deleted before it) goes back to
    the earliest left, never on to the end past records not yet read (kafka-python's default).

    `client_id` names it to the broker and names its IO thread (`kafka-io-<client_id>`);
    `options`, more consumer settings (a follower's `consumer_options`). It parses its fetches with
    aiokafka's C reader where that is installed (`fetched_batches`): a worker reads back every
    signal it publishes, and kafka-python's own reader holds the GIL ~5 us a record.
    """
    consumer = KafkaConsumer(
        **kafka.kafka_python_config(),
        **(options or {}),
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    use_native_batches(consumer)
    return consumer


def _assign_from_beginning(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    """Assign every partition of `topic` at offset 0; return the end offsets at this moment."""
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(partitions)
    if partitions:
        consumer.seek_to_beginning(*partitions)
    return consumer.end_offsets(partitions) if partitions else {}


def _start_from(
    consumer: KafkaConsumer, end_offsets: dict[TopicPartition, int], start_at: StartOffsets
) -> dict[int, int]:
    """Move the partitions `start_at` names to the offsets it gives (it has applied what is before)."""
    starts = start_at(consumer, {tp.partition: end for tp, end in end_offsets.items()})
    for tp in end_offsets:
        if (offset := starts.get(tp.partition)) is not None:
            consumer.seek(tp, offset)
    return {tp.partition: starts[tp.partition] for tp in end_offsets if tp.partition in starts}


def _caught_up(consumer: KafkaConsumer, end_offsets: dict[TopicPartition, int]) -> bool:
    return all(consumer.position(tp) >= end for tp, end in end_offsets.items())


def read_compacted_topic(kafka: KafkaSettings, topic: str, timeout_s: float = 15.0) -> dict[bytes, bytes]:
    """The current state of a compacted topic: the latest value of each key, tombstones applied."""
    consumer = _consumer(kafka, "burnguard-read-state")
    state: dict[bytes, bytes] = {}
    try:
        end_offsets = _assign_from_beginning(consumer, topic)
        deadline = time.monotonic() + timeout_s
        while not _caught_up(consumer, end_offsets):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f}s")
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    if record.value is None:
                        state.pop(record.key, None)
                    else:
                        state[record.key] = record.value
    finally:
        consumer.close()
    return state


class CompactedTopicFollower:
    """Replays a compacted topic from the start, then follows it, on a daemon thread.

    `on_record(key, value)` is called for every record in order (value None
    for a tombstone). `ready` is set once the records present at start have
    been replayed. `start_at`, if given, is asked at each start where to begin
    reading some partitions, having applied what comes before (a checkpoint).
    A lost connection is retried; the replay then starts over, which is
    harmless because applying the latest state twice is idempotent.
    """

    #: More settings of the follower's consumer. None here: the broker answers a fetch as soon as
    #: it has a record (`fetch_min_bytes` 1), so a guard hears of a signal one round trip after it
    #: is written; a subclass that can wait sets larger fetches (`SignalCheckpointWriter`).
    consumer_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: How long a poll waits for records: the thread sees `stop` and runs `_after_poll` this often.
    poll_timeout_ms: ClassVar[int] = 200

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        on_record: RecordHandler | None,
        name: str,
        start_at: StartOffsets | None = None,
    ) -> None:
        self._kafka = kafka
        self.topic = topic
        self._on_record = on_record
        self._start_at = start_at
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.failed_records = 0  # records the handler raised on: logged and passed over
        #: partition -> next offset to read: where a checkpoint started it, or after the last poll
        #: whose records were all applied (a reader resuming there holds everything before it)
        self.positions: dict[int, int] = {}
        #: the current connection's replay has reached the ends it found (`ready` stays set from the
        #: first one; after a lost connection the replay starts over, behind what was read before)
        self.replayed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, wait_s: float = 10.0) -> CompactedTopicFollower:
        if not self._thread.is_alive():
            self._thread.start()
        if wait_s:
            self.ready.wait(wait_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop following; wait up to `timeout_s` for the (daemon) thread, which may be connecting."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaError as exc:
                logger.warning("burnguard: lost %s (%s); retrying", self.topic, exc)
                self._stop.wait(1.0)
            except Exception:  # the thread is its reader's only source of state: never end it
                logger.exception("burnguard: error following %s; retrying", self.topic)
                self._stop.wait(1.0)

    def _follow(self) -> None:
        consumer = _consumer(self._kafka, self._thread.name, self.consumer_options)
        self.replayed = False
        try:
            end_offsets = self._wait_for_partitions(consumer)
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=self.poll_timeout_ms).values():
                    for record in records:
                        self._deliver(record)
                if not self.replayed and _caught_up(consumer, end_offsets):
                    self.replayed = True
                    self.ready.set()
                self.positions.update((tp.partition, consumer.position(tp)) for tp in end_offsets)
                self._after_poll(consumer)
        finally:
            consumer.close()

    def _deliver(self, record: ConsumerRecord) -> None:
        """Hand one record to the handler; one it raises on is logged and passed over.

        The follower is its reader's only source of state: a handler that raised once would
        end the thread, and a guard would then allow every call for the rest of the process.
        """
        try:
            self._apply(record)
        except Exception:
            self.failed_records += 1
            logger.exception(
                "burnguard: could not apply a record of %s (key %.200r); passed over", self.topic, record.key
            )

    def _apply(self, record: ConsumerRecord) -> None:
        """Apply one record (a subclass given no `on_record` overrides this)."""
        assert self._on_record is not None
        self._on_record(record.key, record.value)

    def _after_poll(self, consumer: KafkaConsumer) -> None:
        """Called on the thread after each poll's records are applied; a subclass's periodic work."""

    def _wait_for_partitions(self, consumer: KafkaConsumer) -> dict[TopicPartition, int]:
        while not self._stop.is_set():
            if consumer.partitions_for_topic(self.topic):
                end_offsets = _assign_from_beginning(consumer, self.topic)
                if self._start_at is not None and end_offsets:
                    # the reader holds what is before these now, even if no poll follows
                    self.positions.update(_start_from(consumer, end_offsets, self._start_at))
                return end_offsets
            self.ready.set()  # the topic does not exist yet: nothing to replay
            self._stop.wait(0.5)
        return {}
