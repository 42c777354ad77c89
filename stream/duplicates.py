"""A batch delivered twice counts once: `otlp_spans` messages recognised by a digest of their bytes.

A producer that retries a send it saw fail (kafka-python with `acks=1`, the
Collector's kafkaexporter without idempotence) can write the same
`ExportTraceServiceRequest` twice, at two offsets. The stream's exactly-once
marks are per source offset, so both copies counted, while ClickHouse
collapsed the second by span id.

A retry re-sends the same bytes to the same partition, shortly after the first
copy (the producer's retries and delivery timeout: seconds to two minutes). So
stage 1 remembers, per source partition, the BLAKE3 digest of every message
of the last `window` of broker time (`otlp_spans` is LogAppendTime), and skips
a message whose digest it saw at a lower offset. Memory is bounded by the
window and by `cap` digests per partition (~100 bytes each).

After a restart or a takeover the memory lacks what another process (or this
one, before it died) read. Before the first message of a partition after each
rebalance, `prime` reads the messages of that partition between the window's
start (or what this process already remembers) and that message, digests only.
Re-reading a message at the same offset is not a duplicate (the replay marks
handle it), so the decision for every offset is the same in every process:
the copy at the lowest offset counts, later ones never do.

Not recognised: the same spans re-batched into different bytes, or a copy
later than the window. ClickHouse still collapses those by span id.
"""

from __future__ import annotations

import logging
from typing import Any

from blake3 import blake3
from burnguard.contracts.topics import KafkaSettings
from burnguard.stream.partitioner import native_part
from kafka import KafkaConsumer, TopicPartition

logger = logging.getLogger(__name__)

_NS_PER_MS = 1_000_000


def digest(payload: bytes) -> bytes:
    """16 bytes of BLAKE3: a cryptographic hash, so a client cannot forge a copy of another's message.

    Digests live only in a worker's memory (primed again by reading after a rebalance), so workers
    of two versions need not agree on the hash. BLAKE3 replaced BLAKE2b (~6x cheaper on a 40 kB
    message: BENCHMARKS.md, "Cheaper duplicate digests"). The native one (`blake3_16`,
    contracts/native/src/digest.rs) when in use, else the reference `_blake3_16`.
    """
    return (native_part("blake3_16") or _blake3_16)(payload)


def _blake3_16(payload: bytes) -> bytes:
    """The reference digest (blake3-py). It releases the GIL from 2 kB, which lets Faust's consumer
    thread take it: on the worker's main thread a small message's digest then took ~38 µs of its
    time instead of ~6 (py-spy, BENCHMARKS.md, "Stage 1 per message, again"); the native one holds it.
    """
    return blake3(payload).digest(16)


class RecentBatches:
    """Per source partition: digest -> (lowest offset seen, record time ns), oldest first."""

    def __init__(self, window_ns: int, cap: int) -> None:
        self.window_ns = window_ns
        self.cap = cap
        self._seen: dict[int, dict[bytes, tuple[int, int]]] = {}
        #: partitions to prime before their next message (all, after a rebalance)
        self.primed: set[int] = set()

    def earlier_copy(self, partition: int, payload_digest: bytes, offset: int, record_ns: int) -> int | None:
        """The offset of an earlier message with the same bytes, or None (then it is remembered)."""
        seen = self._seen.setdefault(partition, {})
        found = seen.get(payload_digest)
        if found is not None and found[0] < offset:
            return found[0]
        if found is None or found[0] > offset:
            seen[payload_digest] = (offset, record_ns)
            self._evict(seen, record_ns)
        return None

    def _evict(self, seen: dict[bytes, tuple[int, int]], now_ns: int) -> None:
        oldest = now_ns - self.window_ns
        while seen and (len(seen) > self.cap or next(iter(seen.values()))[1] < oldest):
            del seen[next(iter(seen))]

    def newest_offset(self, partition: int) -> int:
        seen = self._seen.get(partition)
        return max((offset for offset, _ in seen.values()), default=-1) if seen else -1

    def remembered(self) -> int:
        return sum(len(seen) for seen in self._seen.values())


class Primer:
    """Reads the messages before a partition's first one after a rebalance, to digest them (blocking)."""

    def __init__(self, kafka: KafkaSettings, topic: str, batches: RecentBatches) -> None:
        self.kafka = kafka
        self.topic = topic
        self.batches = batches
        self._consumer: KafkaConsumer | None = None

    def prime(self, firsts: dict[int, tuple[int, int]]) -> dict[int, int]:
        """Per partition of `firsts` (partition -> its first message's offset and record time ns),
        digest its messages of the window before that offset; returns how many each.

        The partitions' window starts are asked for in one request (after a rebalance every
        partition's first message comes at once: one round trip, not one each); each partition is
        then read alone, as it always was.
        """
        consumer = self._consumer or self._start()
        tps = {partition: TopicPartition(self.topic, partition) for partition in firsts}
        consumer.assign(list(tps.values()))
        window_ns = self.batches.window_ns
        found = consumer.offsets_for_times(
            {
                tps[partition]: max((first_ns - window_ns) // _NS_PER_MS, 0)
                for partition, (_, first_ns) in firsts.items()
            }
        )
        return {
            partition: self._read_before(consumer, tps[partition], first_offset, found.get(tps[partition]))
            for partition, (first_offset, _) in firsts.items()
        }

    def _read_before(self, consumer: KafkaConsumer, tp: TopicPartition, first_offset: int, found: Any) -> int:
        """Digest `tp`'s messages from the window's start (`found`: its offset then) to `first_offset`."""
        partition = tp.partition
        start = found.offset if found is not None else first_offset
        start = max(start, first_offset - self.batches.cap, self.batches.newest_offset(partition) + 1)
        if start >= first_offset:
            return 0
        consumer.assign([tp])
        consumer.seek(tp, start)
        read = 0
        while consumer.position(tp) < first_offset:
            for record in consumer.poll(timeout_ms=1000).get(tp, []):
                if record.offset < first_offset:
                    read += 1
                    if record.value:
                        record_ns = record.timestamp * _NS_PER_MS
                        self.batches.earlier_copy(partition, digest(record.value), record.offset, record_ns)
        return read

    def _start(self) -> KafkaConsumer:
        self._consumer = KafkaConsumer(
            **self.kafka.kafka_python_config(),
            client_id="burnguard-duplicates-primer",
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
        )
        return self._consumer
