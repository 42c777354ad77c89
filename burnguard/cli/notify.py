"""`burnguard notify`: tell people when a budget changes state (webhooks signed per Standard Webhooks, Slack).

Registered in `burnguard.cli` with `app.command("notify")(notify)`. Destinations
and routes come from the budget file's `notify:` section; URLs that are
secrets and signing secrets from the environment variables it names.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from burnguard.cli.budgets import _load_or_exit
from burnguard.contracts.acls import NOTIFY_GROUP

errors = Console(stderr=True)


def notify(
    budgets: Annotated[Path, typer.Option("--budgets", help="Budget file with a `notify:` section.")],
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default: environment).")
    ] = None,
    group: Annotated[str, typer.Option(help="Consumer group; each group delivers every change once.")] = (
        NOTIFY_GROUP
    ),
    from_beginning: Annotated[
        bool, typer.Option(help="On a group's first start, announce the states that already exist too.")
    ] = False,
) -> None:
    """Send each budget state change (warn, downgrade, throttle, back to ok) to its destinations."""
    from burnguard.contracts.topics import KafkaSettings
    from burnguard.notify.delivery import DestinationConfigError, Target
    from burnguard.notify.notifier import Notifier, NotifySettings

    config = _load_or_exit(budgets).notify
    if not config.destinations or not config.routes:
        errors.print(f"[red]error[/]: {budgets}: no notify.destinations or notify.routes to send to")
        raise typer.Exit(1)
    try:
        targets = {d.id: Target.resolve(d) for d in config.destinations}
    except DestinationConfigError as exc:
        errors.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(
        logging.WARNING
    )  # its request lines would print URLs, which may be secret
    settings = NotifySettings.from_env(group=group, from_beginning=from_beginning)
    notifier = Notifier(KafkaSettings.from_env(bootstrap), config, targets, settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: notifier.stop.set())
    notifier.run()
