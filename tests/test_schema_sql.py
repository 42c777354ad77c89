"""The ClickHouse schema as SQL: released migrations stay frozen, `sinks/sql/schema.sql` stays true.

`schema.sql` is what `SHOW CREATE TABLE` prints for every table and view of a
database migrated by `migrate` (chDB, default retention). It was first rendered
from the schema code of commit ec31149, before the migrations were written out
as SQL files, so these tests also prove that rewrite changed no table, column or
view. Regenerate it after adding a migration: `python -m tests.test_schema_sql`.
"""

from __future__ import annotations

import hashlib
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from burnguard.sinks.clickhouse import connect
from burnguard.sinks.schema import (
    MIGRATIONS,
    MIGRATIONS_TABLE,
    ROLLUP_SELECTS,
    ROLLUPS,
    SESSIONS_TABLE,
    SQL_DIR,
    USAGE_1M_TABLE,
    Migration,
    _view_selects,
    applied_versions,
    migrate,
    split_statements,
)
from clickhouse_connect.driver.client import Client

REPO = Path(__file__).resolve().parent.parent
SCHEMA_SQL = REPO / "sinks" / "sql" / "schema.sql"
DEFAULT_TTLS = {"span_ttl_days": 400, "rollup_ttl_days": 800, "signal_ttl_days": 400}

#: sha256 of each released migration's statements (whitespace-normalized, see `_fingerprint`).
#: A failure here means a shipped migration was edited: add a new migration instead. Add a
#: migration's fingerprint when it ships (`python -m tests.test_schema_sql` prints them).
RELEASED = {
    1: "84e9cf1eaf515fa448df1ba2a769b10f0696e9c52a7bd2dd963c274c8ea9958e",
    2: "e29616d631a59e7e2cf42fc03ecf696ce58f398b11e7a6e8b914a6f13a44d175",
    3: "f14881d9edd8cc76eefd8051ff422a6bfddc998db867b7c19085796064b8fa7a",
    4: "23a470f8895c79af2ec29f7802bdab56771b81858488bdd10097c83596643dcc",
    5: "fbcee891bab95aebeadef289eaba65677f7f2220886759008a9f472374f72e24",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    try:
        yield client
    finally:
        client.close()


def render_schema(client: Client) -> str:
    """`SHOW CREATE TABLE` of every table and view of the current database, by name."""
    names = client.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    ).result_rows
    shown = [client.query(f"SHOW CREATE TABLE {name}").result_rows[0][0] for (name,) in names]
    return "".join(statement.rstrip() + ";\n\n" for statement in shown).rstrip("\n") + "\n"


def _fingerprint(migration: Migration) -> str:
    """A digest of what the migration runs; whitespace between tokens does not count."""
    text = "\n;\n".join(" ".join(statement.split()) for statement in migration.statements)
    return hashlib.sha256(text.encode()).hexdigest()


def _apply(client: Client, migration: Migration) -> None:
    """Run one migration as `migrate` does, to leave a database at an older version."""
    for statement in migration.statements:
        used = {name: days for name, days in DEFAULT_TTLS.items() if "{" + name + ":" in statement}
        client.command(statement, parameters=used or None)
    client.insert(MIGRATIONS_TABLE, [[migration.version, migration.name]], column_names=["version", "name"])


def test_released_migrations_are_frozen() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    shipped = {m.version: _fingerprint(m) for m in MIGRATIONS if m.version in RELEASED}
    assert shipped == RELEASED


def test_schema_migrated_from_scratch_is_schema_sql(client: Client) -> None:
    migrate(client)
    assert render_schema(client) == SCHEMA_SQL.read_text(), "run python -m tests.test_schema_sql"


@pytest.mark.parametrize("version", range(1, len(MIGRATIONS)))
def test_schema_migrated_from_an_older_version_is_schema_sql(client: Client, version: int) -> None:
    applied_versions(client)  # creates schema_migrations, as migrate does first
    for migration in MIGRATIONS[:version]:
        _apply(client, migration)
    assert migrate(client) == [m.version for m in MIGRATIONS[version:]]
    assert render_schema(client) == SCHEMA_SQL.read_text()


def test_split_statements_keeps_quoted_semicolons_and_drops_comments() -> None:
    script = """
    -- a comment; with a semicolon
    ALTER TABLE t ADD COLUMN c String COMMENT 'a; b -- not a comment';  -- trailing note
    SELECT `limit`, "x;y", 'it\\'s; fine' FROM t;

    ;
    SELECT 1
    """
    assert split_statements(script) == (
        "ALTER TABLE t ADD COLUMN c String COMMENT 'a; b -- not a comment'",
        "SELECT `limit`, \"x;y\", 'it\\'s; fine' FROM t",
        "SELECT 1",
    )
    with pytest.raises(ValueError, match="unterminated"):
        split_statements("SELECT 'open;")


def test_every_migration_file_is_a_migration_and_ships_as_package_data() -> None:
    files = sorted(path.name for path in (SQL_DIR / "migrations").glob("*.sql"))
    assert [int(name.split("_", 1)[0]) for name in files] == [m.version for m in MIGRATIONS]
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["burnguard.sinks"]
    for path in SQL_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(SQL_DIR.parent).as_posix()
            assert any(fnmatch(relative, glob) for glob in globs), f"{relative} is not package data"


def test_rollup_selects_count_only_calls_made_in_their_latest_form() -> None:
    """What the module-level asserts of the `.replace()` chains guarded, now on the literal SQL."""
    assert set(ROLLUP_SELECTS) == set(ROLLUPS)
    for table, select in ROLLUP_SELECTS.items():
        assert select.startswith("SELECT") and "{" not in select, table
        for line in select.splitlines():
            if "s.operation IN (" in line or "s.operation = 'execute_tool'" in line:
                assert "s.refused" in line, f"{table} counts refused calls: {line.strip()}"
    assert "uniqState" not in ROLLUP_SELECTS[USAGE_1M_TABLE]  # migration 4
    assert "AS refused_calls" in ROLLUP_SELECTS[USAGE_1M_TABLE]  # migration 5
    assert "AS first_calls" in ROLLUP_SELECTS[SESSIONS_TABLE]  # migration 3


def test_a_view_the_rollup_lookup_cannot_read_is_an_error_not_a_stale_select() -> None:
    select = "SELECT toStartOfHour(s.start_time) AS hour FROM genai_spans AS s GROUP BY hour"
    good = Migration(
        9, "x", (f"CREATE MATERIALIZED VIEW IF NOT EXISTS genai_traces_mv TO genai_traces AS {select}",)
    )
    assert _view_selects((good,)) == {"genai_traces": select}
    for statement in (
        f"CREATE MATERIALIZED VIEW genai_traces_mv TO genai_traces AS {select}",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS other_mv TO genai_traces AS {select}",
    ):
        with pytest.raises(ValueError, match="migration 9"):
            _view_selects((Migration(9, "x", (statement,)),))


def _columns(client: Client, table: str) -> set[str]:
    query = "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}"
    return {row[0] for row in client.query(query, parameters={"t": table}).result_rows}


def test_every_rollup_view_writes_exactly_its_tables_columns(client: Client) -> None:
    """A view column the table lacks is dropped and a table column the view lacks stays empty."""
    migrate(client)
    for table, view in ROLLUPS.items():
        columns = {name: _columns(client, name) for name in (table, view)}
        assert columns[view] == columns[table], table


def main() -> None:
    """Render `schema.sql` from a scratch chDB database migrated by the current code."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        client = connect(f"chdb://{directory}/clickhouse")
        try:
            migrate(client)
            SCHEMA_SQL.write_text(render_schema(client))
            for migration in MIGRATIONS:
                print(migration.version, _fingerprint(migration), file=sys.stderr)
        finally:
            client.close()


if __name__ == "__main__":
    main()
