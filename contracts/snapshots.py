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
    before, after = usage_kafka_key_parts(scope, budget, window, window_start)
    return f"{before}{key}{after}"


def usage_kafka_key_parts(scope: str, budget: str, window: str, window_start: datetime) -> tuple[str, str]:
    """`usage_kafka_key` around its `key`: the same for every key of a budget's windows with this
    start (the snapshot timer makes them once per budget and start, a key's first snapshot joins them)."""
    after = f"@{budget}"
    if not window or window in CALENDAR_WINDOWS:
        after = f"{after}#{window_start.isoformat()}"
    return f"{scope}:", after


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
    cost as much as encoding it. pydantic's own encoder writes every part, in the model's field
    order, so the bytes are the model's (`tests/test_snapshot_encoding.py` compares them). The
    parts change at different rates, so the worker keeps the first ones (`usage_head` per window
    key, `usage_bounds` per window start and run, `usage_stamp` per run) and encodes only the
    amounts per snapshot (`usage_value`).
    """
    head, bounds = usage_head(budget, scope, key, metric, window), usage_bounds(window_start, window_end)
    return usage_value(head, bounds, spent, limit, spans, usage_stamp(updated_at))


def usage_head(budget: str, scope: str, key: str, metric: str, window: str) -> bytes:
    """The model's bytes up to its `window` field."""
    return usage_head_of(usage_head_parts(budget, scope, metric, window), key)


def usage_head_of(parts: tuple[bytes, bytes], key: str) -> bytes:
    """`usage_head` of `key` from its budget's `usage_head_parts`: the key's JSON string between them."""
    return parts[0] + to_json(key) + parts[1]


def usage_head_parts(budget: str, scope: str, metric: str, window: str) -> tuple[bytes, bytes]:
    """`usage_head` around its `key`'s JSON string (`to_json(key)`, a str written alone as in the
    object): the same for every key of a budget (its windows' first snapshots join them)."""
    before = to_json({"v": 1, "budget": budget, "scope": scope})[:-1] + b',"key":'
    return before, b',"metric":' + to_json(metric) + b',"window":' + to_json(window)


def usage_bounds(window_start: datetime, window_end: datetime) -> bytes:
    """The model's `window_start` and `window_end` fields, comma first."""
    return b"," + to_json({"window_start": window_start, "window_end": window_end})[1:-1]


def usage_stamp(updated_at: datetime) -> bytes:
    """The model's `updated_at` field, comma first, and its closing brace (one per snapshot run:
    every snapshot of a run shares it)."""
    return b',"updated_at":' + to_json(updated_at) + b"}"


def usage_value(head: bytes, bounds: bytes, spent: float, limit: float, spans: int, stamp: bytes) -> bytes:
    """The model's bytes from its parts: `head`, `bounds` and `stamp` as above, and the amounts.

    The amounts are made floats as the model's fields make them: a spend may be an int
    (`Ring.total`); a NaN or an infinity is written as the model's `ser_json_inf_nan` says.
    """
    spent, limit = float(spent), float(limit)
    # pydantic writes the four as a list, faster than as an object; none of them holds a comma
    amounts = to_json((spent, limit, spent / limit, spans), inf_nan_mode=_INF_NAN_MODE)[1:-1].split(b",")
    return b"".join(
        (head, bounds, _SPENT, amounts[0], _LIMIT, amounts[1], _RATIO, amounts[2], _SPANS, amounts[3], stamp)
    )


#: What comes before each amount in the model's JSON.
_SPENT, _LIMIT, _RATIO, _SPANS = b',"spent":', b',"limit":', b',"ratio":', b',"spans":'


#: How the model writes a NaN or an infinity (pydantic's default unless its config says otherwise).
_INF_NAN_MODE = BudgetUsage.model_config.get("ser_json_inf_nan", "null")
