"""The sink's ClickHouse side against the real chDB engine, without Kafka.

Migrations, the batch writer (every field, redelivery collapsing), signals, the
DSN, and the one-process-per-directory rule of chDB the sink is designed around.
The Kafka consumer's tests are in `test_sink_consumer.py`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks import queries
from burnguard.sinks.clickhouse import (
    ChdbDirectoryBusy,
    ClickHouseWriter,
    KafkaOrigin,
    connect,
    default_dsn,
    redact_dsn,
)
from burnguard.sinks.schema import MIGRATIONS, MIGRATIONS_TABLE, SIGNALS_TABLE, SPANS_TABLE, migrate
from clickhouse_connect.driver.client import Client

from tests.fixtures.sink import (  # noqa: F401  (fixtures by name)
    HOLD_DIRECTORY,
    TENANTS,
    budget_signal,
    chdb_client_fixture,
    chdb_dsn_fixture,
    open_chdb,
)

_HOUR_AGO_NS = time.time_ns() - 3600 * 1_000_000_000


def _usage(i: int, tenant: str, cost: float | None) -> SpanUsage:
    start = _HOUR_AGO_NS + i * 1_000_000_123  # recent: rows past the TTL are dropped on insert
    return SpanUsage(
        trace_id=f"{i // 2:032x}",
        span_id=f"{i:016x}",
        parent_span_id="" if i % 2 == 0 else f"{i - 1:016x}",
        name="chat gpt-4.1",
        start_ns=start,
        end_ns=start + 987_654_321,
        operation="chat",
        provider="openai",
        request_model="gpt-4.1",
        response_model="gpt-4.1-2025-04-14",
        service="checkout-api",
        tenant=tenant,
        user=f"u-{i % 5}",
        workflow="triage",
        feature="summarize",
        session=f"s-{i % 3}",
        action="click",
        input_tokens=1000 + i,
        output_tokens=200 + i,
        cache_read_tokens=100,
        cache_creation_tokens=50,
        reasoning_tokens=7,
        tool_calls=i % 3,
        tool_name="",
        agent_name="researcher",
        conversation_id=f"conv-{i}",
        cost_usd=cost,
        model_class="premium",
        downgraded_from="o3" if i % 4 == 0 else "",
        error_type="RateLimitError" if i % 7 == 0 else "",
        status_error=i % 7 == 0,
        extra={"gen_ai.response.id": f"resp-{i}"} if i % 2 else {},
    )


def _create_query(client: Client, table: str) -> str:
    result = client.query(
        "SELECT create_table_query FROM system.tables"
        " WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": table},
    )
    return result.result_rows[0][0]


def test_migrations_are_idempotent(chdb_client: Client) -> None:
    assert migrate(chdb_client) == [m.version for m in MIGRATIONS]
    assert migrate(chdb_client) == []
    tables = dict(
        chdb_client.query(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name"
        ).result_rows
    )
    for table in (SIGNALS_TABLE, SPANS_TABLE, MIGRATIONS_TABLE):
        assert tables[table] == "ReplacingMergeTree"
    versions = chdb_client.query(f"SELECT version, name FROM {MIGRATIONS_TABLE} ORDER BY version").result_rows
    assert versions == [(m.version, m.name) for m in MIGRATIONS]  # each applied once, in order
    ttl = _create_query(chdb_client, SPANS_TABLE)
    assert "TTL toDateTime(start_time) + toIntervalDay(_CAST(400, 'UInt32'))" in ttl


def test_span_ttl_is_a_parameter(chdb_client: Client) -> None:
    migrate(chdb_client, span_ttl_days=30)
    ttl = _create_query(chdb_client, SPANS_TABLE)
    assert "toIntervalDay(_CAST(30, 'UInt32'))" in ttl
    with pytest.raises(ValueError, match="positive"):
        migrate(chdb_client, span_ttl_days=0)


def test_writer_round_trip_and_redelivery_collapses(chdb_client: Client) -> None:
    migrate(chdb_client)
    rows = [_usage(i, TENANTS[i % 3], None if i % 5 == 4 else 0.25 * (i + 1)) for i in range(40)]
    expected: dict[str, float] = {}
    for row in rows:
        expected[row.tenant] = expected.get(row.tenant, 0.0) + (row.cost_usd or 0.0)
    writer = ClickHouseWriter(chdb_client, batch_size=16)  # three INSERTs

    assert writer.insert_spans(rows) == 40
    assert queries.spend_by_tenant(chdb_client) == pytest.approx(expected)
    assert queries.span_count(chdb_client) == 40
    assert queries.span_count(chdb_client, tenant="acme") == 14

    writer.insert_spans(rows)  # a batch delivered twice
    assert queries.span_count(chdb_client, final=False) >= 40  # both copies until a merge
    assert queries.span_count(chdb_client) == 40
    assert queries.spend_by_tenant(chdb_client) == pytest.approx(expected)


def test_every_span_field_round_trips(chdb_client: Client) -> None:
    migrate(chdb_client)
    row = _usage(7, "acme", 0.125)
    row.extra = {"gen_ai.response.id": "resp-7", "x": "y"}
    unpriced = _usage(8, "acme", None)
    unpriced.input_tokens = -5  # a sender's nonsense must not make the batch unwritable
    ClickHouseWriter(chdb_client).insert_spans([row, unpriced], [KafkaOrigin("otlp_spans", 3, 42)] * 2)

    got = chdb_client.query(
        "SELECT *, toUnixTimestamp64Nano(start_time) AS start_ns, toUnixTimestamp64Nano(end_time) AS end_ns "
        f"FROM {SPANS_TABLE} FINAL ORDER BY span_id"
    ).named_results()
    first, second = list(got)
    for name in SpanUsage.__dataclass_fields__:
        if name not in ("status_error", "cost_usd"):
            assert first[name] == getattr(row, name), name
    assert (first["cost_usd"], first["priced"], first["status_error"]) == (0.125, 1, 1)
    assert (first["kafka_topic"], first["kafka_partition"], first["kafka_offset"]) == ("otlp_spans", 3, 42)
    assert (second["cost_usd"], second["priced"], second["input_tokens"]) == (0.0, 0, 0)


def test_signals_round_trip_once(chdb_client: Client) -> None:
    migrate(chdb_client)
    sent = [
        budget_signal("acme", "warn", 36.0, 1),
        budget_signal("acme", "downgrade", 43.0, 2),
        budget_signal("globex", "ok", 1, 3),
    ]
    writer = ClickHouseWriter(chdb_client)
    writer.insert_signals(sent)
    writer.insert_signals(sent[:2])
    assert queries.signals(chdb_client) == sorted(sent, key=lambda s: (s.issued_at, s.key))
    assert queries.signals(chdb_client, budget="other") == []
    keys = chdb_client.query(f"SELECT DISTINCT kafka_key FROM {SIGNALS_TABLE} ORDER BY kafka_key").result_rows
    assert keys == [("tenant:acme@tenant-daily",), ("tenant:globex@tenant-daily",)]


def test_default_dsn_and_redaction(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BURNGUARD_CLICKHOUSE_DSN", raising=False)
    monkeypatch.setenv("BURNGUARD_STATE_DIR", str(tmp_path / "state"))
    assert default_dsn() == f"chdb://{tmp_path / 'state' / 'clickhouse'}"
    monkeypatch.setenv("BURNGUARD_CLICKHOUSE_DSN", "http://writer@ch.internal:8123/burnguard")
    assert default_dsn() == "http://writer@ch.internal:8123/burnguard"
    assert redact_dsn("https://writer:s3cret@ch.internal:8443/db") == "https://writer:***@ch.internal:8443/db"


def test_a_chdb_directory_belongs_to_one_process(chdb_dsn: str) -> None:
    """The constraint the sink and its tests are designed around."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DIRECTORY, chdb_dsn], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(ChdbDirectoryBusy, match=f"PID: {holder.pid}"):
            connect(chdb_dsn)
    finally:
        holder.kill()
        holder.wait()
    with open_chdb(chdb_dsn) as client:  # the killed holder's lock is gone, its table is there
        assert client.command("SELECT count() FROM held") == 1
