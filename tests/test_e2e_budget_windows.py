"""Windows through the real worker: calendar days in a non-UTC zone, late spans, a session cap,
and a rolling window whose snapshots keep one row on the compacted topic."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.signals import Signal
from burnguard.contracts.snapshots import BudgetUsage
from kafka import KafkaProducer

from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

BUDGETS = """
budgets:
  - id: tokyo-day
    scope: tenant
    window: day
    timezone: Asia/Tokyo
    metric: tokens
    limit: 1.0e9
  - id: tenant-hour
    scope: tenant
    window: 1h
    metric: tokens
    limit: 1.0e9
  - id: agent-steps
    scope: session
    window: session
    metric: tool_calls
    limit: 3
    actions:
      - {at: 1.0, do: throttle}
context_guards:
  - id: long-context
    max_input_tokens: 1000
    growth_calls: 3
"""
TOKYO = ZoneInfo("Asia/Tokyo")


def last_tokyo_midnight(now: datetime) -> datetime:
    """The latest Tokyo midnight at least five minutes ago (so spans around it are in the past)."""
    local = (now - timedelta(minutes=5)).astimezone(TOKYO)
    return datetime(local.year, local.month, local.day, tzinfo=TOKYO).astimezone(UTC)


def usage_records(pipeline: Pipeline) -> list[tuple[str, BudgetUsage]]:
    """Every (Kafka key, snapshot) on the budget usage topic, oldest first."""
    return pipeline.usage_snapshots()


def snapshots(pipeline: Pipeline) -> dict[tuple[str, str, datetime], BudgetUsage]:
    return {(usage.budget, usage.key, usage.window_start): usage for _, usage in usage_records(pipeline)}


def wait_for_spent(pipeline: Pipeline, expected: dict, timeout_s: float = 45) -> dict:
    deadline = time.monotonic() + timeout_s
    seen: dict = {}
    while time.monotonic() < deadline:
        seen = {k: u.spent for k, u in snapshots(pipeline).items() if k in expected}
        if seen == expected:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"snapshots {seen} never became {expected}")


@pytest.mark.slow
def test_tokyo_days_late_spans_session_step_cap_and_context_growth(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env["BURNGUARD_ALLOWED_LATENESS_S"] = str(2 * 86400)
    pipeline.start_worker()
    midnight = last_tokyo_midnight(datetime.now(UTC))
    yesterday, today = midnight - timedelta(days=1), midnight
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    send = lambda payload: producer.send(pipeline.topics.spans, key=b"acme", value=payload)  # noqa: E731
    send(otlp_batch("acme", [("chat", 90, 10)], at=midnight + timedelta(minutes=1)))  # today in Tokyo
    send(otlp_batch("acme", [("chat", 40, 10)], at=midnight - timedelta(minutes=1)))  # yesterday in Tokyo
    producer.flush()
    wait_for_spent(pipeline, {("tokyo-day", "acme", today): 100.0, ("tokyo-day", "acme", yesterday): 50.0})

    # A late span for yesterday arrives after today's: it lands in yesterday's window only.
    # One stamped three days back is beyond the allowed lateness of two days: its clock is not
    # trusted, it counts at its record's (broker) time, today.
    untrusted = send(otlp_batch("acme", [("chat", 7, 3)], at=midnight - timedelta(days=3, hours=1)))
    send(otlp_batch("acme", [("chat", 25, 5)], at=midnight - timedelta(hours=2)))
    producer.flush()
    # today's Tokyo day, unless a Tokyo midnight passed since the test began
    record_day = last_tokyo_midnight(datetime.fromtimestamp(untrusted.get().timestamp / 1000, UTC))
    expected = {("tokyo-day", "acme", today): 100.0, ("tokyo-day", "acme", yesterday): 80.0}
    expected[("tokyo-day", "acme", record_day)] = expected.get(("tokyo-day", "acme", record_day), 0.0) + 10.0
    wait_for_spent(pipeline, expected)
    assert not [k for k in snapshots(pipeline) if k[2] < yesterday], "a span counted in a closed window"
    assert "counted at the record time" in pipeline.log("worker")

    # An agent loop: four tool steps in one session against a cap of three.
    tool = {
        attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL,
        attr.GEN_AI_TOOL_NAME: "search",
        attr.SESSION_ID: "s1",
    }
    send(otlp_batch("acme", [("agent", 0, 0)] * 4, extra=tool))
    producer.flush()
    throttle = wait_for_signal(pipeline, "agent-steps", "throttle")
    assert (throttle.scope, throttle.key, throttle.spent, throttle.limit) == ("session", "s1", 4.0, 3.0)
    assert "tool_calls" in throttle.reason

    # A session whose prompts keep growing: 400, 700, 900, 1200, 1500 input tokens per call.
    session = {attr.SESSION_ID: "s2"}
    start = datetime.now(UTC) - timedelta(minutes=1)
    for step, tokens in enumerate([400, 700, 900, 1200, 1500]):
        send(otlp_batch("acme", [("agent", tokens, 50)], at=start + timedelta(seconds=step), extra=session))
    producer.flush()
    warn = wait_for_signal(pipeline, "long-context", "warn")
    # The third growing call (700 -> 900 -> 1200) past 1000 tokens is the first warn.
    assert (warn.scope, warn.key, warn.spent, warn.limit) == ("session", "s2", 1200.0, 1000.0)
    assert "grew over 3 consecutive calls" in warn.reason

    # The rolling hour's snapshots move their window start with the clock, but keep one Kafka key,
    # so the compacted topic keeps one row for acme's rolling hour, not one per snapshot.
    deadline = time.monotonic() + 30
    while True:
        rolling = [(key, usage) for key, usage in usage_records(pipeline) if usage.budget == "tenant-hour"]
        if (rolling and rolling[-1][1].spent >= 4950) or time.monotonic() > deadline:  # s2's five calls
            break
        time.sleep(0.5)
    assert {key for key, _ in rolling} == {"tenant:acme@tenant-hour"}
    assert len({usage.window_start for _, usage in rolling}) > 1, "only one rolling snapshot was seen"
    assert rolling[-1][1].spent >= 4950 and rolling[-1][1].window == "1h"
    daily = {key for key, usage in usage_records(pipeline) if usage.budget == "tokyo-day"}
    assert daily == {f"tenant:acme@tokyo-day#{day.isoformat()}" for day in (yesterday, today)}


def wait_for_signal(pipeline: Pipeline, budget: str, action: str) -> Signal:
    return pipeline.wait_for_signal(
        lambda s: s.budget == budget and s.action == action, f"{action} for {budget}"
    )
