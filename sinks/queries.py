"""Read helpers over the sink's tables, for the demo, the CLI and tests.

Each reads with `FINAL` by default: a batch re-delivered after a crash sits
in the table twice until a background merge collapses it, and these helpers
answer "how much was spent", which must count every span once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from burnguard.contracts.signals import Signal
from burnguard.sinks.clickhouse import SIGNAL_COLUMNS
from burnguard.sinks.schema import SIGNALS_TABLE, SPANS_TABLE
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

log = logging.getLogger(__name__)

#: The columns that are `Signal` fields (the rest say where the row came from).
_SIGNAL_FIELDS = tuple(name for name in SIGNAL_COLUMNS if not name.startswith("kafka_"))


def _final(final: bool) -> str:
    return " FINAL" if final else ""


def spend_by_tenant(client: Client, *, final: bool = True) -> dict[str, float]:
    """USD spent per tenant over all stored spans (unpriced spans count 0)."""
    result = client.query(
        f"SELECT tenant, sum(cost_usd) FROM {SPANS_TABLE}{_final(final)} GROUP BY tenant ORDER BY tenant"
    )
    return {tenant: float(total) for tenant, total in result.result_rows}


def span_count(client: Client, *, tenant: str | None = None, final: bool = True) -> int:
    """Number of stored spans, optionally of one tenant; `final=False` counts duplicates too."""
    query = f"SELECT count() FROM {SPANS_TABLE}{_final(final)}"
    if tenant is None:
        return int(client.command(query))
    return int(client.command(query + " WHERE tenant = {tenant:String}", parameters={"tenant": tenant}))


def signals(client: Client, *, budget: str | None = None, final: bool = True) -> list[Signal]:
    """Stored signals in the order they were issued, optionally of one budget."""
    columns = ", ".join(f"`{name}`" for name in _SIGNAL_FIELDS)
    query = f"SELECT {columns} FROM {SIGNALS_TABLE}{_final(final)}"
    parameters = None
    if budget is not None:
        query += " WHERE budget = {budget:String}"
        parameters = {"budget": budget}
    result = client.query(query + " ORDER BY issued_at, budget, scope, key", parameters=parameters)
    signals = []
    for row in result.named_results():
        try:
            signals.append(Signal.model_validate(_aware(row)))
        except ValidationError as exc:  # e.g. a NaN stored before spans were validated: skip it
            log.warning("skipped a malformed stored signal %s: %s", row.get("key"), str(exc).splitlines()[0])
    return signals


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    """Datetimes as aware UTC, whatever the client's tz_mode (its default returns naive UTC)."""
    return {
        name: value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value
        for name, value in row.items()
    }
