"""`burnguard budgets simulate`: a seeded history with answers worked out by hand, and agreement with
the live worker on the same spans.

The seeded history (written to the real chDB engine, read back by the command):

acme, tenant-daily ($10 a day; warn 50%, downgrade 80% to standard, throttle 100%): 30 gpt-4.1 calls
  of $0.50 (1000 in, 100 out), one a minute from 2026-11-10 10:00, each ending 2 s after it starts.
  Spent after call i (0-based) = 0.5 (i + 1): warn at $5 (call 9, 10:09:02), downgrade at $8
  (call 15, 10:15:02), throttle at $10 (call 19, 10:19:02). Calls that met warn: 10..15 = 6;
  downgrade: 16..19 = 4, each saving 0.50 - (1000 x $100 + 100 x $1000)/1M = 0.50 - 0.20 = $0.30
  at gpt-4.1-mini's overridden price, $1.20 in all; throttle: 20..29 = 10 calls, $5.00 refused.
  One more call the next day at 00:30 meets a new window: back to ok, not refused.
initech, calls-hourly (rolling 1h, 5 calls, throttle at 100%): calls at 09:00, :10, :20, :30, :40
  -> throttle at 09:40:02; the 09:50 call is refused (5 calls in the last hour); at 10:45 only the
  09:50 call is left in the hour: ok again, that call is made.
globex, session-cap (3 calls a session, throttle at 100%): session s1 has 5 calls from 11:00 ->
  throttle after the third (11:02:02), 2 calls refused ($0.04); s2 has 2 calls: nothing.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from signal import SIGCONT, SIGSTOP

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import ClickHouseWriter, connect
from burnguard.sinks.replay import read_spans
from burnguard.sinks.schema import migrate
from burnguard.stream.app import _has_steps
from burnguard.stream.records import sub_batches
from burnguard.stream.simulate import simulate
from kafka import KafkaConsumer, KafkaProducer
from rich.console import Console
from typer.testing import CliRunner

from burnguard.cli import app
from burnguard.cli.devstack import wait_until_consumed
from tests.factories import LADDER_YAML, WARN_DOWNGRADE_THROTTLE, budget, budgets_yaml, span_usage
from tests.fixtures.pipeline import Pipeline, read_to_end
from tests.support.otlp_batches import otlp_batch

BUDGETS = """
model_classes:
  premium: [gpt-4.1]
  standard: [gpt-4.1-mini]
downgrade:
  gpt-4.1: gpt-4.1-mini
prices:
  gpt-4.1-mini: {input_mtok: 100, output_mtok: 1000}
budgets:
  - id: tenant-daily
    scope: tenant
    window: day
    limit: 10
    actions:
      - {at: 0.5, do: warn}
      - {at: 0.8, do: downgrade, to: standard}
      - {at: 1.0, do: throttle}
  - id: calls-hourly
    scope: tenant
    match: initech
    window: 1h
    metric: calls
    limit: 5
    actions:
      - {at: 1.0, do: throttle}
  - id: session-cap
    scope: session
    window: session
    metric: calls
    limit: 3
    actions:
      - {at: 1.0, do: throttle}
"""
DAY = datetime(2026, 11, 10, tzinfo=UTC)
runner = CliRunner()


def _call(at: datetime, tenant: str, cost: float, session: str = "") -> SpanUsage:
    return span_usage(
        at,
        duration_s=2.0,
        name="chat gpt-4.1",
        provider="openai",
        request_model="gpt-4.1",
        response_model="gpt-4.1",
        tenant=tenant,
        session=session,
        input_tokens=1000,
        output_tokens=100,
        cost_usd=cost,
    )


def seeded_history() -> list[SpanUsage]:
    acme = [_call(DAY.replace(hour=10) + timedelta(minutes=i), "acme", 0.5) for i in range(30)]
    acme.append(_call(DAY + timedelta(days=1, minutes=30), "acme", 0.5))
    initech = [
        _call(DAY.replace(hour=9) + timedelta(minutes=m), "initech", 0.01)
        for m in (0, 10, 20, 30, 40, 50, 105)
    ]
    globex = [_call(DAY.replace(hour=11) + timedelta(minutes=m), "globex", 0.02, "s1") for m in range(5)]
    globex += [_call(DAY.replace(hour=12) + timedelta(minutes=m), "globex", 0.02, "s2") for m in range(2)]
    return [*acme, *initech, *globex]


def _t(hour: int, minute: int, day: int = 10) -> str:
    return datetime(2026, 11, day, hour, minute, 2, tzinfo=UTC).isoformat()


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"chdb://{tmp_path_factory.mktemp('simulate') / 'clickhouse'}"
    client = connect(dsn)
    try:
        migrate(client)
        history = seeded_history()
        ClickHouseWriter(client).insert_spans(history[::-1])  # insert order must not matter
        ClickHouseWriter(client).insert_spans(history[:3])  # re-delivered: read with FINAL, counted once
    finally:
        client.close()
    return dsn


def _simulate_json(dsn: str, tmp_path: Path) -> dict:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(BUDGETS)
    args = ["budgets", "simulate", str(budgets), "--since", "3d", "--until", "2026-11-12T00:00:00"]
    result = runner.invoke(app, [*args, "--json", "--dsn", dsn], terminal_width=300)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_simulate_reports_the_hand_computed_rungs(dsn: str, tmp_path: Path) -> None:
    report = _simulate_json(dsn, tmp_path)
    assert report["spans"] == 31 + 7 + 7
    keys = {(k["budget"], k["key"]): k for k in report["keys"]}
    assert set(keys) == {("calls-hourly", "initech"), ("session-cap", "s1"), ("tenant-daily", "acme")}

    acme = keys[("tenant-daily", "acme")]["rungs"]
    assert [acme[r]["first_at"] for r in ("warn", "downgrade", "throttle")] == [
        _t(10, 9),
        _t(10, 15),
        _t(10, 19),
    ]
    assert (acme["warn"]["calls"], acme["downgrade"]["calls"], acme["throttle"]["calls"]) == (6, 4, 10)
    assert acme["downgrade"]["saving"] == pytest.approx(1.2)
    assert acme["throttle"]["spend"] == pytest.approx(5.0)
    changes = keys[("tenant-daily", "acme")]["changes"]
    assert changes == [
        [_t(10, 9), "warn", 5.0],
        [_t(10, 15), "downgrade", 8.0],
        [_t(10, 19), "throttle", 10.0],
        [_t(0, 30, day=11), "ok", 0.0],
    ]

    initech = keys[("calls-hourly", "initech")]
    assert initech["rungs"]["throttle"]["first_at"] == _t(9, 40)
    assert initech["rungs"]["throttle"]["calls"] == 1
    assert [c[1] for c in initech["changes"]] == ["throttle", "ok"]
    assert initech["changes"][1][0] == _t(10, 45)

    s1 = keys[("session-cap", "s1")]["rungs"]["throttle"]
    assert (s1["first_at"], s1["calls"], round(s1["spend"], 6)) == (_t(11, 2), 2, 0.04)


def test_simulate_table_and_report_section(dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(BUDGETS)
    args = ["budgets", "simulate", str(budgets), "--since", "3d", "--until", "2026-11-12T00:00:00"]
    # The CLI's console took its width when imported (from COLUMNS, if set then, as pytest-xdist does)
    monkeypatch.setattr(sys.modules["burnguard.cli.simulate"], "console", Console(width=250))
    result = runner.invoke(app, [*args, "--dsn", dsn])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "tenant=acme" in line)
    assert "2026-11-10 10:09" in row and "2026-11-10 10:19" in row and " 1.2 " in row and " 5.0 " in row

    out = tmp_path / "report.html"
    report = ["report", "-o", str(out), "--since", "3d", "--until", "2026-11-12T00:00:00", "--dsn", dsn]
    result = runner.invoke(app, [*report, "--budgets", str(budgets)], terminal_width=250)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Budget what-if (simulated on this range)" in page and "tenant=acme" in page


def test_simulate_bad_input_is_one_line_and_exit_1(dsn: str, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(BUDGETS.replace("limit: 10", "limit: -10"))
    cases = [
        ([str(budgets)], f"{budgets}:13: budgets[0].limit"),
    ]
    good = tmp_path / "good.yaml"
    good.write_text(BUDGETS)
    cases += [
        ([str(good), "--until", "2099-01-01T00:00:00"], "is in the future"),
        ([str(good), "--since", "1d", "--until", "2026-10-01T00:00:00"], "no spans in ClickHouse"),
        ([str(good), "--since", "30 days"], "use a number and m, h, d or w"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["budgets", "simulate", *args, "--dsn", dsn], terminal_width=300)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_read_spans_gives_back_what_was_stored_in_event_order(dsn: str) -> None:
    client = connect(dsn)
    try:
        spans = list(read_spans(client, DAY, DAY + timedelta(days=2)))
    finally:
        client.close()
    assert [s.end_ns for s in spans] == sorted(s.end_ns for s in seeded_history())
    first = spans[0]
    assert (first.tenant, first.cost_usd, first.input_tokens, first.model) == (
        "initech",
        0.01,
        1000,
        "gpt-4.1",
    )


AGREEMENT_BUDGETS = budgets_yaml(
    budget("tenant-daily", 0.05, window="day", actions=WARN_DOWNGRADE_THROTTLE),
    budget(
        "feature-calls",
        4,
        scope=["tenant", "feature"],
        window="day",
        metric="calls",
        actions=[{"at": 0.5, "do": "warn"}, {"at": 1.0, "do": "throttle"}],
    ),
    head=LADDER_YAML,
)


def _changes(signals: list[Signal]) -> dict[str, list[tuple[str, float]]]:
    """(action, spent) of each change of action per signal key, refreshes left out."""
    changes: dict[str, list[tuple[str, float]]] = {}
    for signal in signals:
        seen = changes.setdefault(signal.kafka_key, [])
        if (seen[-1][0] if seen else "ok") != signal.action:
            seen.append((signal.action, signal.spent))
    return changes


def _send_calls(
    pipeline: Pipeline, producer: KafkaProducer, calls: list[tuple[str, str]], pause: float
) -> None:
    for tenant, feature in calls:  # gpt-4.1, 2000 in / 500 out: $0.008 a call
        producer.send(
            pipeline.topics.spans, key=tenant.encode(), value=otlp_batch(tenant, [(feature, 2000, 500)])
        )
        producer.flush()
        time.sleep(pause)


@pytest.mark.slow
@pytest.mark.parametrize("lag", ["live", "paused", "catch-up"])
def test_simulate_agrees_with_the_live_worker_on_the_same_spans(
    pipeline: Pipeline, tmp_path: Path, lag: str
) -> None:
    """The worker accounts live spans; simulate replays the same spans from ClickHouse (written by the
    sink); both must publish the same changes with the same spend.

    Also when the worker lags, so that stage 1 sums the one-call messages of a micro-batch per key
    (`GroupRows`): `paused`, the worker stands still (SIGSTOP, well inside its session) after each
    spans partition's first message while the calls are produced; `catch-up`, every call is in the
    topic before the worker starts. Each rung must still be published at the call that crossed it.
    """
    budgets = pipeline.write_budgets(AGREEMENT_BUDGETS)
    calls = [("acme", "chat"), ("acme", "search"), ("globex", "chat")] * 4 + [("acme", "chat")] * 3
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    if lag == "catch-up":
        _send_calls(pipeline, producer, calls, 0)
    worker = pipeline.start_worker()
    sink = pipeline.start_sink()
    if lag == "paused":
        _send_calls(pipeline, producer, calls[:3], 0)  # the first message of each tenant's partition
        group = pipeline.env["BURNGUARD_STREAM_APP_ID"]
        assert wait_until_consumed(pipeline.broker.bootstrap, group, [pipeline.topics.spans]) == 0
        worker.send_signal(SIGSTOP)
        try:
            _send_calls(pipeline, producer, calls[3:], 0)
            time.sleep(1)
        finally:
            worker.send_signal(SIGCONT)
    elif lag == "live":
        _send_calls(pipeline, producer, calls, 0.05)
    live = pipeline.wait_for_signal(lambda s: s.key == "acme" and s.action == "throttle", "acme throttled")
    assert live.budget == "tenant-daily"
    time.sleep(1)  # the worker has the other keys' changes out by now (their spans came earlier)
    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    consumer = KafkaConsumer(
        pipeline.topics.signals, bootstrap_servers=pipeline.broker.bootstrap, auto_offset_reset="earliest"
    )
    records: list = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=500)
        if not batch and records:
            break
        for part in batch.values():
            records.extend(part)
    consumer.close()
    live_changes = _changes([Signal.from_json(r.value) for r in records if r.value is not None])

    pipeline.stop(sink)  # a chDB directory is opened by one process at a time
    expected_spans = pipeline.clickhouse_query(
        "client.query('SELECT count() FROM genai_spans FINAL').result_rows[0][0]"
    )
    assert expected_spans == len(calls)
    client = connect(pipeline.clickhouse_dsn)
    try:
        now = datetime.now(UTC)
        simulation = simulate(
            parse_budget_yaml(budgets.read_text()), read_spans(client, now - timedelta(hours=1), now)
        )
    finally:
        client.close()
    assert simulation.spans == len(calls)
    simulated = {
        f"{r.scope}:{r.key}@{r.budget}": [(action, spent) for _, action, spent in r.changes]
        for r in simulation.reports.values()
    }
    assert simulated == live_changes
    # and the answers are the ones worked out by hand: acme spends $0.008 a call; five of them add up to
    # 0.03999... in floating point, just below 80% of $0.05, so the sixth call downgrades
    assert live_changes["tenant:acme@tenant-daily"] == [
        ("warn", 0.032),
        ("downgrade", 0.048),
        ("throttle", 0.056),
    ]
    assert live_changes["tenant+feature:acme/chat@feature-calls"] == [("warn", 2.0), ("throttle", 4.0)]
    assert live_changes["tenant:globex@tenant-daily"] == [("warn", 0.032)]
    if lag != "live":  # the lag did make stage 1 sum messages: rows with per-message steps
        assert _combined_rows(pipeline), "no row summed several messages: the test would prove nothing"


def _combined_rows(pipeline: Pipeline) -> int:
    """The usage topic's delta rows that carry several messages' steps (`GroupRows`)."""
    records = read_to_end(pipeline.broker.bootstrap, pipeline.topics.usage)
    return sum(
        _has_steps(row)
        for record in records
        if record.value and b'"batches"' in record.value
        for batch in sub_batches(json.loads(record.value))
        for row in batch.deltas
    )
