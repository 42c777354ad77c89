"""Migrations 2 and 3 on the real chDB engine: rollups, backfill, retention, rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks import schema
from burnguard.sinks.clickhouse import SPAN_COLUMNS, ClickHouseWriter, connect, span_columns
from burnguard.sinks.schema import (
    MIGRATIONS,
    MIGRATIONS_TABLE,
    ROLLUPS,
    SPANS_TABLE,
    USAGE_1M_TABLE,
    migrate,
    rebuild_rollups,
    set_retention,
)
from clickhouse_connect.driver.client import Client

from tests.support import dashboard_scenario as sc


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        yield client
    finally:
        client.close()


def _create_query(client: Client, table: str) -> str:
    result = client.query(
        "SELECT create_table_query FROM system.tables"
        " WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": table},
    )
    return result.result_rows[0][0]


def test_schema_migrations_are_versioned_and_idempotent(client: Client) -> None:
    assert migrate(client) == [m.version for m in MIGRATIONS]
    assert migrate(client) == []
    engines = dict(
        client.query("SELECT name, engine FROM system.tables WHERE database = currentDatabase()").result_rows
    )
    for table, view in ROLLUPS.items():
        assert engines[table] == "AggregatingMergeTree"
        assert engines[view] == "MaterializedView"
    versions = sorted(row[0] for row in client.query(f"SELECT version FROM {MIGRATIONS_TABLE}").result_rows)
    assert versions == [m.version for m in MIGRATIONS]


def insert_as_before_migration_5(client: Client, spans: list[SpanUsage]) -> None:
    """Write spans the way a sink of schema version 4 or older did: without the routing columns."""
    later = {"routed_from", "route", "fallback", "escalated_from", "refused", "stakes"}
    kept = [i for i, name in enumerate(SPAN_COLUMNS) if name not in later]
    columns = span_columns(spans)
    ClickHouseWriter(client)._insert(SPANS_TABLE, [SPAN_COLUMNS[i] for i in kept], [columns[i] for i in kept])


def test_schema_upgrade_backfills_rollups_from_existing_spans(client: Client) -> None:
    """A database at version 1 with spans in it gets rollups that already count them."""
    for statement in MIGRATIONS[0].statements:
        client.command(statement, parameters={"span_ttl_days": 400} if "span_ttl_days" in statement else None)
    client.command(
        MIGRATIONS_TABLE.join(
            [
                "CREATE TABLE IF NOT EXISTS ",
                " (version UInt32, name String, "
                "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree(applied_at) "
                "ORDER BY version",
            ]
        )
    )
    client.insert(MIGRATIONS_TABLE, [[1, MIGRATIONS[0].name]], column_names=["version", "name"])
    insert_as_before_migration_5(client, sc.scenario_spans())
    assert migrate(client) == [m.version for m in MIGRATIONS[1:]]
    spend = client.command(f"SELECT round(sum(cost_usd), 6) FROM {USAGE_1M_TABLE}")
    assert float(spend) == pytest.approx(sc.EXPECTED["spend_total"] + 9.99)  # the old span too
    calls = client.query(
        "SELECT session, length(groupArraySortedIfMerge(30)(first_calls)) FROM genai_sessions "
        "GROUP BY session ORDER BY session"
    ).result_rows
    assert calls == [("s-old", 1), ("s1", 4), ("s2", 3)]


def test_schema_retention_is_configurable(client: Client) -> None:
    migrate(client, span_ttl_days=30, rollup_ttl_days=365, signal_ttl_days=90)
    assert "toIntervalDay(_CAST(30, 'UInt32'))" in _create_query(client, SPANS_TABLE)
    assert "toIntervalDay(_CAST(365, 'UInt32'))" in _create_query(client, USAGE_1M_TABLE)
    assert "toIntervalDay(_CAST(90, 'UInt32'))" in _create_query(client, "budget_signals")
    set_retention(client, span_ttl_days=7, rollup_ttl_days=60, signal_ttl_days=14)
    assert "toIntervalDay(_CAST(7, 'UInt32'))" in _create_query(client, SPANS_TABLE)
    assert "toIntervalDay(_CAST(60, 'UInt32'))" in _create_query(client, "genai_traces")
    with pytest.raises(ValueError, match="positive"):
        set_retention(client, rollup_ttl_days=0)


def test_schema_rebuild_makes_rollups_exact_after_redelivery(client: Client) -> None:
    migrate(client)
    writer = ClickHouseWriter(client)
    spans = sc.scenario_spans()
    writer.insert_spans(spans)
    writer.insert_spans(spans[:5])  # re-delivered
    exact = float(client.command(f"SELECT sum(cost_usd) FROM {SPANS_TABLE} FINAL"))
    doubled = float(client.command(f"SELECT sum(cost_usd) FROM {USAGE_1M_TABLE}"))
    assert doubled > exact
    rebuild_rollups(client)
    assert float(client.command(f"SELECT sum(cost_usd) FROM {USAGE_1M_TABLE}")) == pytest.approx(exact)
    writer.insert_spans(spans[1:2])  # the views still feed the rebuilt rollups (a 0.10 USD call)
    assert float(client.command(f"SELECT sum(cost_usd) FROM {USAGE_1M_TABLE}")) > exact


def _call(span_id: str, model: str, cost: float, **routing: Any) -> SpanUsage:
    start = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z
    return SpanUsage(
        trace_id="a" * 32,
        span_id=span_id,
        parent_span_id="",
        name=f"chat {model}",
        start_ns=start,
        end_ns=start + 10**9,
        operation="chat",
        provider="openai",
        request_model=model,
        tenant="acme",
        feature="extract",
        input_tokens=0 if routing.get("refused") else 100,
        cost_usd=cost,
        **routing,
    )


def test_routed_fallback_escalated_and_refused_calls_are_counted_apart(client: Client) -> None:
    migrate(client)
    ClickHouseWriter(client).insert_spans(
        [
            _call("1" * 16, "gpt-4.1", 0.01),
            _call("2" * 16, "gpt-4.1-nano", 0.001, routed_from="gpt-4.1", route="routine", fallback=True),
            _call("3" * 16, "gpt-4.1-mini", 0.004, escalated_from="gpt-4.1-nano", stakes="high"),
            _call("4" * 16, "gpt-4.1", 0.0, refused="budget"),
            # Routed up to gpt-4.1, then downgraded back to the class asked for: no fallback.
            _call("5" * 16, "gpt-4.1-mini", 0.004, routed_from="gpt-4.1-mini", downgraded_from="gpt-4.1"),
            # Another instrumentation's downgrade: only downgraded_from says it.
            _call("6" * 16, "gpt-4.1-mini", 0.004, downgraded_from="gpt-4.1"),
        ]
    )
    row = client.query(
        f"SELECT sum(model_calls), sum(fallback_calls), sum(routed_calls), sum(escalated_calls),"
        f" round(sum(escalation_cost_usd), 6), sum(refused_calls) FROM {USAGE_1M_TABLE}"
    ).result_rows[0]
    assert row == (5, 2, 2, 1, 0.004, 1)  # the refused call is not a model call
    stored = client.query(
        f"SELECT route, fallback, escalated_from, refused, stakes FROM {SPANS_TABLE} FINAL ORDER BY span_id"
    ).result_rows
    assert stored == [
        ("", 0, "", "", ""),
        ("routine", 1, "", "", ""),
        ("", 0, "gpt-4.1-nano", "", "high"),
        ("", 0, "", "budget", ""),
        ("", 0, "", "", ""),
        ("", 0, "", "", ""),
    ]
    traces = client.query("SELECT sum(model_calls) FROM genai_traces").result_rows[0][0]
    assert traces == 5


def test_migration_5_keeps_rollup_history_older_than_the_spans(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS[:4])
    migrate(client)
    insert_as_before_migration_5(client, sc.scenario_spans())
    spend = f"SELECT round(sum(cost_usd), 6) FROM {USAGE_1M_TABLE}"
    before = float(client.command(spend))
    assert before > 0
    client.command(f"TRUNCATE TABLE {SPANS_TABLE}")  # the spans' TTL (400 days) passed; rollups keep 800
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
    assert migrate(client) == [5]
    assert float(client.command(spend)) == pytest.approx(before)
    assert client.command(f"SELECT sum(fallback_calls) FROM {USAGE_1M_TABLE}") == 0  # new column, old rows
