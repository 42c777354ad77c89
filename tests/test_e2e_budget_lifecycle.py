"""Budgets change on a running worker: `burnguard budgets apply` -> topic -> new signals, no restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from burnguard.contracts.compacted_topics import read_compacted_topic
from burnguard.contracts.signals import Signal
from burnguard.instrumentation import BudgetGuard
from kafka import KafkaConsumer, KafkaProducer
from typer.testing import CliRunner

from burnguard.cli import app
from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

runner = CliRunner()


def calls_budget(limit: int, budget_id: str = "tenant-calls") -> str:
    return f"""
budgets:
  - id: {budget_id}
    scope: tenant
    window: day
    metric: calls
    limit: {limit}
    actions:
      - {{at: 1.0, do: throttle}}
"""


class SignalLog:
    """Everything on the signals topic, in order, tombstones as (key, None)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.consumer = KafkaConsumer(
            pipeline.topics.signals, bootstrap_servers=pipeline.broker.bootstrap, auto_offset_reset="earliest"
        )
        self.records: list[tuple[str, Signal | None]] = []

    def wait_for(self, predicate, timeout_s: float = 45.0) -> tuple[str, Signal | None]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in self.consumer.poll(timeout_ms=300).values():
                for r in batch:
                    self.records.append((r.key.decode(), Signal.from_json(r.value) if r.value else None))
            for record in self.records:
                if predicate(*record):
                    return record
        raise AssertionError(f"no such signal within {timeout_s}s; saw {self.records}")


def apply(path: Path, pipeline: Pipeline, text: str) -> str:
    path.write_text(text)
    result = runner.invoke(app, ["budgets", "apply", str(path), "--bootstrap", pipeline.broker.bootstrap])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_apply_raises_a_limit_and_removes_a_budget_on_a_running_worker(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BURNGUARD_TOPIC_BUDGETS", pipeline.topics.budgets)
    pipeline.write_budgets(calls_budget(limit=4))
    pipeline.start_worker()
    signals = SignalLog(pipeline)
    guard = BudgetGuard(pipeline.kafka, pipeline.topics).start()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    producer.send(pipeline.topics.spans, key=b"acme", value=otlp_batch("acme", [("chat", 10, 1)] * 5))
    producer.flush()
    signals.wait_for(lambda key, s: s is not None and s.action == "throttle")
    assert guard.wait_for(lambda g: g.check(attribution={"tenant": "acme"}).action == "deny")

    budgets_file = tmp_path / "budgets.yaml"
    output = apply(budgets_file, pipeline, calls_budget(limit=100))
    assert "tenant-calls" in output and "applied" in output
    lifted = signals.wait_for(lambda key, s: s is not None and s.action == "ok" and s.limit == 100)[1]
    assert lifted.spent == 5 and lifted.key == "acme"
    assert guard.wait_for(lambda g: g.check(attribution={"tenant": "acme"}).action == "allow")

    again = runner.invoke(
        app, ["budgets", "diff", str(budgets_file), "--bootstrap", pipeline.broker.bootstrap]
    )
    assert again.exit_code == 0 and "no changes" in again.output

    # Lower the limit again to throttle, then remove the budget: its signal is deleted.
    apply(budgets_file, pipeline, calls_budget(limit=2))
    signals.wait_for(lambda key, s: s is not None and s.action == "throttle" and s.limit == 2)
    output = apply(budgets_file, pipeline, calls_budget(limit=50, budget_id="tenant-calls-v2"))
    assert "remove" in output and "tenant-calls" in output
    signals.wait_for(lambda key, s: key == "tenant:acme@tenant-calls" and s is None)
    assert guard.wait_for(lambda g: g.check(attribution={"tenant": "acme"}).action == "allow")

    listed = runner.invoke(app, ["budgets", "list", "--bootstrap", pipeline.broker.bootstrap])
    assert "tenant-calls-v2" in listed.output and "tenant-calls " not in listed.output
    assert "Traceback" not in pipeline.log("worker")
    guard.stop()
    signals.consumer.close()


@pytest.mark.slow
def test_an_ok_that_lifted_a_restriction_is_tombstoned_once_it_has_expired(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The topic keeps no `ok` for ever: once it expired, a tombstone ("no restriction") replaces it."""
    monkeypatch.setenv("BURNGUARD_TOPIC_BUDGETS", pipeline.topics.budgets)
    pipeline.write_budgets(calls_budget(limit=4))
    pipeline.start_worker(env={"BURNGUARD_SIGNAL_TTL_S": "3", "BURNGUARD_SIGNAL_REFRESH_S": "1"})
    key = "tenant:acme@tenant-calls"
    log = KafkaConsumer(
        pipeline.topics.signals, bootstrap_servers=pipeline.broker.bootstrap, auto_offset_reset="earliest"
    )
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    producer.send(pipeline.topics.spans, key=b"acme", value=otlp_batch("acme", [("chat", 10, 1)] * 5))
    producer.flush()
    seen = []  # (record timestamp in s, signal or None) of acme's key, in order

    def wait_for(predicate, timeout_s: float = 45.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in log.poll(timeout_ms=300).values():
                seen.extend(
                    (r.timestamp / 1000, Signal.from_json(r.value) if r.value else None)
                    for r in batch
                    if r.key.decode() == key
                )
            if found := [(at, s) for at, s in seen if predicate(s)]:
                return found[0]
        raise AssertionError(f"not seen within {timeout_s}s: {seen}")

    wait_for(lambda s: s is not None and s.action == "throttle")
    apply(tmp_path / "budgets.yaml", pipeline, calls_budget(limit=100))
    _, lifted = wait_for(lambda s: s is not None and s.action == "ok")
    retired_at, _ = wait_for(lambda s: s is None)
    assert retired_at >= lifted.expires_at.timestamp()  # never before the `ok` stopped mattering
    assert [s.action if s else None for _, s in seen][-2:] == ["ok", None]

    assert key.encode() not in read_compacted_topic(pipeline.kafka, pipeline.topics.signals)
    late = BudgetGuard(pipeline.kafka, pipeline.topics).start()  # a late subscriber: no restriction
    assert late.ready and late.held == (0, 0)
    assert late.check(attribution={"tenant": "acme"}).action == "allow"

    # The key's state went with its `ok`: spending on restricts it again.
    producer.send(pipeline.topics.spans, key=b"acme", value=otlp_batch("acme", [("chat", 10, 1)] * 96))
    producer.flush()
    wait_for(lambda s: s is not None and s.action == "throttle" and s.limit == 100)
    assert late.wait_for(lambda g: g.check(attribution={"tenant": "acme"}).action == "deny")
    assert "Traceback" not in pipeline.log("worker")
    late.stop()
    log.close()
    producer.close()
