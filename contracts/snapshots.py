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
        base = f"{self.scope}:{self.key}@{self.budget}"
        if self.window and self.window not in CALENDAR_WINDOWS:
            return base
        return f"{base}#{self.window_start.isoformat()}"

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> BudgetUsage:
        return cls.model_validate_json(payload)
