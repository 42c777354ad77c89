"""A backlog is taken in full micro-batches: stage 1 gets what is fetched, not what loop turns let in.

Real broker and worker. Faust's fetcher handed each message to the agents through its own
`wait_first` (tasks and two event loop turns per message, each turn also running stage 2's ready
work), so under a backlog stage 1's channel was nearly empty when its 20 ms batch window ended: a
few dozen small messages per micro-batch, little to combine (BENCHMARKS.md, "Each fetch delivered
in one task"). Now a fetch is delivered in one task (`stream/fetching.py`).
"""

from __future__ import annotations

import json
import time

import pytest
from burnguard.contracts import attributes as attr
from kafka import KafkaProducer

from tests.factories import budget, budgets_yaml, tenant_cost
from tests.fixtures.pipeline import Pipeline, read_to_end
from tests.support.otlp_batches import otlp_batch

MESSAGES = 2_000
#: Calls per message, each of its own feature: stage 2 has rows to add while stage 1 waits.
CALLS = 12
COST = 0.001


def spent(pipeline: Pipeline, tenant: str) -> float | None:
    spends = [usage.spent for _, usage in pipeline.usage_snapshots() if usage.key == tenant]
    return spends[-1] if spends else None


def produce_backlog(pipeline: Pipeline) -> int:
    """`MESSAGES` small messages of acme's on one partition, before the worker starts; the largest's size."""
    features = budget("feature-tokens", 1.0e12, scope="feature", window="day", metric="tokens")
    pipeline.write_budgets(budgets_yaml(tenant_cost(1_000_000.0), features))
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all", linger_ms=20)
    largest = 0
    for n in range(MESSAGES):  # each its own features: no message is a copy of another
        calls = [(f"feature-{n}-{call}", 100, 10) for call in range(CALLS)]
        payload = otlp_batch("acme", calls, extra={attr.COST_USD: COST})
        largest = max(largest, len(payload))
        producer.send(pipeline.topics.spans, key=b"acme", value=payload, partition=0)
    producer.flush()
    producer.close()
    return largest


def micro_batches_when_counted(pipeline: Pipeline, env: dict[str, str] | None = None) -> int:
    """Start the worker on the backlog; once acme's spend counts every message, the micro-batches
    it took (a micro-batch sends acme's tenant spend as one row: its messages' sum, with their steps)."""
    pipeline.start_worker(env=env)
    deadline = time.monotonic() + 120
    while spent(pipeline, "acme") != pytest.approx(MESSAGES * CALLS * COST) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert spent(pipeline, "acme") == pytest.approx(MESSAGES * CALLS * COST)
    records = [json.loads(r.value) for r in read_to_end(pipeline.broker.bootstrap, pipeline.topics.usage)]
    return sum(
        1
        for record in records
        if record.get("kind") in ("batches", "groups")
        for batch in record["batches"]
        for row in batch[2]
        if row[0] == "tenant-cost"
    )


@pytest.mark.slow
def test_a_backlog_of_small_messages_is_taken_in_full_micro_batches(pipeline: Pipeline) -> None:
    produce_backlog(pipeline)
    micro_batches = micro_batches_when_counted(pipeline)
    messages_per_batch = MESSAGES / micro_batches
    assert messages_per_batch >= 100, f"{micro_batches} micro-batches for {MESSAGES} messages"


@pytest.mark.slow
def test_a_micro_batch_ends_at_the_byte_cap_whatever_its_message_count(pipeline: Pipeline) -> None:
    """`BURNGUARD_INGEST_BATCH_BYTES` reaches stage 1: a micro-batch holds the cap and one message at most."""
    largest = produce_backlog(pipeline)
    per_batch = 20  # messages of the largest's size that fill the cap
    micro_batches = micro_batches_when_counted(
        pipeline, {"BURNGUARD_INGEST_BATCH_BYTES": str(per_batch * largest)}
    )
    # without the cap, the test above's >= 100 messages per micro-batch; with it, at most 21
    assert micro_batches >= MESSAGES / (per_batch + 1), (
        f"{micro_batches} micro-batches for {MESSAGES} messages"
    )
