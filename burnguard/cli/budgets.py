"""`burnguard budgets validate | apply | list | diff`: the budget lifecycle.

A YAML file is validated here with file:line:field errors; `apply` turns it
into records on the compacted `burnguard.budgets` topic (one per budget, a
tombstone for each removed budget, one shared record for model classes,
ladder and prices). Running workers follow the topic and pick changes up
within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from burnguard.contracts.budgets import (
    SHARED_RECORD_KEY,
    BudgetConfig,
    BudgetFileError,
    from_records,
    load_budget_file,
    to_records,
)
from burnguard.contracts.compacted_topics import read_compacted_topic
from burnguard.contracts.topics import KafkaSettings, Topics, TopicSpec, check_connection, ensure_topics

budgets_app = typer.Typer(help="Budget files and the budgets topic.", no_args_is_help=True)
console = Console()
Bootstrap = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: environment).")]


@dataclass
class BudgetChanges:
    """What applying a file would write: records to add or replace, budget ids to delete."""

    added: dict[str, bytes]
    changed: dict[str, bytes]
    removed: list[str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def compare(current: dict[str, bytes], desired: dict[str, bytes]) -> BudgetChanges:
    return BudgetChanges(
        added={k: v for k, v in desired.items() if k not in current},
        changed={k: v for k, v in desired.items() if k in current and current[k] != v},
        removed=sorted(k for k in current if k not in desired and k != SHARED_RECORD_KEY),
    )


def _load_or_exit(file: Path) -> BudgetConfig:
    try:
        return load_budget_file(file)
    except FileNotFoundError:
        console.print(f"[red]{file}: no such file[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    except BudgetFileError as exc:
        for problem in exc.problems:
            console.print(f"[red]{problem}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _current_records(kafka: KafkaSettings, topic: str) -> dict[str, bytes]:
    check_connection(kafka)  # refused credentials: a clear error now, not a read timeout
    return {key.decode(): value for key, value in read_compacted_topic(kafka, topic).items()}


def apply_changes(kafka: KafkaSettings, topic: str, changes: BudgetChanges) -> None:
    ensure_topics(kafka, [TopicSpec(topic, partitions=1, compacted=True)])
    producer = KafkaProducer(**kafka.kafka_python_config(), acks="all")
    try:
        for key, value in {**changes.added, **changes.changed}.items():
            producer.send(topic, key=key.encode(), value=value)
        for key in changes.removed:
            producer.send(topic, key=key.encode(), value=None)
        producer.flush()
    finally:
        producer.close()


def _budget_table(title: str, config: BudgetConfig) -> Table:
    table = Table(title=title)
    for column in ("id", "scope", "match", "window", "metric", "limit", "actions"):
        table.add_column(column)
    for b in config.budgets:
        ladder = ", ".join(f"{a.do}{'→' + a.to if a.to else ''}@{a.at:g}" for a in b.actions)
        table.add_row(b.id, b.scope_name, b.match, b.window, b.metric, f"{b.limit:g}", ladder)
    return table


def _routes_table(config: BudgetConfig) -> Table:
    table = Table(title=f"{len(config.routes)} routes (first match wins)")
    for column in ("id", "match", "use", *config.providers):
        table.add_column(column)
    for route in config.routes:
        fields = route.match.model_dump(exclude_defaults=True)
        match = ", ".join(f"{name}={'|'.join(values)}" for name, values in fields.items())
        models = [config.model_for(provider, route.use) or "(not routed)" for provider in config.providers]
        table.add_row(route.id, match, route.use, *models)
    return table


def _print_changes(changes: BudgetChanges) -> None:
    if changes.empty:
        console.print("no changes")
        return
    for label, keys, color in (
        ("add", sorted(changes.added), "green"),
        ("change", sorted(changes.changed), "yellow"),
        ("remove", changes.removed, "red"),
    ):
        for key in keys:
            name = "model classes, ladder, prices and routes" if key == SHARED_RECORD_KEY else key
            console.print(f"[{color}]{label:6}[/] {name}", highlight=False)


@budgets_app.command("validate")
def validate(file: Path) -> None:
    """Check a budget file; every mistake is reported as file:line: field: message."""
    config = _load_or_exit(file)
    console.print(_budget_table(f"{file}: {len(config.budgets)} budgets valid", config))
    if config.routes:
        console.print(_routes_table(config))


@budgets_app.command("diff")
def diff(file: Path, bootstrap: Bootstrap = None) -> None:
    """Show what `apply` would change on the budgets topic."""
    config = _load_or_exit(file)
    kafka = KafkaSettings.from_env(bootstrap)
    _print_changes(compare(_current_records(kafka, Topics.from_env().budgets), to_records(config)))


@budgets_app.command("apply")
def apply(file: Path, bootstrap: Bootstrap = None) -> None:
    """Write the file's budgets to the budgets topic; running workers pick them up within seconds."""
    config = _load_or_exit(file)
    kafka = KafkaSettings.from_env(bootstrap)
    topic = Topics.from_env().budgets
    changes = compare(_current_records(kafka, topic), to_records(config))
    _print_changes(changes)
    if not changes.empty:
        apply_changes(kafka, topic, changes)
        console.print(f"[green]applied[/] to {topic}")


@budgets_app.command("list")
def list_budgets(bootstrap: Bootstrap = None) -> None:
    """The budgets the workers currently follow."""
    kafka = KafkaSettings.from_env(bootstrap)
    records = _current_records(kafka, Topics.from_env().budgets)
    if not records:
        console.print("no budgets on the topic (workers use their BURNGUARD_BUDGETS_FILE)")
        return
    config = from_records(records)
    console.print(_budget_table(f"{len(config.budgets)} budgets on the topic", config))
