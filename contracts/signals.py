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
from typing import Any, Literal

from burnguard.contracts.budgets import SEVERITY
from pydantic import BaseModel, ConfigDict, Field

try:  # the worker's environment (the `stream` extra); a guard's may lack it: pydantic's encoder then
    from msgspec.json import Encoder as _JsonEncoder
except ImportError:  # pragma: no cover - exercised where msgspec is not installed
    _JsonEncoder = None

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
        """The signal's JSON: `model_dump_json`'s bytes, written by msgspec where that is the same.

        The worker publishes thousands of signals a second; pydantic's serializer took ~3 us per
        signal, msgspec ~0.6 us over the model's own field dict. Both write keys in field order,
        strings (non-ASCII as UTF-8, the same escapes), datetimes and None alike; floats too,
        except a positive exponent (pydantic `1e+16`, msgspec `1e16`), i.e. a magnitude of 1e16
        or more: such a signal, a non-finite number (never validated, e.g. built by
        `model_construct`) or fields in another order go through pydantic
        (`tests/test_contracts_signals.py` holds the two equal, byte for byte).
        """
        fields = self.__dict__
        if _encode is not None and tuple(fields) == _FIELD_ORDER and _plain_numbers(fields):
            return _encode(fields)
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Signal:
        return cls.model_validate_json(payload)


#: The fields in the order `model_dump_json` writes them (the model's `__dict__` holds them so).
_FIELD_ORDER = tuple(Signal.model_fields)
#: msgspec's encoder, built once (None without msgspec: `to_json` uses pydantic's).
_encode = _JsonEncoder().encode if _JsonEncoder is not None else None
#: Below this magnitude msgspec and pydantic write a float alike (Python's `repr` switches to an
#: exponent at 1e16; below 1e-4 both write `1e-7`, the exponent's sign included).
_PLAIN_FLOAT_BELOW = 1e16


def _plain_numbers(fields: dict[str, Any]) -> bool:
    """Whether every float of a signal is one msgspec writes as pydantic does (NaN compares False)."""
    return (
        -_PLAIN_FLOAT_BELOW < fields["spent"] < _PLAIN_FLOAT_BELOW
        and -_PLAIN_FLOAT_BELOW < fields["limit"] < _PLAIN_FLOAT_BELOW
        and -_PLAIN_FLOAT_BELOW < fields["ratio"] < _PLAIN_FLOAT_BELOW
        and -_PLAIN_FLOAT_BELOW < fields["burn_rate_per_hour"] < _PLAIN_FLOAT_BELOW
    )


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
