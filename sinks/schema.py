"""ClickHouse tables of burnguard and the versioned migrations that create them.

The SQL is written out in files beside this module: `sql/migrations/NNN_*.sql`
holds what migration NNN runs, statement by statement, and `sql/schema.sql` the
schema they produce (`SHOW CREATE TABLE` of every table and view, which
`tests/test_schema_sql.py` keeps true). Files rather than Python strings: the
statements read, diff and paste into `clickhouse client` as SQL, and a file is
one migration, frozen as a whole. Every migration is frozen once released (the
test holds a fingerprint of each): a later change to a table is a new file and
`Migration` appended to `MIGRATIONS`, never an edit of an old one, so every
database walks the same path. Statements use `IF NOT EXISTS` so that a
migration interrupted after its DDL but before its version was recorded is
simply run again. Identifiers come only from these files and the constants below;
values (the TTLs) are server-side query parameters.

Deduplication: Kafka delivers at least once and the sink commits offsets only
after ClickHouse has the rows, so a crash between insert and commit re-inserts
a batch. Both tables are ReplacingMergeTree keyed by the identity of a row, so
duplicates collapse on merge, and queries that need exact totals read with
`FINAL`. `genai_spans` sorts by (tenant, day, trace_id, span_id): tenant and
day lead because dashboards filter on them, and both are fixed properties of a
span, so a re-delivered span always lands on the same key and collapses.

Rollups (migration 2) keep the dashboards fast over months: materialized
views aggregate every inserted block into per-minute usage by tenant,
workflow, feature, model class and model (`genai_usage_1m`), hourly spend
per user (`genai_user_spend_1h`), one row per trace (`genai_traces`, the
workflow runs), per session (`genai_sessions`) and per user action
(`genai_actions`, migration 4), and per-minute budget snapshots from the
signals (`budget_usage_1m`). Rows of a trace, session or action are per day
and per inserted block; queries merge them with GROUP BY.

The trade-off of those rollups, stated once: a materialized view sees each
INSERT, not the collapsed table, so a span that the sink re-delivers (a
crash between the insert and the offset commit, a rebalance) is added to
the sums of the rollups a second time, while `genai_spans FINAL` counts it
once. Distinct counts (of traces, sessions, actions), minima,
maxima and argMin/argMax states (first/last input tokens of a session,
budget snapshots) are not affected. So: panels that answer "how much
exactly" over a short range, and the reconciliation of a budget, read the
base table with FINAL; trends and long ranges read the rollups, which are
exact unless a batch was re-delivered and are made exact again by
`rebuild_rollups` (`burnguard db rebuild-rollups`, run while no sink
writes), which recomputes them from `genai_spans FINAL`.

Retention: spans keep `span_ttl_days` (default 400), rollups
`rollup_ttl_days` (default 800: trends outlive raw spans), signals and
budget snapshots `signal_ttl_days` (default 400). `migrate` applies them
when it creates a table; `set_retention` changes them on existing tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

SPANS_TABLE = "genai_spans"
SIGNALS_TABLE = "budget_signals"
MIGRATIONS_TABLE = "schema_migrations"
USAGE_1M_TABLE = "genai_usage_1m"
USER_SPEND_1H_TABLE = "genai_user_spend_1h"
TRACES_TABLE = "genai_traces"
SESSIONS_TABLE = "genai_sessions"
BUDGET_USAGE_1M_TABLE = "budget_usage_1m"
ACTIONS_TABLE = "genai_actions"
#: Rollup table -> the materialized view that feeds it.
ROLLUPS: dict[str, str] = {
    USAGE_1M_TABLE: "genai_usage_1m_mv",
    USER_SPEND_1H_TABLE: "genai_user_spend_1h_mv",
    TRACES_TABLE: "genai_traces_mv",
    SESSIONS_TABLE: "genai_sessions_mv",
    BUDGET_USAGE_1M_TABLE: "budget_usage_1m_mv",
    ACTIONS_TABLE: "genai_actions_mv",
}
DEFAULT_SPAN_TTL_DAYS = 400
DEFAULT_ROLLUP_TTL_DAYS = 800
DEFAULT_SIGNAL_TTL_DAYS = 400

SQL_DIR = Path(__file__).with_name("sql")
MIGRATIONS_DIR = SQL_DIR / "migrations"

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


def split_statements(sql: str) -> tuple[str, ...]:
    """The statements of an SQL script: split at `;`, without `--` comments or blank ones.

    A `;` or `--` inside a quoted string or identifier ('...', "...", `...`) is
    text, not syntax (a column COMMENT of migration 5 holds a `;`).
    clickhouse-connect sends one statement a call, so the script is split here.
    """
    statements: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(sql):
        char = sql[i]
        if quote:
            current.append(char)
            if char == "\\" and i + 1 < len(sql):
                current.append(sql[i + 1])
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"`":
            quote = char
            current.append(char)
        elif sql.startswith("--", i):
            i = sql.find("\n", i)
            if i < 0:
                break
            continue
        elif char == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    if quote:
        raise ValueError(f"unterminated {quote} in SQL script")
    statements.append("".join(current))
    return tuple(text for text in (statement.strip() for statement in statements) if text)


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: statements run in order, then the version is recorded."""

    version: int
    name: str
    statements: tuple[str, ...]

    @classmethod
    def from_file(cls, version: int, name: str, filename: str) -> Migration:
        """The migration whose statements are those of `sql/migrations/<filename>`."""
        return cls(version, name, split_statements((MIGRATIONS_DIR / filename).read_text(encoding="utf-8")))


MIGRATIONS: tuple[Migration, ...] = (
    Migration.from_file(1, "genai_spans and budget_signals", "001_spans_and_signals.sql"),
    Migration.from_file(
        2,
        "rollups (usage per minute, user spend per hour, traces, sessions, budget snapshots), retention",
        "002_rollups.sql",
    ),
    Migration.from_file(
        3, "genai_sessions.first_calls (context growth by call number)", "003_sessions_first_calls.sql"
    ),
    Migration.from_file(4, "genai_actions rollup; genai_usage_1m without uniq states", "004_actions.sql"),
    Migration.from_file(
        5,
        "routing columns on genai_spans; fallback, routed, escalated and refused calls per minute;"
        " refused calls no longer counted as calls in the rollups",
        "005_routing.sql",
    ),
)

_CREATE_VIEW = re.compile(
    r"CREATE MATERIALIZED VIEW IF NOT EXISTS (?P<view>\w+) TO (?P<table>\w+) AS\s+(?P<select>SELECT\b.*)",
    re.DOTALL,
)


def _view_selects(migrations: tuple[Migration, ...]) -> dict[str, str]:
    """Rollup table -> the SELECT of the view that feeds it, as the latest migration created it.

    The SELECT is looked up, not rebuilt: it is the literal text of that
    migration's `CREATE MATERIALIZED VIEW` (`sql/schema.sql` shows the view).
    """
    selects: dict[str, str] = {}
    for migration in sorted(migrations, key=lambda m: m.version):
        for statement in migration.statements:
            if not statement.startswith("CREATE MATERIALIZED VIEW"):
                continue
            match = _CREATE_VIEW.fullmatch(statement)
            if not match or ROLLUPS.get(match["table"]) != match["view"]:
                raise ValueError(
                    f"migration {migration.version}: a view must be written"
                    f" 'CREATE MATERIALIZED VIEW IF NOT EXISTS <view> TO <rollup> AS SELECT ...'"
                    f" with the pair in ROLLUPS: {statement[:100]!r}"
                )
            selects[match["table"]] = match["select"]
    return selects


#: Rollup table -> the SELECT that computes it from its source: its view's SELECT
#: (`rebuild_rollups` runs it with the `final` setting, reading the source as FINAL).
ROLLUP_SELECTS: dict[str, str] = _view_selects(MIGRATIONS)


def applied_versions(client: Client) -> set[int]:
    """Versions recorded in `schema_migrations` (the table is created if missing)."""
    client.command(_MIGRATIONS_DDL)
    result = client.query(f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}")
    return {int(row[0]) for row in result.result_rows}


def migrate(
    client: Client,
    *,
    span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
    rollup_ttl_days: int = DEFAULT_ROLLUP_TTL_DAYS,
    signal_ttl_days: int = DEFAULT_SIGNAL_TTL_DAYS,
) -> list[int]:
    """Apply the missing migrations in order; return the versions applied by this call.

    The TTLs (days) are used when a table is created; they do not alter the
    TTL of a table that already exists (see `set_retention` for that).
    """
    parameters = _retention_parameters(span_ttl_days, rollup_ttl_days, signal_ttl_days)
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


def _retention_parameters(span_ttl_days: int, rollup_ttl_days: int, signal_ttl_days: int) -> dict[str, Any]:
    days = {
        "span_ttl_days": span_ttl_days,
        "rollup_ttl_days": rollup_ttl_days,
        "signal_ttl_days": signal_ttl_days,
    }
    for name, value in days.items():
        if int(value) <= 0:
            raise ValueError(f"{name} must be positive")
    return {name: int(value) for name, value in days.items()}


#: Table -> its TTL expression with the parameter that sets the days.
_TTL_EXPRESSIONS: dict[str, str] = {
    SPANS_TABLE: "toDateTime(start_time) + toIntervalDay({span_ttl_days:UInt32})",
    SIGNALS_TABLE: "toDateTime(issued_at) + toIntervalDay({signal_ttl_days:UInt32})",
    USAGE_1M_TABLE: "minute + toIntervalDay({rollup_ttl_days:UInt32})",
    USER_SPEND_1H_TABLE: "hour + toIntervalDay({rollup_ttl_days:UInt32})",
    TRACES_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
    SESSIONS_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
    BUDGET_USAGE_1M_TABLE: "minute + toIntervalDay({signal_ttl_days:UInt32})",
    ACTIONS_TABLE: "day + toIntervalDay({rollup_ttl_days:UInt32})",
}


def set_retention(
    client: Client,
    *,
    span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
    rollup_ttl_days: int = DEFAULT_ROLLUP_TTL_DAYS,
    signal_ttl_days: int = DEFAULT_SIGNAL_TTL_DAYS,
) -> None:
    """Change the TTL of every table (the schema must be migrated).

    Rows past the new TTL go at the next merge (`OPTIMIZE ... FINAL` or
    `ALTER TABLE ... MATERIALIZE TTL` to force it).
    """
    parameters = _retention_parameters(span_ttl_days, rollup_ttl_days, signal_ttl_days)
    for table, expression in _TTL_EXPRESSIONS.items():
        statement = f"ALTER TABLE {table} MODIFY TTL {expression}"
        client.command(statement, parameters=_used(parameters, statement))


def rebuild_rollups(client: Client, tables: tuple[str, ...] | None = None) -> dict[str, int]:
    """Recompute rollups from their source read with FINAL; return the rows each now holds.

    Makes the rollups exact again after the sink re-delivered a batch (see the
    module docstring). Run it while no sink writes: rows inserted during the
    rebuild would be counted twice or not at all.
    """
    counts = {}
    for table in tables or tuple(ROLLUPS):
        client.command(f"TRUNCATE TABLE {table}")
        client.command(f"INSERT INTO {table} " + ROLLUP_SELECTS[table], settings={"final": 1})
        counts[table] = int(client.command(f"SELECT count() FROM {table}"))
    return counts


def _used(parameters: dict[str, Any], statement: str) -> dict[str, Any] | None:
    """Only the parameters a statement names: servers may reject unknown ones."""
    used = {name: value for name, value in parameters.items() if "{" + name + ":" in statement}
    return used or None
