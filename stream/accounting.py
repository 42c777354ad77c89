"""From decoded spans to usage deltas per budget window.

The stream's first stage reads whole OTLP batches and turns them, here, into
one `UsageDelta` per (budget, key, window) touched by the batch. Summing
inside the batch before anything is sent keeps the second stage's event rate
proportional to the number of active budget keys, not to the span rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from burnguard.contracts.budgets import Budget, BudgetConfig, metric_value
from burnguard.contracts.pricing import PriceBook, price_if_unpriced
from burnguard.contracts.usage import SpanUsage
from burnguard.contracts.windows import ROLLING_BUCKETS


@dataclass(slots=True)
class UsageDelta:
    """What one batch added to one budget key in one window.

    `source_partition` / `source_offset` name the `otlp_spans` message the
    delta came from. A worker that dies before committing that offset
    replays the message and sends the same delta again; the second stage
    recognises it by this origin and does not count it twice.
    """

    budget: str
    key: str
    window_start_ns: int
    amount: float = 0.0
    spans: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0
    source_partition: int = -1
    source_offset: int = -1
    bucket_ns: int = 0  # rolling windows: the size of the time buckets the spend is kept in

    @property
    def partition_key(self) -> str:
        """All state of one budget key lives on one partition, so one worker owns it."""
        return f"{self.budget}|{self.key}"

    @property
    def state_key(self) -> str:
        return f"{self.budget}|{self.key}|{self.window_start_ns}"

    def add(self, amount: float, event_ns: int) -> None:
        self.amount += amount
        self.spans += 1
        if not self.first_event_ns or event_ns < self.first_event_ns:
            self.first_event_ns = event_ns
        self.last_event_ns = max(self.last_event_ns, event_ns)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageDelta:
        return cls(**data)


_NS_PER_MINUTE = 60_000_000_000
#: How far back the burn rate looks.
RECENT_MINUTES = 15


@dataclass(slots=True)
class WindowTotals:
    """The running totals of one budget key in one window, and which deltas are in them.

    `applied` maps each source partition to the highest source offset whose
    delta is included. Deltas from one source partition reach a key in
    offset order (one stage-one stream per partition, one ordered producer
    per usage partition), so "offset not above the mark" means "already
    counted": exactly-once totals from at-least-once delivery. The mark is
    stored in the same table value as the totals, so the changelog can never
    hold one without the other.
    """

    spent: float = 0.0
    spans: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    #: Spend per minute of event time (epoch minute -> amount) over the last
    #: `RECENT_MINUTES`, for a burn rate that follows what happens now.
    recent: dict[str, float] = field(default_factory=dict)
    #: Rolling windows only: spend per time bucket (bucket index -> amount), a window's worth.
    buckets: dict[str, float] = field(default_factory=dict)

    def apply(self, delta: UsageDelta) -> bool:
        """Add `delta` unless it is a replay of one already counted; True if it was added."""
        if delta.source_partition >= 0:
            source = str(delta.source_partition)
            if delta.source_offset <= self.applied.get(source, -1):
                return False
            self.applied[source] = delta.source_offset
        self.spent += delta.amount
        self.spans += delta.spans
        if not self.first_event_ns or delta.first_event_ns < self.first_event_ns:
            self.first_event_ns = delta.first_event_ns
        self.last_event_ns = max(self.last_event_ns, delta.last_event_ns)
        self._add_recent(delta.last_event_ns // _NS_PER_MINUTE, delta.amount)
        if delta.bucket_ns:
            self._add_to_bucket(delta.last_event_ns // delta.bucket_ns, delta.amount)
        return True

    def _add_to_bucket(self, index: int, amount: float) -> None:
        bucket = str(index)
        self.buckets[bucket] = self.buckets.get(bucket, 0.0) + amount
        newest = max(int(i) for i in self.buckets)
        for old in [i for i in self.buckets if int(i) <= newest - ROLLING_BUCKETS - 1]:
            self.spent -= self.buckets.pop(old)

    def rolling_buckets(self, now_ns: int, window_ns: int, bucket_ns: int) -> list[tuple[int, float]]:
        """(index, amount) of the buckets (partly) inside the window ending at `now_ns`, oldest first."""
        first = (now_ns - window_ns) // bucket_ns
        return sorted((int(i), amount) for i, amount in self.buckets.items() if int(i) >= first)

    def _add_recent(self, minute: int, amount: float) -> None:
        bucket = str(minute)
        self.recent[bucket] = self.recent.get(bucket, 0.0) + amount
        newest = max(int(m) for m in self.recent)
        for old in [m for m in self.recent if int(m) <= newest - RECENT_MINUTES]:
            del self.recent[old]

    def recent_spend(self, since_ns: int) -> float:
        """Spend in the minutes from `since_ns` on (minute resolution)."""
        first_minute = since_ns // _NS_PER_MINUTE
        return sum(amount for minute, amount in self.recent.items() if int(minute) >= first_minute)

    def to_state(self) -> list[Any]:
        return [
            self.spent,
            self.spans,
            self.first_event_ns,
            self.last_event_ns,
            self.applied,
            self.recent,
            self.buckets,
        ]

    @classmethod
    def from_state(cls, state: list[Any] | None) -> WindowTotals:
        if not state:
            return cls()
        spent, spans, first, last, *rest = state
        applied = dict(rest[0]) if rest else {}
        recent = dict(rest[1]) if len(rest) > 1 else {}
        buckets = dict(rest[2]) if len(rest) > 2 else {}
        return cls(spent, spans, first, last, applied, recent, buckets)


@dataclass
class BatchStats:
    spans: int = 0
    unpriced: int = 0
    too_late: int = 0  # (span, budget) pairs whose window had closed beyond the allowed lateness


def fill_model_class(usage: SpanUsage, config: BudgetConfig) -> None:
    if not usage.model_class and usage.is_model_call:
        usage.model_class = config.model_class(usage.model)


def _counts_toward(budget: Budget, usage: SpanUsage) -> bool:
    if budget.metric == "tool_calls":
        return usage.is_tool_call or usage.tool_calls > 0
    return usage.is_model_call


def usage_deltas(
    usages: Iterable[SpanUsage],
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None = None,
    source: tuple[int, int] = (-1, -1),
    closed_before_ns: int = 0,
) -> list[UsageDelta]:
    """Sum a batch of spans into deltas for every budget each span matches.

    `source` is the (partition, offset) of the message the batch came from.
    A late span counts in the window of its event time, unless that window
    ended before `closed_before_ns` (now minus the allowed lateness): budgets
    are decided by then, so it is counted in `stats.too_late` instead (the
    ClickHouse history still records the span).
    """
    deltas: dict[tuple[str, str, int], UsageDelta] = {}
    for usage in usages:
        price_if_unpriced(usage, prices)
        fill_model_class(usage, config)
        if stats is not None:
            stats.spans += 1
            stats.unpriced += usage.is_model_call and usage.cost_usd is None
        event_ns = usage.end_ns or usage.start_ns
        for budget in config.budgets:
            if not _counts_toward(budget, usage):
                continue
            key = budget.key_for(usage)
            if key is None:
                continue
            if event_ns < closed_before_ns and _window_closed(budget, event_ns, closed_before_ns):
                if stats is not None:
                    stats.too_late += 1
                continue
            window_start = budget.window_spec.start_ns(event_ns)
            slot = (budget.id, key, window_start)
            delta = deltas.get(slot)
            if delta is None:
                delta = deltas[slot] = UsageDelta(
                    budget.id,
                    key,
                    window_start,
                    source_partition=source[0],
                    source_offset=source[1],
                    bucket_ns=budget.window_spec.bucket_ns,
                )
            delta.add(metric_value(budget.metric, usage), event_ns)
    return list(deltas.values())


def _window_closed(budget: Budget, event_ns: int, closed_before_ns: int) -> bool:
    window = budget.window_spec
    if window.rolling_ns:
        return event_ns + window.rolling_ns < closed_before_ns
    _, end = window.bounds(datetime.fromtimestamp(event_ns / 1e9, UTC))
    return end.timestamp() * 1e9 <= closed_before_ns


def context_observations(
    usages: Iterable[SpanUsage], config: BudgetConfig, source: tuple[int, int] = (-1, -1)
) -> list[dict[str, Any]]:
    """Per (context guard, session): the input tokens of the batch's model calls, in event order."""
    if not config.context_guards:
        return []
    calls: dict[str, list[tuple[int, int]]] = {}
    for usage in usages:
        if usage.session and usage.is_model_call and usage.input_tokens:
            calls.setdefault(usage.session, []).append((usage.end_ns, usage.input_tokens))
    return [
        {
            "kind": "context",
            "guard": guard.id,
            "key": session,
            "inputs": [tokens for _, tokens in sorted(observed)],
            "source_partition": source[0],
            "source_offset": source[1],
        }
        for guard in config.context_guards
        for session, observed in calls.items()
    ]


@dataclass(slots=True)
class ContextGrowth:
    """How a session's input tokens per call developed: the last size and the growth streak."""

    last_input: int = 0
    streak: int = 0  # consecutive calls whose input grew
    calls: int = 0
    applied: dict[str, int] = field(default_factory=dict)

    def observe(self, inputs: list[int], source_partition: int, source_offset: int) -> bool:
        """Add a batch of observations unless it is a replay; True if added."""
        if source_partition >= 0:
            source = str(source_partition)
            if source_offset <= self.applied.get(source, -1):
                return False
            self.applied[source] = source_offset
        for tokens in inputs:
            self.streak = self.streak + 1 if self.calls and tokens > self.last_input else 0
            self.last_input = tokens
            self.calls += 1
        return True

    def to_state(self) -> list[Any]:
        return [self.last_input, self.streak, self.calls, self.applied]

    @classmethod
    def from_state(cls, state: list[Any] | None) -> ContextGrowth:
        if not state:
            return cls()
        last_input, streak, calls, applied = state
        return cls(last_input, streak, calls, dict(applied))
