"""`burnguard kafka acls`: print, or apply, the least-privilege ACLs of `contracts/acls.py`."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from kafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from burnguard.contracts.acls import NOTIFY_GROUP, Grant, acl_set, apply_acls
from burnguard.contracts.topics import KafkaSettings, Topics

kafka_app = typer.Typer(help="Kafka security: the principals' ACLs.", no_args_is_help=True)
console = Console()


def _default_app_id() -> str:
    from burnguard.stream.settings import StreamSettings

    return os.environ.get("BURNGUARD_STREAM_APP_ID", StreamSettings.app_id)


def _default_sink_group() -> str:
    from burnguard.cli.devstack import SINK_GROUP

    return os.environ.get("BURNGUARD_SINK_GROUP", SINK_GROUP)


def grants_table(grants: list[Grant]) -> Table:
    table = Table(title=f"{len(grants)} ACLs (ALLOW, any host); nothing else is allowed")
    for column in ("principal", "operation", "resource", "name"):
        table.add_column(column)
    for grant in grants:
        name = f"{grant.name}*" if grant.prefixed else grant.name
        table.add_row(f"User:{grant.principal}", grant.operation, grant.resource, name)
    return table


@kafka_app.command("acls")
def acls(
    apply: Annotated[
        bool, typer.Option("--apply", help="Create them on the broker (needs a super user).")
    ] = False,
    stream_app_id: Annotated[
        str | None, typer.Option(help="The worker's Faust app id (BURNGUARD_STREAM_APP_ID).")
    ] = None,
    sink_group: Annotated[
        str | None, typer.Option(help="The sink's consumer group (BURNGUARD_SINK_GROUP).")
    ] = None,
    notify_group: Annotated[str, typer.Option(help="`burnguard notify`'s consumer group (--group).")] = (
        NOTIFY_GROUP
    ),
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: env).")] = None,
) -> None:
    """Print the ACL set for the topics in BURNGUARD_TOPIC_*; with --apply, create it.

    --apply connects with the BURNGUARD_KAFKA_* credentials, which must be a principal
    allowed to alter the cluster's ACLs (a super user); ACLs already there are kept.
    """
    grants = acl_set(
        Topics.from_env(),
        stream_app_id or _default_app_id(),
        sink_group or _default_sink_group(),
        notify_group,
    )
    console.print(grants_table(grants))
    if not apply:
        return
    kafka = KafkaSettings.from_env(bootstrap)
    try:
        created = apply_acls(grants, kafka)
    except (KafkaError, RuntimeError, ValueError) as exc:
        console.print(f"[red]could not apply the ACLs at {kafka.bootstrap}[/]: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"[green]applied[/] {created} ACLs at {kafka.bootstrap}")
