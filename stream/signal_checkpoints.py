"""The worker's signal checkpoints: what a guard starts from (contracts/signal_checkpoints.py).

Every worker follows `burnguard.signals` on a thread, as a guard does, keeping per partition
the latest record of each key that can still matter, and every `interval` writes what it
keeps with the offset it has read up to. Workers write the same records for the same offsets,
so a second worker's checkpoint only replaces an equal or older one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

from burnguard.contracts.compacted_topics import CompactedTopicFollower
from burnguard.contracts.signal_checkpoints import CLOCK_MARGIN, matters_until, part_key, split_checkpoint
from burnguard.contracts.signals import Signal, signal_of_record
from burnguard.contracts.topics import KafkaSettings, Topics
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

logger = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0
#: The writer's fetches: the broker answers once it holds this many bytes of signals (~500) or
#: after `FETCH_WAIT_MS`. Answered at the first record (a guard's setting), the writer read back
#: the worker's signals a few at a time: 150-270 us of its threads' CPU per signal at 1,000
#: signals/s, every fetch a round trip through kafka-python's IO thread; batched, ~40 us
#: (BENCHMARKS.md, helper hT). A checkpoint records the offset read up to, so reading up to a
#: second later only leaves guards starting from it a second more to replay.
FETCH_MIN_BYTES = 256 << 10
FETCH_WAIT_MS = 1_000


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Kept(NamedTuple):
    """A key's latest record that can still matter, and until when it does.

    One per signal read back, on the writer's thread (which competes with the worker's loop for
    the GIL): a named tuple is made in ~half the time of a frozen dataclass.
    """

    value: bytes
    until: datetime


class PublishedSignals:
    """Until when each signal this worker published matters, by record key, until the checkpoint
    writer reads it back.

    The writer parsed every record it read back (pydantic's validation, ~4 us a signal, a sixth of
    what deciding, sending and reading one back costs the worker). A record whose value is the one
    published here under its key is that signal: `Signal.to_json` parses back to the same `Signal`
    (`tests/test_contracts_signals.py`) under its own key, so the writer takes what it needs of it,
    `matters_until`, from here (`take`) and parses only other records (another worker's, one
    published before the last under the same key, a replay). Shared by the event loop (`note`)
    and the writer's thread (`take`): single dict operations under the GIL; an interleaving at
    worst loses an entry, and that record is parsed. Bounded: past `MAX_KEPT` (records not read
    back yet or never, e.g. a failed delivery; ~1 kB each) it starts afresh.
    """

    MAX_KEPT = 10_000

    def __init__(self) -> None:
        self._published: dict[bytes, tuple[bytes, datetime]] = {}

    def note(self, key: bytes, value: bytes, signal: Signal) -> None:
        """`signal` was handed over as the record (`key`, `value`), `key` its `kafka_key`."""
        if len(self._published) >= self.MAX_KEPT:
            self._published.clear()
        self._published[key] = (value, matters_until(signal))

    def take(self, key: bytes, value: bytes) -> datetime | None:
        """`matters_until` of the signal noted under `key` if `value` is its record (then forgotten);
        else None."""
        entry = self._published.get(key)
        if entry is None or entry[0] != value:
            return None
        if self._published.get(key) is entry:
            self._published.pop(key, None)  # `note` may have cleared the dict meanwhile
        return entry[1]

    def __len__(self) -> int:
        return len(self._published)


class SignalCheckpointWriter(CompactedTopicFollower):
    """Follows the signals topic and writes each partition's checkpoint every `interval`.

    A record a guard would pass over (malformed) leaves the key's previous record in the
    checkpoint, as it leaves the previous restriction in the guard. A write that fails is
    logged and counted and tried again at the next interval; guards meanwhile start from the
    last checkpoint written, or replay.
    """

    consumer_options: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"fetch_min_bytes": FETCH_MIN_BYTES, "fetch_max_wait_ms": FETCH_WAIT_MS}
    )
    #: A poll still returns as soon as a fetch brings records; waiting for none, it now comes back
    #: as often as the broker answers an empty fetch, not five times as often: each kafka-python
    #: poll crosses to its IO thread, and an idle writer polling every 200 ms took ~6 ms of CPU a
    #: second, ~2 ms at 1 s (BENCHMARKS.md, helper hFollow). `stop` and a due checkpoint wait as long.
    poll_timeout_ms: ClassVar[int] = FETCH_WAIT_MS

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        interval: timedelta,
        clock: Callable[[], datetime] = _utc_now,
        published: PublishedSignals | None = None,
    ) -> None:
        super().__init__(kafka, topics.signals, None, "burnguard-checkpoints")
        #: what this process published, so its own records are not parsed again (None: all are)
        self._published = published
        self._checkpoint_topic = topics.signal_checkpoints
        self._interval_s = interval.total_seconds()
        self._clock = clock
        self._latest_time = datetime.min.replace(tzinfo=UTC)
        self._kept: dict[int, dict[bytes, _Kept]] = {}
        self._written: dict[int, tuple[int, int]] = {}  # partition -> (next offset, parts) last written
        self._next_due_s = 0.0
        self._producer: KafkaProducer | None = None
        self.checkpoints_written = 0
        self.failed_writes = 0

    def stop(self, timeout_s: float = 10.0) -> None:
        super().stop(timeout_s)
        if self._producer is not None:
            self._producer.close(timeout=timeout_s)

    def _follow(self) -> None:
        """A replay starts from nothing: a key whose records the broker has cleaned must not linger."""
        self._kept.clear()
        self._next_due_s = time.monotonic() + self._interval_s
        super()._follow()

    def _apply(self, record: ConsumerRecord) -> None:
        if record.key is None:
            return
        kept = self._kept.setdefault(record.partition, {})
        if record.value is None:
            kept.pop(record.key, None)
            return
        published = self._published
        until = published.take(record.key, record.value) if published is not None else None
        if until is None:
            try:
                until = matters_until(signal_of_record(record.key, record.value))
            except ValueError:  # as the guard: malformed, the key's previous record stands
                return
        kept.pop(record.key, None)  # re-inserted last: the checkpoint keeps the topic's order
        if self._now() - CLOCK_MARGIN < until:
            kept[record.key] = _Kept(record.value, until)

    def _after_poll(self, consumer: KafkaConsumer) -> None:
        """Write the checkpoints due, once this connection's replay has caught up: before, its
        positions are behind what an earlier connection read and wrote (a checkpoint going back)."""
        if not self.replayed or time.monotonic() < self._next_due_s:
            return
        self._next_due_s = time.monotonic() + self._interval_s
        positions = {tp.partition: consumer.position(tp) for tp in consumer.assignment()}
        try:
            for partition, next_offset in sorted(positions.items()):
                if self._written.get(partition, (None,))[0] != next_offset:
                    self._write(partition, next_offset)
        except Exception as exc:  # a checkpoint only saves guards time: never end the thread for one
            self.failed_writes += 1
            logger.warning(
                "could not write a signal checkpoint to %s (%s); next try in %.0fs",
                self._checkpoint_topic,
                exc,
                self._interval_s,
            )
            self._drop_producer()

    def _drop_producer(self) -> None:
        """Close the producer after a failed write: the next one starts afresh.

        kafka-python's producer stays in a fatal state after some errors (a part too large for
        the topic, say): reused, it would refuse every later write until the worker restarts.
        """
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception as exc:  # closing a broken producer may fail too; it is dropped anyway
                logger.warning("closing the signal checkpoint producer: %s", exc)

    def _write(self, partition: int, next_offset: int) -> None:
        """Replace the partition's checkpoint: its parts, then a tombstone for each part no longer used."""
        now = self._now()
        kept = self._kept.setdefault(partition, {})
        for key in [k for k, entry in kept.items() if now - CLOCK_MARGIN >= entry.until]:
            del kept[key]
        records = [(key, entry.value) for key, entry in kept.items()]
        parts = split_checkpoint(self.topic, partition, next_offset, records, now)
        producer = self._producer_for_checkpoints()
        topic = self._checkpoint_topic
        sends = [producer.send(topic, key=part.kafka_key, value=part.encode()) for part in parts]
        stale = range(len(parts), self._written.get(partition, (0, 0))[1])
        sends += [producer.send(topic, key=part_key(self.topic, partition, n), value=None) for n in stale]
        for sent in sends:
            sent.get(timeout=SEND_TIMEOUT_S)
        self._written[partition] = (next_offset, len(parts))
        self.checkpoints_written += 1

    def _now(self) -> datetime:
        """The latest time the clock has shown: a checkpoint's time is never before one it judged by.

        Guards trust a checkpoint only if their clock is at most `CLOCK_MARGIN` behind its time;
        a clock stepped back must not stamp one that left out records by the time before.
        """
        self._latest_time = max(self._latest_time, self._clock())
        return self._latest_time

    def _producer_for_checkpoints(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **self._kafka.kafka_python_config(),
                client_id=f"{self._thread.name}-writer",
                acks="all",
                linger_ms=5,
            )
        return self._producer
