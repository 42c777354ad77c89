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
from burnguard.cli.export import export_app
from burnguard.cli.history import db_app, report
from burnguard.cli.kafka import kafka_app
from burnguard.cli.notify import notify
from burnguard.cli.simulate import simulate
from burnguard.contracts.topics import KafkaSettings, Topics, check_connection

app = typer.Typer(help="burnguard: LLM spend as a runtime signal.", no_args_is_help=True)
dev_app = typer.Typer(help="A local broker, worker and sink as background processes.", no_args_is_help=True)
signals_app = typer.Typer(help="The signal topic.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(budgets_app, name="budgets")
app.add_typer(signals_app, name="signals")
app.add_typer(db_app, name="db")
app.add_typer(export_app, name="export")
app.add_typer(kafka_app, name="kafka")
app.command("report")(report)
app.command("notify")(notify)
budgets_app.command("simulate")(simulate)
console = Console()
err_console = Console(stderr=True)

StateDir = Annotated[Path, typer.Option(help="Folder for the local stack's data and logs.")]
BudgetsFile = Annotated[Path | None, typer.Option("--budgets", help="Budget YAML file for the worker.")]
Bootstrap = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: env or dev stack).")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Show the Kafka clients' INFO chatter too.")]
#: The modules each extra brings: a command that needs a missing one says so in one line.
_EXTRA_MODULES = {"stream": ("faust",), "sinks": ("clickhouse_connect", "chdb")}


def _require_extras(command: str, *extras: str) -> None:
    """Exit with one line naming the extra to install, instead of a traceback on the base install."""
    import importlib.util

    missing = [e for e in extras if any(importlib.util.find_spec(m) is None for m in _EXTRA_MODULES[e])]
    if missing:
        typer.echo(
            f"error: `burnguard {command}` needs the {' and '.join(missing)} extra: "
            f"pip install 'burnguard[{','.join(missing)}]'",
            err=True,
        )
        raise typer.Exit(1)


def _verbose(verbose: bool) -> None:
    """`--verbose` reaches this process and the ones it starts (`contracts.logs`)."""
    if verbose:
        import os

        from burnguard.contracts.logs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


def _bootstrap(bootstrap: str | None, state_dir: Path = Path(".burnguard")) -> str:
    if bootstrap:
        return bootstrap
    from burnguard.cli.devstack import DevStack

    return DevStack(state_dir).read_state().get("bootstrap") or KafkaSettings.from_env().bootstrap


@dev_app.command("up")
def dev_up(
    state_dir: StateDir = Path(".burnguard"),
    budgets: BudgetsFile = None,
    secure: Annotated[bool, typer.Option("--secure", help="SASL_SSL, ACLs, a user per component.")] = False,
    verbose: Verbose = False,
) -> None:
    """Start a Kafka broker, a stream worker and a ClickHouse sink in the background."""
    _require_extras("dev up", "stream", "sinks")
    _verbose(verbose)
    from burnguard.cli.devstack import DevStack

    stack = DevStack(state_dir, budgets, secure=secure)
    state = stack.up()
    console.print(f"[green]up[/]: Kafka at {state['bootstrap']}, ClickHouse at {state['clickhouse_dsn']}")
    if secure:
        console.print(
            "SASL_SSL with ACLs; each principal's settings are in"
            f" {stack.secrets_dir}/<app|sink|notify|admin>.env (0600):"
            f" `set -a; . {stack.secrets_dir}/app.env; set +a` before starting an app"
        )
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
    _require_extras("demo", "stream", "sinks")
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
def worker(budgets: BudgetsFile = None, bootstrap: Bootstrap = None, verbose: Verbose = False) -> None:
    """Run one stream worker in the foreground."""
    import os

    _require_extras("worker", "stream")
    _verbose(verbose)

    if budgets:
        os.environ["BURNGUARD_BUDGETS_FILE"] = str(budgets)
    if bootstrap:
        os.environ["BURNGUARD_KAFKA_BOOTSTRAP"] = bootstrap
    from burnguard.stream.app import run_worker

    sys.argv = sys.argv[:1]  # Faust's worker parses argv
    run_worker()


@app.command()
def sink(
    bootstrap: Bootstrap = None, dsn: Annotated[str | None, typer.Option()] = None, verbose: Verbose = False
) -> None:
    """Run the ClickHouse sink in the foreground."""
    import os

    _require_extras("sink", "sinks")
    _verbose(verbose)

    if bootstrap:
        os.environ["BURNGUARD_KAFKA_BOOTSTRAP"] = bootstrap
    if dsn:
        os.environ["BURNGUARD_CLICKHOUSE_DSN"] = dsn
    from burnguard.sinks.__main__ import main as sink_main

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
    check_connection(kafka)
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
    """The entry point: refused Kafka credentials end in one line, not a traceback."""
    from kafka.errors import SaslAuthenticationFailedError

    try:
        app()
    except SaslAuthenticationFailedError as exc:
        console.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
