"""The `burnguard` command (typer + rich)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from burnguard.cli.budgets import budgets_app
from burnguard.cli.history import db_app, report
from burnguard.contracts.topics import KafkaSettings, Topics

app = typer.Typer(help="burnguard: LLM spend as a runtime signal.", no_args_is_help=True)
dev_app = typer.Typer(help="A local broker, worker and sink as background processes.", no_args_is_help=True)
signals_app = typer.Typer(help="The signal topic.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(budgets_app, name="budgets")
app.add_typer(signals_app, name="signals")
app.add_typer(db_app, name="db")
app.command("report")(report)
console = Console()
err_console = Console(stderr=True)

StateDir = Annotated[Path, typer.Option(help="Folder for the local stack's data and logs.")]
BudgetsFile = Annotated[Path | None, typer.Option("--budgets", help="Budget YAML file for the worker.")]
Bootstrap = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: env or dev stack).")]


def _bootstrap(bootstrap: str | None, state_dir: Path = Path(".burnguard")) -> str:
    if bootstrap:
        return bootstrap
    from burnguard.cli.devstack import DevStack

    return DevStack(state_dir).read_state().get("bootstrap") or KafkaSettings.from_env().bootstrap


@dev_app.command("up")
def dev_up(state_dir: StateDir = Path(".burnguard"), budgets: BudgetsFile = None) -> None:
    """Start a Kafka broker, a stream worker and a ClickHouse sink in the background."""
    from burnguard.cli.devstack import DevStack

    stack = DevStack(state_dir, budgets)
    state = stack.up()
    console.print(f"[green]up[/]: Kafka at {state['bootstrap']}, ClickHouse at {state['clickhouse_dsn']}")
    console.print(f"logs in {stack.log_dir}; stop with `burnguard dev down --state-dir {state_dir}`")


@dev_app.command("down")
def dev_down(state_dir: StateDir = Path(".burnguard")) -> None:
    """Stop what `dev up` started."""
    from burnguard.cli.devstack import DevStack

    DevStack(state_dir).down()
    console.print("[green]down[/]")


@dev_app.command("status")
def dev_status(state_dir: StateDir = Path(".burnguard")) -> None:
    from burnguard.cli.devstack import DevStack

    for name, running in DevStack(state_dir).status().items():
        console.print(f"{name:7} {'[green]running[/]' if running else '[red]stopped[/]'}")


@app.command()
def demo(state_dir: StateDir = Path(".burnguard/demo")) -> None:
    """Run a simulated multi-tenant app against the real pipeline until one tenant is throttled."""
    from burnguard.cli.demo import DEMO_BUDGETS, print_summary, read_back, simulate
    from burnguard.cli.devstack import DevStack

    stack = DevStack(state_dir, DEMO_BUDGETS)
    stack.down()  # a previous run's processes ...
    shutil.rmtree(state_dir, ignore_errors=True)  # ... and data: the demo starts from empty topics
    console.print("starting Kafka (first run fetches the jars from Maven Central), worker and sink ...")
    try:
        state = stack.up(signal_refresh_s=5.0)
        console.print(f"Kafka at {state['bootstrap']}")
        result = simulate(state["bootstrap"], console)
        read_back(stack, state["bootstrap"], result, console)
        print_summary(result, console)
    finally:
        stack.down()
    if not result.succeeded:
        console.print(
            "[red]demo failed[/]: expected a throttle for acme, a downgrade for globex, equal totals"
        )
        raise typer.Exit(1)
    console.print("[green]demo ok[/]: acme throttled, globex downgraded, ClickHouse totals equal the app's")


@app.command()
def worker(budgets: BudgetsFile = None, bootstrap: Bootstrap = None) -> None:
    """Run one stream worker in the foreground."""
    import os

    if budgets:
        os.environ["BURNGUARD_BUDGETS_FILE"] = str(budgets)
    if bootstrap:
        os.environ["BURNGUARD_KAFKA_BOOTSTRAP"] = bootstrap
    from burnguard.stream.app import run_worker

    sys.argv = sys.argv[:1]  # Faust's worker parses argv
    run_worker()


@app.command()
def sink(bootstrap: Bootstrap = None, dsn: Annotated[str | None, typer.Option()] = None) -> None:
    """Run the ClickHouse sink in the foreground."""
    import os

    if bootstrap:
        os.environ["BURNGUARD_KAFKA_BOOTSTRAP"] = bootstrap
    if dsn:
        os.environ["BURNGUARD_CLICKHOUSE_DSN"] = dsn
    from burnguard.sinks.consumer import main as sink_main

    sink_main()


@signals_app.command("tail")
def signals_tail(
    bootstrap: Bootstrap = None,
    from_beginning: Annotated[bool, typer.Option(help="Replay the compacted state first.")] = True,
    max_messages: Annotated[int, typer.Option(help="Stop after this many (0: follow forever).")] = 0,
    timeout_s: Annotated[float, typer.Option(help="Stop after this long without a signal (0: never).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw signal JSON lines.")] = False,
) -> None:
    """Print signals as they are published."""
    from kafka import KafkaConsumer

    from burnguard.contracts.signals import Signal

    kafka = KafkaSettings.from_env(_bootstrap(bootstrap))
    consumer = KafkaConsumer(
        Topics.from_env().signals,
        **kafka.kafka_python_config(),
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        consumer_timeout_ms=int(timeout_s * 1000) if timeout_s else float("inf"),
    )
    seen = 0
    try:
        for record in consumer:
            if record.value is None:
                continue
            try:
                signal = Signal.from_json(record.value)
            except ValueError as exc:  # pydantic's ValidationError: skip it, say so, go on
                first = str(exc).splitlines()[0]
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                err_console.print(f"skipped a malformed signal at {where}: {first}", highlight=False)
                continue
            if as_json:
                print(json.dumps(json.loads(record.value)), flush=True)
            else:
                console.print(
                    f"{signal.issued_at:%H:%M:%S} {signal.kafka_key:40} {signal.action:9} "
                    f"{signal.spent:.4f}/{signal.limit:g} ({signal.ratio:.0%})",
                    highlight=False,
                )
            seen += 1
            if max_messages and seen >= max_messages:
                break
    finally:
        consumer.close()


def main() -> None:
    app()
