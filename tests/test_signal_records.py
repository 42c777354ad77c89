"""Signals go into the producer's open batch of their partition (`stream/signal_records.py`); real broker.

What `send` gave (the key's partition, the key's order, no wait behind a queued batch) and what
it did not: a signal the broker refuses is reported and, while still its key's latest, sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.stream import signal_records
from burnguard.stream.app import BudgetJob
from burnguard.stream.partitioner import key_partition
from burnguard.stream.settings import StreamSettings
from kafka import KafkaConsumer

from tests.factories import budgets_yaml, tenant_cost

#: The signals topic's `max.message.bytes` in the refusal tests: a record of `BIG` bytes is refused.
REFUSED_ABOVE = 2000
BIG = b"x" * 3 * REFUSED_ABOVE


@asynccontextmanager
async def job_on_the_broker(bootstrap: str, signals: str, data_dir: Path) -> AsyncIterator[BudgetJob]:
    """A worker's job (not started) whose producer runs on the real broker, publishing to `signals`."""
    settings = StreamSettings(
        data_dir=data_dir,
        app_id=f"signal-records-{time.monotonic_ns()}",
        kafka=KafkaSettings(bootstrap=bootstrap),
        topics=Topics(signals=signals),
    )
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1))))
    await job.app.producer.start()
    try:
        yield job
    finally:
        await job.app.producer.stop()


async def settled(job: BudgetJob, timeout_s: float = 20.0) -> None:
    """Until every published signal is delivered or given up (failed batches are sent again)."""
    deadline = time.monotonic() + timeout_s
    while job.signal_records.in_flight() and time.monotonic() < deadline:
        await job.app.producer.flush()
        await asyncio.sleep(0.05)
    assert not job.signal_records.in_flight(), "signals still in flight"


def records_of(bootstrap: str, topic: str) -> list[tuple[int, bytes, bytes | None]]:
    """(partition, key, value) of every record of `topic`, in each partition's order."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000
    )
    try:
        return [(record.partition, record.key, record.value) for record in consumer]
    finally:
        consumer.close()


def test_signals_land_on_their_key_s_partition_in_publish_order_from_one_open_batch(
    kafka_broker: Any, tmp_path: Path
) -> None:
    """As `send` placed them: the producer's partition for the key, each key's signals in order; and at
    once: back-to-back signals of a partition join its open batch, none waits behind a queued one."""
    topic = f"signals-order-{time.monotonic_ns()}"
    kafka_broker.create_topic(topic, partitions=4)
    keys = [f"tenant:acme-{n}@tenant-cost".encode() for n in range(30)]
    published = [
        (key, None if (n + r) % 7 == 0 else b'{"n":%d}' % r) for r in range(3) for n, key in enumerate(keys)
    ]

    async def publish() -> list[int]:
        async with job_on_the_broker(kafka_broker.bootstrap, topic, tmp_path) as job:
            await job._publish_signal("warm-up", b"{}")  # the topic's metadata, once
            await settled(job)
            for key, value in published:
                await job._publish_signal(key.decode(), value)
            batches = job.app.producer._ensure_producer()._message_accumulator._batches
            queued = [len(batches.get(TopicPartition(topic, partition), ())) for partition in range(4)]
            await settled(job)
            return queued

    queued = asyncio.run(publish())
    assert queued == [1, 1, 1, 1], f"a partition's signals went into more than its open batch: {queued}"
    landed = [record for record in records_of(kafka_broker.bootstrap, topic) if record[1] != b"warm-up"]
    assert len(landed) == len(published)
    assert all(partition == key_partition(key, 4) for partition, key, _ in landed)
    for key in keys:
        assert [v for _, k, v in landed if k == key] == [v for k, v in published if k == key], key


def test_a_refused_signal_is_reported_and_its_batch_s_other_latest_signals_are_sent_again(
    kafka_broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker refuses a batch whole. Before, its signals were dropped unseen; now the failure is
    logged and counted, each record still its key's latest is sent again in a batch of its own (so the
    refused one takes no other down again), a superseded one is not, and one refused every time is
    given up after `ATTEMPTS` hand-overs, logged and counted."""
    topic = f"signals-refused-{time.monotonic_ns()}"
    kafka_broker.create_topic(topic, partitions=1, config={"max.message.bytes": str(REFUSED_ABOVE)})
    caplog.set_level(logging.ERROR, logger=signal_records.__name__)

    async def publish() -> dict[str, Any]:
        async with job_on_the_broker(kafka_broker.bootstrap, topic, tmp_path) as job:
            await job._publish_signal("first", b"{}")
            await settled(job)
            for key, value in (("a", b"1"), ("k", BIG), ("k", b"2"), ("z", BIG), ("t", None)):
                await job._publish_signal(key, value)  # back to back: one batch, refused whole
            await settled(job)
            return job.counters()

    counters = asyncio.run(publish())
    landed = [(key, value) for _, key, value in records_of(kafka_broker.bootstrap, topic)]
    assert sorted(landed[1:]) == [(b"a", b"1"), (b"k", b"2"), (b"t", None)], landed
    assert counters["signals_given_up"] == 1
    assert counters["signals_failed"] == 5 + signal_records.ATTEMPTS - 1  # the batch, then z alone
    errors = [record.getMessage() for record in caplog.records]
    assert any("5 signals to" in message and "4 sent again" in message for message in errors), errors
    assert any(message.startswith("signal b'z' not published") for message in errors), errors


class _OfflineApp:
    """What `SignalRecords` reads of a Faust app, around a real aiokafka producer that never connects."""

    def __init__(self, producer: Any) -> None:
        self.producer = self
        self.conf = type("Conf", (), {"producer_max_request_size": 1 << 20})()
        self._producer = producer

    def _ensure_producer(self) -> Any:
        return self._producer


def test_a_change_of_the_topic_s_partitions_is_followed_at_the_next_signal() -> None:
    """The partitions are listed once per metadata the producer holds: replaced metadata (more
    partitions, say) places the next signal by the new count, as `send` would; none waits."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import PartitionMetadata
    from burnguard.stream.partitioner import producer_partitioner

    async def run() -> list[tuple[bytes, int]]:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", partitioner=producer_partitioner)
        cluster = producer.client.cluster
        records = signal_records.SignalRecords(_OfflineApp(producer), "signals")
        placed: list[tuple[bytes, int]] = []
        for count in (4, 4, 7):  # the second: equal metadata in a new object
            cluster._partitions["signals"] = {
                p: PartitionMetadata("signals", p, 0, [0], [0], 0) for p in range(count)
            }
            for n in range(20):
                key = f"tenant:acme-{n}@tenant-cost".encode()
                assert records.publish_at_once(key, b"{}")
                batches = producer._message_accumulator._batches
                placed.append(
                    (key, next(tp.partition for tp, queue in batches.items() if queue[-1]._builder))
                )
                batches.clear()
        cluster._partitions.pop("signals")
        assert not records.publish_at_once(b"k", b"{}")  # no metadata: `publish` waits for it
        return placed

    placed = asyncio.run(run())
    counts = [4] * 40 + [7] * 20
    assert [partition for _, partition in placed] == [
        key_partition(k, c) for (k, _), c in zip(placed, counts, strict=True)
    ]
    assert {partition for _, partition in placed[40:]} - set(range(4))  # some land on the new partitions
