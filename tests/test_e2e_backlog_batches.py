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


@pytest.mark.slow
def test_a_backlog_of_small_messages_is_taken_in_full_micro_batches(pipeline: Pipeline) -> None:
    features = budget("feature-tokens", 1.0e12, scope="feature", window="day", metric="tokens")
    pipeline.write_budgets(budgets_yaml(tenant_cost(1_000_000.0), features))
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all", linger_ms=20)
    for n in range(MESSAGES):  # each its own features: no message is a copy of another
        calls = [(f"feature-{n}-{call}", 100, 10) for call in range(CALLS)]
        payload = otlp_batch("acme", calls, extra={attr.COST_USD: COST})
        producer.send(pipeline.topics.spans, key=b"acme", value=payload, partition=0)
    producer.flush()
    producer.close()

    pipeline.start_worker()
    deadline = time.monotonic() + 120
    while spent(pipeline, "acme") != pytest.approx(MESSAGES * CALLS * COST) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert spent(pipeline, "acme") == pytest.approx(MESSAGES * CALLS * COST)

    # A micro-batch sends acme's tenant spend as one row (its messages' sum, with their steps).
    records = [json.loads(r.value) for r in read_to_end(pipeline.broker.bootstrap, pipeline.topics.usage)]
    tenant_rows = [
        row
        for record in records
        if record.get("kind") in ("batches", "groups")
        for batch in record["batches"]
        for row in batch[2]
        if row[0] == "tenant-cost"
    ]
    messages_per_batch = MESSAGES / len(tenant_rows)
    assert messages_per_batch >= 100, f"{len(tenant_rows)} micro-batches for {MESSAGES} messages"
