"""What a budget file would have done to history: stored spans through the worker's own code.

`burnguard budgets simulate FILE --since 30d` replays the spans of ClickHouse
in event-time order through the same functions the worker runs: per span,
`accounting.usage_deltas` (pricing, budget matching, keys, windows),
`WindowTotals.apply` (window totals, rolling buckets, burn rate) and
`policy.changed_signal` (rungs, forecast, the published-state rule). No Faust:
the tables are dicts here, and "now" is the span's event time.

Per span and budget key it does what stage 2 and its refresh timer do:

1. re-decide the key on the totals so far at the span's time (the timer's
   tick: a new calendar window, or a rolling window's spend rolling out,
   lifts a restriction; the worker's timer notices that within its refresh
   interval, the simulation at the key's next span, which is when it matters);
2. book the call against the state in force then: a call made while the key
   was at `warn`, `downgrade` or `throttle` would have met that signal;
3. add the span to the window's totals and decide, publishing on a change.

History is replayed as it happened: calls that the throttle would have
refused, and the cheaper models a downgrade would have used, stay in the
running totals, so every rung is reached no later than with the budget in
force. Context guards are not simulated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from burnguard.contracts.budgets import Budget, BudgetConfig
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.stream.accounting import UsageDelta, WindowTotals, usage_deltas
from burnguard.stream.policy import changed_signal

RUNGS = ("warn", "downgrade", "throttle")
_NS = 1_000_000_000
_TTL = timedelta(minutes=5)  # only the signals' expiry, which a simulation never reaches


def _at(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / _NS, UTC)


@dataclass
class RungStats:
    """One rung of one key: when it was first reached, and the calls that met it."""

    first_at: datetime | None = None
    calls: int = 0  # calls made while the key was at this rung
    spend: float = 0.0  # what they cost (at `throttle`: what would have been refused)
    saving: float = 0.0  # at `downgrade`: their cost less the same tokens at the ladder's target


@dataclass
class KeyReport:
    """What one budget would have done to one key."""

    budget: str
    scope: str
    key: str
    rungs: dict[str, RungStats] = field(default_factory=lambda: {rung: RungStats() for rung in RUNGS})
    #: Every published change: (time, action, spent as the signal says).
    changes: list[tuple[datetime, str, float]] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return any(stats.first_at is not None for stats in self.rungs.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for stats in data["rungs"].values():
            stats["first_at"] = stats["first_at"].isoformat() if stats["first_at"] else None
        data["changes"] = [[at.isoformat(), action, spent] for at, action, spent in self.changes]
        return data


class Simulation:
    """The worker's accounting and policy, fed one stored span at a time."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self.prices = PriceBook(config.prices)
        self.budgets = {budget.id: budget for budget in config.budgets}
        self.totals: dict[str, WindowTotals] = {}  # `budget|key|window_start_ns`, as the worker's table
        self.states: dict[str, dict[str, Any]] = {}  # `budget|key` -> last published state
        self.reports: dict[str, KeyReport] = {}
        self.spans = 0

    def feed(self, usage: SpanUsage) -> None:
        """One span, in event-time order."""
        self.spans += 1
        for delta in usage_deltas([usage], self.config, self.prices):
            self._account(usage, delta)

    def results(self) -> list[KeyReport]:
        """The keys that reached a rung, by budget and key."""
        return sorted((r for r in self.reports.values() if r.reached), key=lambda r: (r.budget, r.key))

    def _account(self, usage: SpanUsage, delta: UsageDelta) -> None:
        budget = self.budgets[delta.budget]
        now = _at(delta.last_event_ns)
        state_key = f"{delta.budget}|{delta.key}|{delta.window_start_ns}"
        totals = self.totals.setdefault(state_key, WindowTotals())
        self._decide(budget, delta.key, delta.window_start_ns, totals, now)
        self._book(usage, budget, delta.key)
        totals.apply(delta)
        self._decide(budget, delta.key, delta.window_start_ns, totals, now)

    def _decide(
        self, budget: Budget, key: str, window_start_ns: int, totals: WindowTotals, now: datetime
    ) -> None:
        partition_key = f"{budget.id}|{key}"
        previous = self.states.get(partition_key)
        signal = changed_signal(budget, key, window_start_ns, totals, now, previous, _TTL)
        if signal is None:
            return
        self.states[partition_key] = {
            "action": signal.action,
            "window_start_ns": window_start_ns,
            "downgrade_to": signal.downgrade_to,
        }
        report = self._report(budget, key)
        report.changes.append((now, signal.action, signal.spent))
        if signal.action in RUNGS and report.rungs[signal.action].first_at is None:
            report.rungs[signal.action].first_at = now

    def _book(self, usage: SpanUsage, budget: Budget, key: str) -> None:
        """Count a call against the rung its key was at when it was made."""
        state = self.states.get(f"{budget.id}|{key}")
        if state is None or state["action"] not in RUNGS:
            return
        stats = self._report(budget, key).rungs[state["action"]]
        stats.calls += 1
        cost = usage.cost_usd or 0.0
        stats.spend += cost
        if state["action"] == "downgrade" and usage.is_model_call:
            stats.saving += cost - self._downgraded_cost(usage, state["downgrade_to"], cost)

    def _downgraded_cost(self, usage: SpanUsage, target_class: str | None, cost: float) -> float:
        """The same tokens at the ladder's target model; the call's own cost when there is none."""
        target = self.config.downgrade_model(usage.model, target_class)
        if target is None:
            return cost
        price = self.prices.price(
            target,
            usage.provider,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_creation_tokens=usage.cache_creation_tokens,
        )
        return cost if price is None else price

    def _report(self, budget: Budget, key: str) -> KeyReport:
        partition_key = f"{budget.id}|{key}"
        report = self.reports.get(partition_key)
        if report is None:
            report = self.reports[partition_key] = KeyReport(budget.id, budget.scope_name, key)
        return report


def table_rows(results: list[KeyReport]) -> list[dict[str, Any]]:
    """One flat row per key, for the rich table and the report's section."""

    def when(stats: RungStats) -> str:
        return f"{stats.first_at:%Y-%m-%d %H:%M}" if stats.first_at else "-"

    rows = []
    for report in results:
        warn, downgrade, throttle = (report.rungs[rung] for rung in RUNGS)
        rows.append(
            {
                "budget": report.budget,
                "key": f"{report.scope}={report.key}",
                "warn at": when(warn),
                "downgrade at": when(downgrade),
                "throttle at": when(throttle),
                "calls warned": warn.calls,
                "calls downgraded": downgrade.calls,
                "downgrade saving (USD)": round(downgrade.saving, 6),
                "calls refused": throttle.calls,
                "refused spend (USD)": round(throttle.spend, 6),
            }
        )
    return rows


def simulate(config: BudgetConfig, spans: Any) -> Simulation:
    """Run `spans` (event-time order) through a fresh simulation."""
    simulation = Simulation(config)
    for usage in spans:
        simulation.feed(usage)
    return simulation
