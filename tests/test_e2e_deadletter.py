"""Malformed messages on `otlp_spans` go to the dead-letter topic; the worker carries on."""

from __future__ import annotations

import signal
import time

import pytest
from burnguard.contracts.signals import Signal
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.stream.app import DEADLETTER_REASON_HEADER
from kafka import KafkaConsumer, KafkaProducer

from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

BUDGETS = """
budgets:
  - id: calls-per-day
    scope: tenant
    window: day
    metric: calls
    limit: 10
    actions:
      - {at: 0.5, do: warn}
      - {at: 1.0, do: throttle}
"""


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


@pytest.mark.slow
def test_malformed_messages_are_dead_lettered_and_later_spans_still_count(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.start_worker()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    spans_topic = pipeline.topics.spans
    bad = [b"\x0a\xff\xff garbage", b'{"resourceSpans": "not a list"}', b""]
    for payload in bad:
        producer.send(spans_topic, key=b"acme", value=payload, partition=0)
    producer.send(spans_topic, key=b"acme", value=otlp_batch("acme", [("chat", 100, 10)] * 3), partition=0)
    producer.send(spans_topic, key=b"acme", value=otlp_batch("acme", [("chat", 100, 10)] * 3), partition=0)
    producer.flush()

    dead = consume_all(pipeline.broker.bootstrap, pipeline.topics.deadletter, expected=len(bad))
    assert [r.value for r in dead] == bad
    assert all(r.key == b"acme" for r in dead)
    reasons = [dict(r.headers)[DEADLETTER_REASON_HEADER].decode() for r in dead]
    assert "protobuf" in reasons[0]
    assert "JSON" in reasons[1]
    assert "empty" in reasons[2]

    signals = [
        Signal.from_json(r.value)
        for r in consume_all(pipeline.broker.bootstrap, pipeline.topics.signals, expected=1)
    ]
    assert signals, "the spans after the malformed messages were not accounted"
    warn = signals[0]
    assert warn.key == "acme" and warn.action == "warn"
    assert warn.spent == 6.0  # both batches of three calls, and nothing from the malformed messages
    assert "Traceback" not in pipeline.log("worker")


@pytest.mark.slow
def test_dead_letters_are_parked_once_across_a_worker_sigkill(pipeline: Pipeline) -> None:
    """The killed worker committed nothing: its successor re-reads every bad message, parks none again."""
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="60")  # nothing is committed before the kill
    # the killed worker's partitions move to its successor after 6 s (the broker's least), not 30 s
    pipeline.env.update(BURNGUARD_SESSION_TIMEOUT_S="6")
    first = pipeline.start_worker()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    spans_topic = pipeline.topics.spans
    bad = [b"\x0a\xff\xff garbage", b'{"resourceSpans": "not a list"}', b""]
    for payload in bad:
        producer.send(spans_topic, key=b"acme", value=payload, partition=0)
    hostile = otlp_batch("acme", [("chat", 100, 10), ("chat", -100, 10)])  # its second span is rejected
    producer.send(spans_topic, key=b"acme", value=hostile, partition=0)
    producer.flush()
    assert len(consume_all(pipeline.broker.bootstrap, pipeline.topics.deadletter, expected=4)) == 4

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    logged_before = len(pipeline.log("worker"))
    second = pipeline.start_worker()
    for _ in range(5):  # 1 + 5 calls: a warn at half the limit of 10, from the successor
        producer.send(spans_topic, key=b"acme", value=otlp_batch("acme", [("chat", 100, 10)]), partition=0)
    producer.flush()
    deadline, spent = time.monotonic() + 60, None
    while time.monotonic() < deadline and spent != 6.0:
        snapshots = consume_all(pipeline.broker.bootstrap, pipeline.topics.budget_usage, 10_000, 2)
        spent = BudgetUsage.from_json(snapshots[-1].value).spent if snapshots else None
    assert spent == 6.0  # the hostile message's good span counted once, the bad one never
    pipeline.wait_for_log("worker", "is already on the dead-letter topic", 30, second, after=logged_before)

    dead = consume_all(pipeline.broker.bootstrap, pipeline.topics.deadletter, expected=8, timeout_s=5)
    sources = [(dict(r.headers)["burnguard.source"], dict(r.headers)["burnguard.span"]) for r in dead]
    assert len(dead) == 4 and len(set(sources)) == 4, sources
    assert [r.value for r in dead[:3]] == bad
    assert "Traceback" not in pipeline.log("worker")
