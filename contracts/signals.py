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
        (`tests/test_contracts_signals.py` holds the two equal, byte for byte). A signal `of_fields`
        built without validation passed both checks there (its fields set says so,
        `_VouchedFields`): they are not made again (~0.5 us of a signal's hand-over).
        """
        fields = self.__dict__
        if _encode is not None and (
            type(self.__pydantic_fields_set__) is _VouchedFields
            or (tuple(fields) == _FIELD_ORDER and _plain_numbers(fields))
        ):
            return _encode(fields)
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Signal:
        return cls.model_validate_json(payload)

    @classmethod
    def of_fields(cls, fields: dict[str, Any]) -> Signal:
        """The signal `Signal(**fields)` makes of every field but `v`, for a caller that knows its values.

        The worker decides thousands of signals a second from a validated `Budget`, the clock and
        its totals: pydantic's validation of the 16 fields was ~2.5 us of a signal's ~11 us of
        deciding (BENCHMARKS.md, signals at wire speed). `fields` holds every field in field
        order, `v` first (the dict becomes the signal's own). The caller vouches for what its own
        code made: `v` is 1, `scope`, `budget`, `metric` and `reason` are `str`, `action` one of
        `SignalAction`, `downgrade_to` a `str` or None, the times `datetime`s (None allowed for
        `projected_exhaustion`). What comes from a record or a sum is checked here: `key` is a
        `str` and each number a `float` in [0, 1e16) (not NaN nor infinite: what validation
        would refuse, and what `to_json` writes by msgspec). Fields that fail go through
        `Signal(...)`, which validates (or refuses) them as before. Either way the field dict,
        its order and `model_fields_set` are `Signal(...)`'s (`tests/test_contracts_signals.py`);
        one built without validation is marked so for `to_json` (`_VouchedFields`).
        """
        if (
            type(fields["key"]) is str
            and type(spent := fields["spent"]) is float
            and type(limit := fields["limit"]) is float
            and type(ratio := fields["ratio"]) is float
            and type(rate := fields["burn_rate_per_hour"]) is float
            and 0.0 <= spent < _PLAIN_FLOAT_BELOW
            and 0.0 <= limit < _PLAIN_FLOAT_BELOW
            and 0.0 <= ratio < _PLAIN_FLOAT_BELOW
            and 0.0 <= rate < _PLAIN_FLOAT_BELOW
        ):
            signal = _new_object(cls)
            _set_attribute(signal, "__dict__", fields)
            _set_attribute(signal, "__pydantic_fields_set__", _VouchedFields(_FIELDS_PASSED))
            _set_attribute(signal, "__pydantic_extra__", None)
            _set_attribute(signal, "__pydantic_private__", None)
            return signal
        return cls(**{name: value for name, value in fields.items() if name != "v"})


class _VouchedFields(set):
    """The fields set of a signal `Signal.of_fields` built without validation: a `set` (equal to
    `Signal(...)`'s) whose type tells `to_json` that the field dict is in field order and its
    numbers are floats msgspec writes as pydantic does.

    Only that signal's own set is of this type: a copy (pydantic's `model_copy`, `copy`,
    `deepcopy`, whose `update` may change the numbers) or an unpickled one is a plain `set`,
    and so is the result of `|`, `-` and the like (CPython makes their results of the base type).
    """

    __slots__ = ()

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[str]:
        return set(self)

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        return set, (list(self),)


#: The fields in the order `model_dump_json` writes them (the model's `__dict__` holds them so).
_FIELD_ORDER = tuple(Signal.model_fields)
#: What `of_fields` is given but `v`: the `model_fields_set` of a `Signal(...)` of them.
_FIELDS_PASSED = frozenset(_FIELD_ORDER) - {"v"}
_new_object = object.__new__
_set_attribute = object.__setattr__
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
