"""What a span may claim: finite, non-negative, bounded numbers, short keys, a plausible clock.

A span is input from an application, and an application can have a bug, a
drifting clock or a reason to avoid its budget. One NaN cost made a window total
NaN forever; a negative cost gave a tenant credit; a 10^5-character tenant made a
budget key of that size; a span stamped in the future landed in a window no
budget looked at. The stream job and the ClickHouse sink both apply these rules
(through `contracts.otlp.decode_spans` and `trusted_event_ns`), so budgets and
history agree on which spans count and when.

Ceilings are configurable (`SpanLimits.from_env`); the defaults are far above any
real call (10^8 tokens, $10,000) and far below what poisons a sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from burnguard.contracts.env_numbers import env_number
from burnguard.contracts.usage import SpanUsage

#: Counter labels of the reasons a span is rejected.
NOT_FINITE = "not_finite"
NEGATIVE = "negative"
OVER_CEILING = "over_ceiling"
WRONG_TYPE = "wrong_type"
TOO_LONG = "too_long"
REJECTION_KINDS = (NOT_FINITE, NEGATIVE, OVER_CEILING, WRONG_TYPE, TOO_LONG)

#: The amount a span carries: finite, >= 0, <= max_cost_usd, or None (not priced).
COST_FIELD = "cost_usd"
#: The count fields a span carries; each must be a whole number in [0, max_tokens].
COUNT_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_creation_tokens",
    "reasoning_tokens",
    "tool_calls",
)
#: The fields that become budget, signal or ClickHouse keys: their length is limited.
KEY_FIELDS = (
    "tenant",
    "user",
    "workflow",
    "feature",
    "session",
    "action",
    "service",
    "request_model",
    "response_model",
)
_NS = 1_000_000_000
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SpanLimits:
    """Per-span ceilings and the clock skew a span's event time may have against its Kafka record."""

    max_tokens: int = 100_000_000
    max_cost_usd: float = 10_000.0
    max_key_chars: int = 256
    #: How far ahead of the record's (broker) time an event time is still trusted.
    clock_ahead_ns: int = 5 * 60 * _NS
    #: How far behind: the stream's allowed lateness (BURNGUARD_ALLOWED_LATENESS_S), the same variable.
    clock_behind_ns: int = 3600 * _NS
    #: `ceilings()`, made once: the native decoder is handed them for every message.
    _ceilings: tuple[float, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ceilings = (self.max_cost_usd, min(self.max_tokens, _INT64_MAX), min(self.max_key_chars, _INT64_MAX))
        object.__setattr__(self, "_ceilings", ceilings)

    def ceilings(self) -> tuple[float, int, int]:
        """(max_cost_usd, max_tokens, max_key_chars) as the native decoder takes them: it vouches
        only for spans inside them (contracts/native/src/checks.rs). A count or key ceiling past
        what an int64 holds is that bound: no count or length is larger."""
        return self._ceilings

    @classmethod
    def from_env(cls) -> SpanLimits:
        """BURNGUARD_MAX_SPAN_TOKENS, BURNGUARD_MAX_SPAN_COST_USD, BURNGUARD_MAX_KEY_CHARS,
        BURNGUARD_CLOCK_SKEW_AHEAD_S, BURNGUARD_ALLOWED_LATENESS_S (each optional)."""
        default = cls()
        limits = cls(
            max_tokens=env_number("BURNGUARD_MAX_SPAN_TOKENS", default.max_tokens, int),
            max_cost_usd=env_number("BURNGUARD_MAX_SPAN_COST_USD", default.max_cost_usd),
            max_key_chars=env_number("BURNGUARD_MAX_KEY_CHARS", default.max_key_chars, int),
            clock_ahead_ns=int(env_number("BURNGUARD_CLOCK_SKEW_AHEAD_S", 300.0, zero_ok=True) * _NS),
            clock_behind_ns=int(env_number("BURNGUARD_ALLOWED_LATENESS_S", 3600.0, zero_ok=True) * _NS),
        )
        if not (limits.max_tokens > 0 and 0 < limits.max_cost_usd < math.inf and limits.max_key_chars > 0):
            raise ValueError("span limits must be positive and finite")
        return limits


DEFAULT_LIMITS = SpanLimits()


def cost_problem(cost: float | None, limits: SpanLimits) -> tuple[str, str] | None:
    """(kind, reason) when a cost is not a finite, non-negative amount under the ceiling."""
    if cost is None or 0.0 <= cost <= limits.max_cost_usd:
        return None
    if not math.isfinite(cost):
        return NOT_FINITE, f"cost_usd is {cost}, not a finite number"
    if cost < 0:
        return NEGATIVE, f"cost_usd is negative ({cost})"
    return OVER_CEILING, f"cost_usd {cost} is above the per-span ceiling {limits.max_cost_usd}"


def span_problem(usage: SpanUsage, limits: SpanLimits = DEFAULT_LIMITS) -> tuple[str, str] | None:
    """(kind, reason) of the first rule the span breaks, None when it may be counted.

    Cheap on a good span (a dozen compares): it runs once per span on the hot path.
    """
    cost = usage.cost_usd
    if cost is not None and not 0.0 <= cost <= limits.max_cost_usd:  # NaN fails the compare too
        return cost_problem(cost, limits)
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_creation_tokens,
        usage.reasoning_tokens,
        usage.tool_calls,
    )
    if min(counts) < 0 or max(counts) > limits.max_tokens:
        for name, value in zip(COUNT_FIELDS, counts, strict=True):
            if value < 0:
                return NEGATIVE, f"{name} is negative ({value})"
            if value > limits.max_tokens:
                return OVER_CEILING, f"{name} {value} is above the per-span ceiling {limits.max_tokens}"
    most = limits.max_key_chars
    if (
        len(usage.tenant) > most
        or len(usage.user) > most
        or len(usage.workflow) > most
        or len(usage.feature) > most
        or len(usage.session) > most
        or len(usage.action) > most
        or len(usage.service) > most
        or len(usage.request_model) > most
        or len(usage.response_model) > most
    ):
        for name in KEY_FIELDS:
            if len(value := getattr(usage, name)) > most:
                return TOO_LONG, f"{name} is {len(value)} characters long (at most {most})"
    return None


def trusted_event_ns(event_ns: int, record_ns: int, ahead_ns: int, behind_ns: int) -> int | None:
    """None when `event_ns` lies within [record - behind, record + ahead], else the record's time.

    The record's time is the broker's (`otlp_spans` uses LogAppendTime), so a
    sender's clock cannot move its spend into a window no budget watches.
    """
    if record_ns <= 0 or record_ns - behind_ns <= event_ns <= record_ns + ahead_ns:
        return None
    return record_ns


def correct_clock(usage: SpanUsage, record_ns: int, ahead_ns: int, behind_ns: int) -> bool:
    """Move a span whose event time is outside the trusted skew to its record's time; True if moved.

    The original end time is kept in `extra` (`burnguard.clock.original_end_ns`),
    so history shows the span was moved and from where.
    """
    event_ns = usage.end_ns or usage.start_ns
    moved_to = trusted_event_ns(event_ns, record_ns, ahead_ns, behind_ns)
    if moved_to is None:
        return False
    duration = usage.end_ns - usage.start_ns
    usage.extra[CLOCK_CORRECTED] = str(event_ns)
    usage.end_ns = moved_to
    usage.start_ns = moved_to - duration if 0 <= duration <= ahead_ns + behind_ns else moved_to
    return True


def correct_clocks(usages: list[SpanUsage], record_ns: int, ahead_ns: int, behind_ns: int) -> tuple[int, int]:
    """`correct_clock` over one message's spans: (spans moved, the latest event time after it, or 0).

    Stage 1 needs both for every message; one loop over its spans, `correct_clock` called only for
    a span outside the skew (the test of `trusted_event_ns`, on bounds computed once per message).
    """
    moved = latest = 0
    low, high = record_ns - behind_ns, record_ns + ahead_ns
    for usage in usages:
        event_ns = usage.end_ns or usage.start_ns
        if record_ns > 0 and not low <= event_ns <= high:
            moved += correct_clock(usage, record_ns, ahead_ns, behind_ns)
            event_ns = usage.end_ns or usage.start_ns
        if event_ns > latest:
            latest = event_ns
    return moved, latest


#: The `extra` entry set on a span moved to its record's time: the event time it claimed (ns).
CLOCK_CORRECTED = "burnguard.clock.original_end_ns"
