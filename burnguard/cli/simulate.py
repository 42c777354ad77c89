"""`burnguard budgets simulate FILE --since 30d`: what a budget file would have done to history.

Registered in `burnguard.cli` with `budgets_app.command("simulate")(simulate)`.
The spans come from ClickHouse; the accounting and decisions are the stream
worker's own (`burnguard.stream.simulate`). Mistakes are one line and exit 1.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from burnguard.cli.budgets import _load_or_exit
from burnguard.cli.history import Dsn, parse_since

console = Console()
errors = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error[/]: {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def history_range(since: str, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) from `--since` (90m, 24h, 30d, 2w) and an optional ISO `--until`; never in the future."""
    now = now or datetime.now(UTC)
    try:
        end = datetime.fromisoformat(until) if until else now
    except ValueError:
        raise _fail(f"--until {until!r}: use an ISO 8601 time, e.g. 2026-11-30T00:00:00") from None
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    if end > now:
        raise _fail(f"--until {until}: is in the future; there is no history there yet")
    try:
        return end - parse_since(since), end
    except typer.BadParameter as exc:
        raise _fail(f"--since {exc}") from None


def simulate(
    file: Annotated[Path, typer.Argument(help="The budget file to try.")],
    since: Annotated[str, typer.Option(help="How far back: 90m, 24h, 30d, 2w.")] = "30d",
    until: Annotated[str | None, typer.Option(help="End of the range, ISO 8601 (default: now).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dsn: Dsn = None,
) -> None:
    """Replay history through the worker's budget code: who would have been warned, downgraded, throttled."""
    from burnguard.sinks.clickhouse import connect
    from burnguard.sinks.replay import read_spans
    from burnguard.sinks.schema import migrate
    from burnguard.stream.simulate import simulate as run
    from burnguard.stream.simulate import table_rows

    config = _load_or_exit(file)
    start, end = history_range(since, until)
    client = connect(dsn)
    try:
        migrate(client)
        simulation = run(config, read_spans(client, start, end))
    finally:
        client.close()
    if not simulation.spans:
        raise _fail(f"no spans in ClickHouse from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    results = simulation.results()
    if as_json:
        print(json.dumps({"spans": simulation.spans, "keys": [r.to_dict() for r in results]}, indent=2))
        return
    table = Table(
        title=f"what-if: {file} on {simulation.spans} spans, {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}"
    )
    rows = table_rows(results)
    for column in rows[0] if rows else ["budget", "key"]:
        table.add_column(column, justify="right" if "calls" in column or "USD" in column else "left")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    console.print(table if rows else f"no budget of {file} would have acted on {simulation.spans} spans")
