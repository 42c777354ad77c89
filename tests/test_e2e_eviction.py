"""Bounded worker state through the real worker: closed windows, idle sessions and emptied rolling
keys are forgotten and tombstoned, their last snapshot and their spans kept; late spans within the
allowed lateness still count.

Event time is simulated by stamping spans days ahead of the wall clock. The broker's
LogAppendTime bounds span time, so the worker's (and sink's) allowed skew ahead is widened to
ten days; the worker's eviction clock is the latest trusted event time it decoded, so stamping a
span a day later moves the worker a day on (`stream/eviction.py`).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.snapshots import BudgetUsage
from kafka import KafkaProducer

from burnguard.cli.devstack import wait_until_consumed
from tests.fixtures.pipeline import Pipeline, read_to_end
from tests.support.otlp_batches import otlp_batch

BUDGETS = """
budgets:
  - id: tenant-day
    scope: tenant
    window: day
    metric: tokens
    limit: 1.0e9
  - id: tenant-hour
    scope: tenant
    window: 1h
    metric: tokens
    limit: 1.0e9
  - id: session-steps
    scope: session
    window: session
    metric: tool_calls
    limit: 2
    actions:
      - {at: 1.0, do: throttle}
context_guards:
  - id: long-context
    max_input_tokens: 1000
    growth_calls: 3
"""
TOOL = {attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.GEN_AI_TOOL_NAME: "search"}
SIZES = re.compile(r"table sizes: (\{[^}]*\})")
COUNTERS = re.compile(r"input counters: (\{.*\})")


def _ns(at: datetime) -> int:
    return int(at.timestamp()) * 1_000_000_000


def read_topic(pipeline: Pipeline, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) on a topic, oldest first per partition."""
    return [(record.key, record.value) for record in read_to_end(pipeline.broker.bootstrap, topic)]


def latest_changelog(pipeline: Pipeline, table: str) -> dict[str, Any]:
    """A table's changelog as a recovery reads it: each key's last value, None for a tombstone."""
    topic = f"{pipeline.env['BURNGUARD_STREAM_APP_ID']}-{table}-changelog"
    return {
        json.loads(key): (json.loads(value) if value is not None else None)
        for key, value in read_topic(pipeline, topic)
    }


def snapshots(pipeline: Pipeline) -> dict[bytes, BudgetUsage]:
    """The last budget usage snapshot per Kafka key (what compaction keeps)."""
    return {
        key: BudgetUsage.from_json(value) for key, value in read_topic(pipeline, pipeline.topics.budget_usage)
    }


def wait_until(check, what: str, timeout_s: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"never: {what}")


def spent(pipeline: Pipeline, key: str) -> float | None:
    usage = snapshots(pipeline).get(key.encode())
    return usage.spent if usage else None


def last_json(pattern: re.Pattern[str], log: str) -> dict[str, Any]:
    found = pattern.findall(log)
    return json.loads(found[-1]) if found else {}


@pytest.mark.slow
def test_closed_windows_idle_sessions_and_emptied_rolling_keys_are_forgotten(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(
        BURNGUARD_CLOCK_SKEW_AHEAD_S=str(10 * 86400),
        BURNGUARD_ALLOWED_LATENESS_S="3600",
        BURNGUARD_SESSION_IDLE_S="600",
        BURNGUARD_EVICT_INTERVAL_S="0.5",
    )
    sink = pipeline.start_sink()
    worker = pipeline.start_worker()
    now = datetime.now(UTC)
    day0 = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=3)
    day1 = day0 + timedelta(days=1)
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)

    def send(tenant: str, calls: list, at: datetime, **extra: Any) -> None:
        producer.send(
            pipeline.topics.spans, key=tenant.encode(), value=otlp_batch(tenant, calls, at=at, extra=extra)
        )
        producer.flush()

    old_day = f"tenant:old@tenant-day#{day0.isoformat()}"
    new_day = f"tenant:new@tenant-day#{day1.isoformat()}"
    # Day 0: tenant `old` in session s-old, one call and three tool steps (over a cap of two).
    send("old", [("chat", 100, 10)], day0 + timedelta(hours=1), **{attr.SESSION_ID: "s-old"})
    send("old", [("agent", 0, 0)] * 3, day0 + timedelta(hours=1), **TOOL, **{attr.SESSION_ID: "s-old"})
    wait_until(lambda: spent(pipeline, old_day) == 110.0, "old's day 0 at 110")
    pipeline.wait_for_signal(lambda s: s.key == "s-old" and s.action == "throttle", "s-old throttled")

    # Day 1, 00:30: day 0 closed half an hour ago, within the hour of allowed lateness. s-old has
    # been idle for 23 h, old's rolling hour is empty: both go, s-old's throttle with a tombstone.
    send("new", [("chat", 50, 5)], day1 + timedelta(minutes=30), **{attr.SESSION_ID: "s-new"})
    wait_until(
        lambda: (b"session:s-old@session-steps", None) in read_topic(pipeline, pipeline.topics.signals),
        "a tombstone for s-old's throttle",
    )
    # A late span for day 0 still finds its window (for old's emptied rolling hour it is too late).
    send("old", [("chat", 20, 5)], day0 + timedelta(hours=23))
    wait_until(lambda: spent(pipeline, old_day) == 135.0, "the late span counted in day 0")
    refused = lambda: last_json(COUNTERS, pipeline.log("worker")).get("late_after_eviction")  # noqa: E731
    wait_until(lambda: refused() == 1, "the late span refused by the rolling hour only")

    # Day 1, 02:00: day 0 ended more than the allowed lateness ago and goes; a span for it now is
    # too late and does not bring it back.
    send("new", [("chat", 30, 3)], day1 + timedelta(hours=2))
    day0_key = f"tenant-day|old|{_ns(day0)}"
    wait_until(
        lambda: day0_key in (log := latest_changelog(pipeline, "window-totals")) and log[day0_key] is None,
        "day 0's window tombstoned",
    )
    send("old", [("chat", 70, 0)], day0 + timedelta(hours=22))
    wait_until(lambda: refused() == 3, "the too-late span refused by the day and the rolling hour")

    totals = latest_changelog(pipeline, "window-totals")
    assert totals[day0_key] is None
    assert totals["tenant-hour|old|0"] is None
    assert totals["session-steps|s-old|0"] is None
    assert totals[f"tenant-day|new|{_ns(day1)}"][0] == 88.0  # live windows stay exact
    assert latest_changelog(pipeline, "context-growth")["long-context|s-old"] is None
    assert latest_changelog(pipeline, "signal-states")["session-steps|s-old"] is None
    live = {key for key, value in totals.items() if value is not None and not key.startswith("~")}
    assert live == {f"tenant-day|new|{_ns(day1)}", "tenant-hour|new|0"}

    # Their last snapshots stay on the usage topic; the live window's is exact.
    kept = snapshots(pipeline)
    assert kept[old_day.encode()].spent == 135.0
    assert kept[b"session:s-old@session-steps"].spent == 3.0
    assert b"tenant:old@tenant-hour" in kept
    wait_until(lambda: spent(pipeline, new_day) == 88.0, "new's day 1 at 88")
    sizes = {"window-totals": 2, "context-growth": 0, "signal-states": 0}
    wait_until(lambda: last_json(SIZES, pipeline.log("worker")) == sizes, f"table sizes {sizes}")

    # Their spans stay in ClickHouse: all six of `old`, the too-late one too.
    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    assert pipeline.clickhouse_query("queries.span_count(client, tenant='old')") == 6

    # A restarted worker recovers only the live state.
    pipeline.stop(worker)
    logged = len(pipeline.log("worker"))
    pipeline.start_worker()
    wait_until(lambda: last_json(SIZES, pipeline.log("worker")[logged:]) == sizes, "recovered sizes")
