"""`burnguard export focus`: the spend history as a FOCUS 1.4 file (CSV or Parquet) for chargeback.

Registered in `burnguard.cli` with `app.add_typer(export_app, name="export")`.
Every mistake (budget file, period, output path) is one line on stderr and a
non-zero exit; the file is written to a temporary name and renamed, so a
failed run leaves no half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from burnguard.cli.budgets import _load_or_exit

export_app = typer.Typer(help="Export the history in other formats.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@export_app.command("focus")
def export_focus(
    period: Annotated[str, typer.Option(help="Billing period, a calendar month in UTC: YYYY-MM.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.csv or .parquet).")],
    granularity: Annotated[str, typer.Option(help="Charge period of a row: day or hour.")] = "day",
    fmt: Annotated[str | None, typer.Option("--format", help="csv or parquet (default: from -o).")] = None,
    budgets: Annotated[
        Path | None, typer.Option("--budgets", help="Budget file whose `prices:` are the contracted rates.")
    ] = None,
    dsn: Annotated[
        str | None, typer.Option(help="ClickHouse DSN (default: BURNGUARD_CLICKHOUSE_DSN).")
    ] = None,
) -> None:
    """Write the period's spend as FOCUS 1.4 rows: one per charge period, model, attribution, token kind."""
    from burnguard.sinks import focus
    from burnguard.sinks.clickhouse import connect
    from burnguard.sinks.schema import migrate

    overrides = _load_or_exit(budgets).prices if budgets else {}
    try:
        parsed = focus.Period.parse(period)
        fmt = focus.output_format(out, fmt)
        client = connect(dsn)
        try:
            migrate(client)
            rows, total = focus.export_focus(
                client, parsed, out, granularity=granularity, overrides=overrides, fmt=fmt
            )
        finally:
            client.close()
    except focus.ExportError as exc:
        errors.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    summary = f"{rows} FOCUS {focus.FOCUS_VERSION} rows, BilledCost {total:.2f} {focus.CURRENCY}"
    console.print(f"[green]wrote[/] {out}: {summary}")
