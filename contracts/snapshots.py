"""Budget usage snapshots: the running total of each budget key and window.

Signals only say when a key's state changes; snapshots say where every
active key stands, so dashboards can draw burn-down curves and tests can
check totals exactly. The stream publishes them on the compacted
`burnguard.budget_usage` topic, one row per budget key and calendar window
(`scope:key@budget#window_start`) or per budget key for rolling and session
windows (`scope:key@budget`), whose start moves with the clock or never changes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from burnguard.contracts.windows import CALENDAR_WINDOWS
from pydantic import BaseModel, ConfigDict
from pydantic_core import to_json


class BudgetUsage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    budget: str
    scope: str
    key: str
    metric: str
    #: The budget's window as written (`day`, `24h`, `session`); empty in snapshots of older workers.
    window: str = ""
    window_start: datetime
    window_end: datetime
    spent: float
    limit: float
    ratio: float
    spans: int
    updated_at: datetime

    @property
    def kafka_key(self) -> str:
        """One key per row that should survive compaction.

        A rolling window's start is "now minus the duration": in the key, every
        snapshot would be a new row and the topic would keep all stale ones.
        """
        return usage_kafka_key(self.scope, self.key, self.budget, self.window, self.window_start)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> BudgetUsage:
        return cls.model_validate_json(payload)


def usage_kafka_key(scope: str, key: str, budget: str, window: str, window_start: datetime) -> str:
    """`BudgetUsage.kafka_key` of a snapshot with these fields (see there)."""
    base = f"{scope}:{key}@{budget}"
    if window and window not in CALENDAR_WINDOWS:
        return base
    return f"{base}#{window_start.isoformat()}"


def usage_json(
    budget: str,
    scope: str,
    key: str,
    metric: str,
    window: str,
    window_start: datetime,
    window_end: datetime,
    spent: float,
    limit: float,
    spans: int,
    updated_at: datetime,
) -> bytes:
    """The bytes of `BudgetUsage(...).to_json()` for these (already valid) fields, without the model.

    The worker writes a snapshot of every changed window every few seconds: building the model
    cost as much as encoding it. pydantic's own encoder writes the dict, in the model's field
    order, so the bytes are the model's (`tests/test_snapshot_encoding.py` compares them). The
    amounts are made floats as the model's fields make them: a spend may be an int (`Ring.total`).
    """
    spent, limit = float(spent), float(limit)
    return to_json(
        {
            "v": 1,
            "budget": budget,
            "scope": scope,
            "key": key,
            "metric": metric,
            "window": window,
            "window_start": window_start,
            "window_end": window_end,
            "spent": spent,
            "limit": limit,
            "ratio": spent / limit,
            "spans": spans,
            "updated_at": updated_at,
        },
        inf_nan_mode=BudgetUsage.model_config.get("ser_json_inf_nan", "null"),  # the model's setting
    )
