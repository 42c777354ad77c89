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
from collections.abc import Iterator
from pathlib import Path

import pytest
from burnguard.sinks.clickhouse import connect
from burnguard.sinks.schema import MIGRATIONS, MIGRATIONS_TABLE, Migration, applied_versions, migrate
from clickhouse_connect.driver.client import Client

SCHEMA_SQL = Path(__file__).resolve().parent.parent / "sinks" / "sql" / "schema.sql"
DEFAULT_TTLS = {"span_ttl_days": 400, "rollup_ttl_days": 800, "signal_ttl_days": 400}

#: sha256 of each released migration's statements (whitespace-normalized, see `_fingerprint`).
#: A failure here means a shipped migration was edited: add a new migration instead.
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
