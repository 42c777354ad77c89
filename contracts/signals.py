"""The signal contract (docs/ARCHITECTURE.md §8): what the stream publishes, what guards read.

Signals are JSON on the compacted `burnguard.signals` topic. The Kafka key is
`scope:key@budget` — a bare `scope:key` would let two budgets over the
same scope (a daily and a monthly tenant budget) overwrite each other in the
compacted topic, so the budget id is part of the key. Subscribers combine all
current signals that match a call and apply the most severe one.

`signal.schema.json` beside this module is generated from `Signal` (see
`write_schema`) so services in other languages can validate what they read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from burnguard.contracts.budgets import SEVERITY
from pydantic import BaseModel, ConfigDict, Field

SIGNAL_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("signal.schema.json")
SignalAction = Literal["ok", "warn", "downgrade", "throttle"]


class Signal(BaseModel):
    """The state of one budget for one key, as of `issued_at`."""

    #: No NaN or infinity: a signal with one would be dropped by every guard as malformed,
    #: switching the budget off (numbers are also non-negative below).
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    v: Literal[1] = SIGNAL_VERSION
    scope: str = Field(description="budget scope, e.g. 'tenant' or 'tenant+feature'")
    key: str = Field(description="the scope's key, e.g. 'acme' or 'acme/summarize'")
    budget: str = Field(description="id of the budget this signal is about")
    action: SignalAction
    downgrade_to: str | None = Field(default=None, description="model class to downgrade to")
    metric: str = "cost_usd"
    spent: float = Field(ge=0)
    limit: float = Field(ge=0)
    ratio: float = Field(ge=0)
    window_start: datetime
    window_end: datetime
    burn_rate_per_hour: float = Field(default=0.0, ge=0)
    projected_exhaustion: datetime | None = None
    issued_at: datetime
    expires_at: datetime
    reason: str = ""

    @property
    def kafka_key(self) -> str:
        return signal_key(self.scope, self.key, self.budget)

    @property
    def severity(self) -> int:
        return SEVERITY[self.action]

    def is_stale(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Signal:
        return cls.model_validate_json(payload)


def signal_key(scope: str, key: str, budget: str) -> str:
    return f"{scope}:{key}@{budget}"


def signal_of_record(key: bytes | None, payload: bytes) -> Signal:
    """The signal in a `burnguard.signals` record; ValueError if it is malformed or keyed elsewhere.

    The worker keys each record by its signal's key, and readers hold a signal under that key
    while a tombstone removes by the record's. One under another key would outlive its own
    tombstone, and a checkpoint (which keeps each record key's latest) would disagree with a
    replay about it: it is refused as malformed.
    """
    signal = Signal.from_json(payload)
    if key is not None and key != signal.kafka_key.encode():
        raise ValueError(f"record key {key[:200]!r} is not its signal's key {signal.kafka_key[:200]!r}")
    return signal


def json_schema() -> dict:
    schema = Signal.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://burnguard.dev/schemas/signal-v1.json"
    return schema


def write_schema(path: Path = SCHEMA_PATH) -> None:
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
