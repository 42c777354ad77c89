"""Dead letters written once: which messages and spans are already parked, read back from the topic.

A worker that dies after parking a bad message but before committing its
offset re-reads the message when it (or another worker) takes the partition
over; so does every rewind after a rebalance (`stream/takeover.py`). Each
dead letter carries its source coordinates in headers (`burnguard.source`
= topic/partition/offset, `burnguard.span` = the span's position in the
message, -1 for a whole message), and before parking, the worker checks them
against what the dead-letter topic already holds: it reads the topic's tail
once at start and again after every rebalance (`DeadLetterLog.catch_up`).
So a subscriber that follows `burnguard.deadletter` sees each bad message
and each rejected span once, however often the source is re-read.

The topic is not compacted: compaction would remove copies only eventually,
and a subscriber reading in between would still see both.
"""

from __future__ import annotations

import logging
from typing import Any

from burnguard.contracts.topics import KafkaSettings
from kafka import KafkaConsumer, TopicPartition

logger = logging.getLogger(__name__)

REASON_HEADER = "burnguard.error"
SOURCE_HEADER = "burnguard.source"
SPAN_HEADER = "burnguard.span"
KIND_HEADER = "burnguard.rejection"
#: On a dead letter whose value was too large to copy: the value's size in bytes (the value is empty;
#: the source message stays readable at the coordinates in `SOURCE_HEADER` for its retention).
OMITTED_HEADER = "burnguard.value-omitted"
#: Room for the key, the headers and the record batch's own overhead inside the producer's limit.
DEAD_LETTER_OVERHEAD_BYTES = 16 * 1024
#: A reason longer than this is cut (an exception's text can be long); the headers must fit too.
MAX_REASON_CHARS = 2000
#: (source topic, partition, offset, span index or -1 for the whole message)
Parked = tuple[str, int, int, int]


def dead_letter_headers(source: Parked, reason: str, kind: str = "") -> list[tuple[str, bytes]]:
    topic, partition, offset, span = source
    headers = [
        (REASON_HEADER, reason[:MAX_REASON_CHARS].encode()),
        (SOURCE_HEADER, f"{topic}/{partition}/{offset}".encode()),
        (SPAN_HEADER, str(span).encode()),
    ]
    if kind:
        headers.append((KIND_HEADER, kind.encode()))
    return headers


def fitted(
    value: bytes | None, headers: list[tuple[str, bytes]], max_request_bytes: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The dead letter's value and headers within the producer's request limit.

    A message up to the source topic's limit can be parked, and the producer's limit may be
    smaller (Faust's default is 1,000,000 bytes, a topic's 1,048,588): a dead letter the
    producer refuses would fail the whole micro-batch again on every re-reading. Such a value
    is left out and its size named; the source coordinates still point at the message.
    """
    if value is None or len(value) <= max_request_bytes - DEAD_LETTER_OVERHEAD_BYTES:
        return value, headers
    return b"", [*headers, (OMITTED_HEADER, str(len(value)).encode())]


def parked_of(headers: Any) -> Parked | None:
    """The source coordinates a dead-letter record's headers name; None for a record without them."""
    found = {key: value for key, value in headers or ()}
    source = found.get(SOURCE_HEADER)
    if source is None:
        return None
    try:
        topic, partition, offset = source.decode().rsplit("/", 2)
        return topic, int(partition), int(offset), int(found.get(SPAN_HEADER, b"-1"))
    except ValueError:
        return None


class DeadLetterLog:
    """The source coordinates of the newest `remembered` dead letters on the topic, and of ours.

    Bounded: a re-read reaches back at most one commit interval (plus a
    rebalance), far fewer messages than `remembered`.
    """

    def __init__(self, kafka: KafkaSettings, topic: str, remembered: int) -> None:
        self.kafka = kafka
        self.topic = topic
        self.remembered = remembered
        self._parked: dict[Parked, None] = {}  # insertion-ordered: the oldest is dropped first
        self._consumer: KafkaConsumer | None = None
        self.stale = True  # read the topic before the next check: at start and after a rebalance

    def __contains__(self, source: Parked) -> bool:
        return source in self._parked

    def add(self, source: Parked) -> None:
        self._parked[source] = None
        while len(self._parked) > self.remembered:
            del self._parked[next(iter(self._parked))]

    def discard(self, sources: list[Parked]) -> None:
        """Forget dead letters that were queued but never sent: the re-reading parks them again."""
        for source in sources:
            self._parked.pop(source, None)

    def catch_up(self) -> int:
        """Read the topic's records since the last catch-up (its last `remembered` at first); blocking.

        Returns how many were read. Runs in a thread (kafka-python is blocking).
        """
        consumer = self._consumer or self._start()
        ends = consumer.end_offsets(list(consumer.assignment()))
        read = 0
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    read += 1
                    if (source := parked_of(record.headers)) is not None:
                        self.add(source)
        self.stale = False
        return read

    def _start(self) -> KafkaConsumer:
        consumer = KafkaConsumer(
            **self.kafka.kafka_python_config(),
            client_id="burnguard-dead-letters",
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",  # the tail reaches below the log start
        )
        partitions = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()]
        consumer.assign(partitions)
        for tp, end in consumer.end_offsets(partitions).items():
            consumer.seek(tp, max(end - self.remembered, 0))
        self._consumer = consumer
        return consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
