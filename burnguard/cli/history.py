"""`burnguard db ...` (schema, rollups, retention) and `burnguard report` (the HTML report).

Registered in `burnguard.cli` with:

    app.add_typer(db_app, name="db")
    app.command("report")(report)

A chDB directory is open in one process at a time: run these while the sink
that writes it is stopped (or point `--dsn` / BURNGUARD_CLICKHOUSE_DSN at a
ClickHouse server).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

db_app = typer.Typer(help="The ClickHouse history: schema, rollups, retention.", no_args_is_help=True)
console = Console()

Dsn = Annotated[
    str | None,
    typer.Option(help="ClickHouse DSN (default: BURNGUARD_CLICKHOUSE_DSN, else chdb under the state dir)."),
]
Days = Annotated[int | None, typer.Option(min=1)]


def _client(dsn: str | None):
    from burnguard.sinks.clickhouse import connect

    return connect(dsn)


@db_app.command("migrate")
def db_migrate(
    dsn: Dsn = None,
    span_ttl_days: Days = None,
    rollup_ttl_days: Days = None,
    signal_ttl_days: Days = None,
) -> None:
    """Apply the missing schema migrations (idempotent); TTLs apply to tables it creates."""
    from burnguard.sinks import schema

    client = _client(dsn)
    try:
        applied = schema.migrate(
            client,
            span_ttl_days=span_ttl_days or schema.DEFAULT_SPAN_TTL_DAYS,
            rollup_ttl_days=rollup_ttl_days or schema.DEFAULT_ROLLUP_TTL_DAYS,
            signal_ttl_days=signal_ttl_days or schema.DEFAULT_SIGNAL_TTL_DAYS,
        )
    finally:
        client.close()
    console.print(f"applied {applied}" if applied else "schema up to date")


@db_app.command("retention")
def db_retention(
    dsn: Dsn = None,
    span_ttl_days: Days = None,
    rollup_ttl_days: Days = None,
    signal_ttl_days: Days = None,
) -> None:
    """Change the TTL of every table (days); rows past it go at the next merge."""
    from burnguard.sinks import schema

    client = _client(dsn)
    try:
        schema.set_retention(
            client,
            span_ttl_days=span_ttl_days or schema.DEFAULT_SPAN_TTL_DAYS,
            rollup_ttl_days=rollup_ttl_days or schema.DEFAULT_ROLLUP_TTL_DAYS,
            signal_ttl_days=signal_ttl_days or schema.DEFAULT_SIGNAL_TTL_DAYS,
        )
    finally:
        client.close()
    console.print("retention set")


@db_app.command("rebuild-rollups")
def db_rebuild_rollups(dsn: Dsn = None) -> None:
    """Recompute the rollups from the spans and signals read with FINAL (exact after re-deliveries)."""
    from burnguard.sinks import schema

    client = _client(dsn)
    try:
        schema.migrate(client)
        counts = schema.rebuild_rollups(client)
    finally:
        client.close()
    for table, rows in counts.items():
        console.print(f"{table}: {rows} rows")


_DURATION = re.compile(r"^(\d+)([mhdw])$")


def parse_since(text: str) -> timedelta:
    """`90m`, `24h`, `7d`, `2w`."""
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: use a number and m, h, d or w, e.g. 7d")
    unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path(
        "burnguard-report.html"
    ),
    dsn: Dsn = None,
    since: Annotated[str, typer.Option(help="How far back: 90m, 24h, 7d, 2w.")] = "7d",
    until: Annotated[str | None, typer.Option(help="End of the range, ISO 8601 (default: now).")] = None,
    tenant: Annotated[list[str] | None, typer.Option(help="Only these tenants (repeatable).")] = None,
    workflow: Annotated[list[str] | None, typer.Option(help="Only these workflows.")] = None,
    feature: Annotated[list[str] | None, typer.Option(help="Only these features.")] = None,
    model_class: Annotated[list[str] | None, typer.Option(help="Only these model classes.")] = None,
    budgets: Annotated[
        Path | None, typer.Option("--budgets", help="Add what this budget file would have done (simulate).")
    ] = None,
) -> None:
    """Write a self-contained HTML report (inline SVG charts) of spend, budgets and operational signals."""
    from burnguard.sinks import operational, schema
    from burnguard.sinks.report import render

    end = datetime.fromisoformat(until) if until else datetime.now(UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    start = end - parse_since(since)
    span_s = (end - start).total_seconds()
    filters = operational.Filters(
        start=start,
        end=end,
        tenants=tuple(tenant or ()),
        workflows=tuple(workflow or ()),
        features=tuple(feature or ()),
        model_classes=tuple(model_class or ()),
        interval_s=max(60, int(span_s // 120 // 60 * 60)),  # about 120 points, whole minutes
    )
    config = None
    if budgets is not None:
        from burnguard.cli.budgets import _load_or_exit

        config = _load_or_exit(budgets)
    client = _client(dsn)
    try:
        schema.migrate(client)
        page = render(client, filters, what_if=_what_if(client, config, start, end) if config else None)
    finally:
        client.close()
    out.write_text(page, encoding="utf-8")
    console.print(f"[green]wrote[/] {out} ({len(page) // 1024} KiB)")


def _what_if(client, config, start: datetime, end: datetime) -> list[dict]:
    """`burnguard budgets simulate` over the report's range, as rows for its table."""
    from burnguard.sinks.replay import read_spans
    from burnguard.stream.simulate import simulate, table_rows

    return table_rows(simulate(config, read_spans(client, start, end)).results())
