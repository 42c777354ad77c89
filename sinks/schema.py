"""ClickHouse tables of burnguard and the versioned migrations that create them.

Every statement here is frozen once released: a later change to a table is a
new `Migration` appended to `MIGRATIONS`, never an edit of an old one, so every
database walks the same path. Statements use `IF NOT EXISTS` so that a
migration interrupted after its DDL but before its version was recorded is
simply run again. Identifiers come only from this module; values (the span
TTL) are server-side query parameters.

Deduplication: Kafka delivers at least once and the sink commits offsets only
after ClickHouse has the rows, so a crash between insert and commit re-inserts
a batch. Both tables are ReplacingMergeTree keyed by the identity of a row, so
duplicates collapse on merge, and queries that need exact totals read with
`FINAL`. `genai_spans` sorts by (tenant, day, trace_id, span_id): tenant and
day lead because dashboards filter on them, and both are fixed properties of a
span, so a re-delivered span always lands on the same key and collapses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

SPANS_TABLE = "genai_spans"
SIGNALS_TABLE = "budget_signals"
MIGRATIONS_TABLE = "schema_migrations"
DEFAULT_SPAN_TTL_DAYS = 400

_MIGRATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
"""

_SPANS_V1 = f"""
CREATE TABLE IF NOT EXISTS {SPANS_TABLE}
(
    trace_id String,
    span_id String,
    parent_span_id String,
    name String,
    start_time DateTime64(9, 'UTC'),
    end_time DateTime64(9, 'UTC'),
    operation LowCardinality(String),
    provider LowCardinality(String),
    request_model LowCardinality(String),
    response_model LowCardinality(String),
    service LowCardinality(String),
    tenant LowCardinality(String),
    user String,
    workflow LowCardinality(String),
    feature LowCardinality(String),
    session String,
    action LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_creation_tokens UInt64,
    reasoning_tokens UInt64,
    tool_calls UInt64,
    tool_name LowCardinality(String),
    agent_name LowCardinality(String),
    conversation_id String,
    cost_usd Float64 COMMENT '0 when priced = 0',
    priced UInt8,
    model_class LowCardinality(String),
    downgraded_from LowCardinality(String),
    error_type LowCardinality(String),
    status_error UInt8,
    extra Map(String, String),
    kafka_topic LowCardinality(String),
    kafka_partition Int32 COMMENT '-1 when not read from Kafka',
    kafka_offset Int64 COMMENT '-1 when not read from Kafka',
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(start_time)
ORDER BY (tenant, toDate(start_time), trace_id, span_id)
TTL toDateTime(start_time) + toIntervalDay({{span_ttl_days:UInt32}})
"""

_SIGNALS_V1 = f"""
CREATE TABLE IF NOT EXISTS {SIGNALS_TABLE}
(
    kafka_key String,
    v UInt8,
    scope LowCardinality(String),
    key String,
    budget LowCardinality(String),
    action LowCardinality(String),
    downgrade_to Nullable(String),
    metric LowCardinality(String),
    spent Float64,
    `limit` Float64,
    ratio Float64,
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    burn_rate_per_hour Float64,
    projected_exhaustion Nullable(DateTime64(6, 'UTC')),
    issued_at DateTime64(6, 'UTC'),
    expires_at DateTime64(6, 'UTC'),
    reason String,
    kafka_topic LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(issued_at)
ORDER BY (budget, scope, key, issued_at)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements run in order, then the version is recorded."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "genai_spans and budget_signals", (_SPANS_V1, _SIGNALS_V1)),
)


def applied_versions(client: Client) -> set[int]:
    """Versions recorded in `schema_migrations` (the table is created if missing)."""
    client.command(_MIGRATIONS_DDL)
    result = client.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")
    return {int(row[0]) for row in result.result_rows}


def migrate(client: Client, *, span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS) -> list[int]:
    """Apply the missing migrations in order; return the versions applied by this call.

    `span_ttl_days` is used when `genai_spans` is created; it does not alter
    the TTL of a table that already exists.
    """
    if span_ttl_days <= 0:
        raise ValueError("span_ttl_days must be positive")
    parameters: dict[str, Any] = {"span_ttl_days": int(span_ttl_days)}
    done = applied_versions(client)
    applied = []
    for migration in sorted(MIGRATIONS, key=lambda m: m.version):
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement, parameters=_used(parameters, statement))
        client.insert(
            MIGRATIONS_TABLE, [[migration.version, migration.name]], column_names=["version", "name"]
        )
        applied.append(migration.version)
    return applied


def _used(parameters: dict[str, Any], statement: str) -> dict[str, Any] | None:
    """Only the parameters a statement names: servers may reject unknown ones."""
    used = {name: value for name, value in parameters.items() if "{" + name + ":" in statement}
    return used or None
