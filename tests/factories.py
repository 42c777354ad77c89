"""Builders of the budgets, signals and span usages tests feed in, written once: a contract changes here only.

Each builder fills what a test does not care about with one fixed, valid value and takes
the rest as keyword arguments; a test names only what its assertion depends on.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.usage import SpanUsage

# --- budgets ---------------------------------------------------------------------------------

#: Three model classes of OpenAI and Anthropic models and the downgrade ladder between them.
MODEL_CLASSES_YAML = """\
model_classes:
  premium:  [gpt-4.1, o3, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy:  [gpt-4.1-nano, claude-haiku-4-5]
downgrade:
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
  o3: gpt-4.1-mini
  claude-opus-4-1: claude-sonnet-4-5
  claude-sonnet-4-5: claude-haiku-4-5
"""

#: The smallest ladder: gpt-4.1 (premium) downgrades to gpt-4.1-mini (standard).
LADDER_YAML = """\
model_classes:
  premium: [gpt-4.1]
  standard: [gpt-4.1-mini]
downgrade:
  gpt-4.1: gpt-4.1-mini
"""

#: The usual escalation: warn at half, downgrade to standard at 80%, throttle at the limit.
WARN_DOWNGRADE_THROTTLE = (
    {"at": 0.5, "do": "warn"},
    {"at": 0.8, "do": "downgrade", "to": "standard"},
    {"at": 1.0, "do": "throttle"},
)


def budget(
    budget_id: str, limit: float, *, scope: str | list[str] = "tenant", **fields: Any
) -> dict[str, Any]:
    """One entry of a budget file's `budgets:` list; fields left out take the file format's defaults."""
    entry: dict[str, Any] = {"id": budget_id, "scope": scope}
    entry.update((name, value) for name, value in fields.items() if name != "actions")
    entry["limit"] = limit
    if fields.get("actions"):
        entry["actions"] = [dict(action) for action in fields["actions"]]
    return entry


def tenant_cost(limit: float, **fields: Any) -> dict[str, Any]:
    """`tenant-cost`: each tenant's USD spent per UTC day."""
    return budget("tenant-cost", limit, window="day", metric="cost_usd", **fields)


def tenant_tokens(limit: float = 1.0e9, **fields: Any) -> dict[str, Any]:
    """`tenant-tokens`: each tenant's tokens per UTC day, by default a limit no test reaches."""
    return budget("tenant-tokens", limit, window="day", metric="tokens", **fields)


def budgets_yaml(*budgets: dict[str, Any], head: str = "") -> str:
    """A budget file: `head` (model classes, prices, routes... as YAML text) then the budgets."""
    return head + yaml.safe_dump({"budgets": list(budgets)}, sort_keys=False)


def budget_config(*budgets: dict[str, Any], head: str = "") -> BudgetConfig:
    """The parsed form of `budgets_yaml(...)`, through the same parser the components use."""
    return parse_budget_yaml(budgets_yaml(*budgets, head=head))


# --- signals ---------------------------------------------------------------------------------

#: What a signal of each action has typically spent of a 50 USD limit.
SPENT_AT = {"ok": 10.0, "warn": 36.0, "downgrade": 44.0, "throttle": 52.5}


def make_signal(
    action: str = "warn",
    *,
    spent: float | None = None,
    limit: float = 50.0,
    issued_at: datetime | None = None,
    ttl: timedelta = timedelta(minutes=5),
    **fields: Any,
) -> Signal:
    """A signal for tenant `acme`'s `tenant-daily` budget, issued now (or at `issued_at`).

    `ratio` follows `spent / limit` and the window is the UTC day of `issued_at`, unless given.
    """
    spent = SPENT_AT[action] if spent is None else spent
    issued_at = issued_at or datetime.now(UTC)
    day = issued_at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    base: dict[str, Any] = dict(
        scope="tenant",
        key="acme",
        budget="tenant-daily",
        action=action,
        spent=spent,
        limit=limit,
        ratio=spent / limit,
        window_start=day,
        window_end=day + timedelta(days=1),
        issued_at=issued_at,
        expires_at=issued_at + ttl,
    )
    base.update(fields)
    return Signal(**base)


# --- span usages -----------------------------------------------------------------------------

_span_numbers = itertools.count(1)


def span_usage(at: datetime | None = None, *, duration_s: float = 1.0, **fields: Any) -> SpanUsage:
    """One `chat` span starting at `at` (default: the epoch), with trace and span ids no other span has."""
    number = next(_span_numbers)
    start_ns = int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000 if at else 0
    base: dict[str, Any] = dict(
        trace_id=f"{number:032x}",
        span_id=f"{number:016x}",
        parent_span_id="",
        name="chat",
        start_ns=start_ns,
        end_ns=start_ns + int(duration_s * 1_000_000_000),
        operation="chat",
    )
    base.update(fields)
    return SpanUsage(**base)
