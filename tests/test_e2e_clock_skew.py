"""A span's event time is trusted only near its record's broker time (LogAppendTime on `otlp_spans`).

Spans stamped a day ahead, ten years ahead and a day behind all count in today's
window of the budget, at the record's time, and are flagged (counter in the
worker, the claimed time in ClickHouse's `extra`); a span late by less than the
allowed lateness still counts at its own time. "Today" is the day of a time zone in which it is
about noon when the test runs, so no midnight falls between the spans, whenever it runs.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.contracts.span_checks import CLOCK_CORRECTED
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budgets_yaml, tenant_cost
from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

COST = 0.25


def zone_at_noon(now: datetime) -> str:
    """A fixed-offset zone (`Etc/GMT...`, whose sign is reversed) where `now` is 11:30-12:30."""
    offset = 12 - round(now.hour + now.minute / 60)
    return f"Etc/GMT{-offset:+d}"


def usage_windows(pipeline: Pipeline) -> dict[str, BudgetUsage]:
    return dict(pipeline.usage_snapshots())


def test_the_spans_topic_is_stamped_by_the_broker(pipeline: Pipeline) -> None:
    admin = KafkaAdminClient(bootstrap_servers=pipeline.broker.bootstrap)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, pipeline.topics.spans)])
    finally:
        admin.close()
    (by_name,) = described.values()
    config = by_name[pipeline.topics.spans]["message.timestamp.type"]
    assert "LogAppendTime" in str(config)


@pytest.mark.slow
def test_spans_stamped_far_ahead_or_behind_count_in_todays_window(pipeline: Pipeline) -> None:
    now = datetime.now(UTC)
    zone = zone_at_noon(now)
    pipeline.write_budgets(budgets_yaml(tenant_cost(1.0, timezone=zone)))
    worker = pipeline.start_worker()
    sink = pipeline.start_sink()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    stamps = {
        "day-ahead": now + timedelta(days=1),
        "ten-years-ahead": now + timedelta(days=3653),
        "day-behind": now - timedelta(days=1),
        "ten-minutes-late": now - timedelta(minutes=10),  # within the allowed lateness: its own time
    }
    for at in stamps.values():
        payload = otlp_batch("acme", [("chat", 100, 10)], at=at, extra={attr.COST_USD: COST})
        producer.send(pipeline.topics.spans, key=b"acme", value=payload, partition=0)
    producer.flush()
    producer.close()

    today = now.astimezone(ZoneInfo(zone)).replace(hour=0, minute=0, second=0, microsecond=0)
    deadline, windows = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        windows = {key: usage for key, usage in usage_windows(pipeline).items() if usage.key == "acme"}
        if [usage.spent for usage in windows.values()] == [COST * len(stamps)]:
            break
        time.sleep(0.5)
    (usage,) = windows.values()
    assert usage.window_start == today and usage.spent == COST * len(stamps) and usage.spans == 4
    pipeline.wait_for_log("worker", '"clock_corrected_spans": 3', 10, worker)  # logged with the counters

    topics = [pipeline.topics.spans]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    rows = pipeline.clickhouse_query(
        "[[str(r[0]), r[1]] for r in client.query("
        f"\"SELECT toDate(end_time, '{zone}'), extra['{CLOCK_CORRECTED}'] "
        'FROM genai_spans FINAL").result_rows]'
    )
    assert sorted(day for day, _ in rows) == [str(today.date())] * 4
    claimed = sorted(int(ns) for _, ns in rows if ns)
    expected = sorted(
        int(stamps[name].timestamp() * 1e9) for name in ("day-ahead", "ten-years-ahead", "day-behind")
    )
    assert claimed == pytest.approx(expected, abs=1e6)
    assert json.dumps(rows)
