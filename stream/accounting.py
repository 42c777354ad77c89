"""From decoded spans to usage deltas per budget window.

The stream's first stage reads whole OTLP batches and turns them, here, into
one `UsageDelta` per (budget, key, window) touched by the batch. Summing
inside the batch before anything is sent keeps the second stage's event rate
proportional to the number of active budget keys, not to the span rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from burnguard.contracts.budgets import Budget, BudgetConfig, metric_value
from burnguard.contracts.pricing import PriceBook, price_if_unpriced
from burnguard.contracts.usage import SpanUsage

_NS = 1_000_000_000


@dataclass(slots=True)
class UsageDelta:
    """What one batch added to one budget key in one window."""

    budget: str
    key: str
    window_start_ns: int
    amount: float = 0.0
    spans: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0

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


@dataclass
class BatchStats:
    spans: int = 0
    unpriced: int = 0


def fill_model_class(usage: SpanUsage, config: BudgetConfig) -> None:
    if not usage.model_class and usage.is_model_call:
        usage.model_class = config.model_class(usage.model)


def _counts_toward(budget: Budget, usage: SpanUsage) -> bool:
    if budget.metric == "tool_calls":
        return usage.is_tool_call or usage.tool_calls > 0
    return usage.is_model_call


def usage_deltas(
    usages: Iterable[SpanUsage], config: BudgetConfig, prices: PriceBook, stats: BatchStats | None = None
) -> list[UsageDelta]:
    """Sum a batch of spans into deltas for every budget each span matches."""
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
            window_start = budget.window_spec.start_ns(event_ns)
            slot = (budget.id, key, window_start)
            delta = deltas.get(slot)
            if delta is None:
                delta = deltas[slot] = UsageDelta(budget.id, key, window_start)
            delta.add(metric_value(budget.metric, usage), event_ns)
    return list(deltas.values())
