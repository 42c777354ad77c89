"""Budget usage snapshots: the running total of each budget key and window.

Signals only say when a key's state changes; snapshots say where every
active key stands, so dashboards can draw burn-down curves and tests can
check totals exactly. The stream publishes them on the compacted
`burnguard.budget_usage` topic, keyed by `scope:key@budget#window_start`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class BudgetUsage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    budget: str
    scope: str
    key: str
    metric: str
    window_start: datetime
    window_end: datetime
    spent: float
    limit: float
    ratio: float
    spans: int
    updated_at: datetime

    @property
    def kafka_key(self) -> str:
        return f"{self.scope}:{self.key}@{self.budget}#{self.window_start.isoformat()}"

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> BudgetUsage:
        return cls.model_validate_json(payload)
