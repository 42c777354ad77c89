"""The same OTLP batch written twice (a retrying producer) counts once, in budgets and in ClickHouse.

Real broker, worker and sink. The copy lands at another offset; the stream
recognises it by its digest (`stream/duplicates.py`), ClickHouse by span id.
"""

from __future__ import annotations

import time

import pytest
from burnguard.contracts import attributes as attr
from burnguard.stream.duplicates import RecentBatches, digest
from kafka import KafkaProducer

from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budgets_yaml, tenant_cost
from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

BUDGETS = budgets_yaml(tenant_cost(100.0))
COST = 0.125


def spent(pipeline: Pipeline, tenant: str) -> float | None:
    spends = [usage.spent for _, usage in pipeline.usage_snapshots() if usage.key == tenant]
    return spends[-1] if spends else None


def wait_for_spent(pipeline: Pipeline, tenant: str, expected: float, timeout_s: float = 60) -> float | None:
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        seen = spent(pipeline, tenant)
        if seen == expected:
            time.sleep(2)  # and it stays there: a second copy would arrive within this
            return spent(pipeline, tenant)
        time.sleep(0.5)
    return seen


def send(pipeline: Pipeline, *payloads: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    for payload in payloads:
        producer.send(pipeline.topics.spans, key=b"acme", value=payload, partition=1)
    producer.flush()
    producer.close()


def batch(calls: int) -> bytes:
    return otlp_batch("acme", [("chat", 100, 10)] * calls, extra={attr.COST_USD: COST})


@pytest.mark.slow
def test_a_batch_written_twice_counts_once_in_budgets_and_in_clickhouse(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    worker = pipeline.start_worker()
    sink = pipeline.start_sink()
    twice, once = batch(3), batch(2)
    send(pipeline, twice, once, twice)
    assert wait_for_spent(pipeline, "acme", 5 * COST) == 5 * COST
    pipeline.wait_for_log("worker", '"duplicate_messages": 1', 10, worker)

    topics = [pipeline.topics.spans]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    stored = pipeline.clickhouse_query(
        'client.query("SELECT count(), toString(sum(cost_usd)) FROM genai_spans FINAL").result_rows[0]'
    )
    assert stored == [5, str(5 * COST)]


@pytest.mark.slow
def test_a_copy_written_after_a_worker_restart_still_counts_once(pipeline: Pipeline) -> None:
    """The successor never saw the first copy: it reads it back before the partition's next message."""
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="0.5")
    first = pipeline.start_worker()
    twice = batch(4)
    send(pipeline, twice)
    assert wait_for_spent(pipeline, "acme", 4 * COST) == 4 * COST
    assert (
        wait_until_consumed(
            pipeline.broker.bootstrap, pipeline.env["BURNGUARD_STREAM_APP_ID"], [pipeline.topics.spans]
        )
        == 0
    )
    assert pipeline.stop(first) == 0  # its offsets are committed: the successor starts after the batch

    logged_before = len(pipeline.log("worker"))
    second = pipeline.start_worker()
    send(pipeline, twice, batch(1))
    assert wait_for_spent(pipeline, "acme", 5 * COST) == 5 * COST
    pipeline.wait_for_log("worker", "byte for byte: not counted again", 10, second, after=logged_before)


@pytest.mark.usefixtures("digest_impl")
def test_the_digests_are_bounded_by_the_window_and_the_cap() -> None:
    second = 10**9
    batches = RecentBatches(window_ns=60 * second, cap=100)
    for offset in range(1000):  # one message a second: only the last minute's stay
        assert batches.earlier_copy(0, digest(b"m%d" % offset), offset, offset * second) is None
    assert 55 <= batches.remembered() <= 61
    assert batches.earlier_copy(0, digest(b"m999"), 1000, 1000 * second) == 999  # a copy: found
    assert batches.earlier_copy(0, digest(b"m999"), 999, 1000 * second) is None  # re-read: not a copy
    assert batches.earlier_copy(0, digest(b"m10"), 1001, 1001 * second) is None  # beyond the window
    for offset in range(2000, 2500):  # a burst within one second: the cap holds
        batches.earlier_copy(1, digest(b"b%d" % offset), offset, 2000 * second)
    assert len(batches._seen[1]) == 100
