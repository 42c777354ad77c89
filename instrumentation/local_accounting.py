"""Local accounting between signals (docs/ARCHITECTURE.md §12): the guard's estimate of a budget key's spend.

A signal states a key's spend as of `issued_at`; the next one may be a whole
enforcement latency (span → Kafka → worker → signal → guard) away, and every
call started meanwhile would get through. The ledger keeps, for each signal,
what this process has used on that key since — calls settled since, plus an
estimate for the calls still in flight — and denies once the projection
reaches the budget's throttle rung.

What counts. A call counts toward a signal when its attribution has the
signal's scope key (`contracts.budget_rules`, as the stream keys it). A call in
flight counts with an estimate for the model it runs on (after routing and any
downgrade): the key's last call of that model (a process serving many tenants
sees calls of very different sizes), else this process's last call of that
model, else its last call of any model priced again at this model's price (a
downgraded call costs the cheaper model's price, not the one it was
downgraded from). It is settled to what it used when it ends: that is what
holds back a burst of concurrent callers. A settled call counts when it ended
after the signal's `issued_at`: its span left the process after the worker
decided, so the signal's `spent` cannot include it (clocks assumed in step). Calls ended before may be in
`spent` and are left out: an undercount, never a double count. Ended calls are
remembered for a minute only for the budgets in the guard's config; for other
budgets the count starts when the signal is received. A tally lives while its
signal is neither expired nor of an ended window; a signal already past either
when it arrives gets none, and the sweep drops tallies once they are. A newer signal (a
refresh, the next rung, an `ok` after a roll-over or a raised limit) replaces
the tally, so a local deny never outlives the signal it came from; nor does it
outlive the signal's `expires_at` or `window_end`. The deny point is the
budget's throttle rung (from the config; 1.0 of the limit when the budget is
unknown); a budget whose ladder never throttles is never denied locally.

Other processes. Each process sees only its own calls, yet a key is usually
spent by several. When the budget is in the guard's config, own use since the
signal is scaled by 1 / share to stand for the whole key's, where the share is
this process's part of the key's spend. It is measured over the span the
signal's `spent` covers when the process can (`_own_before`: it began to track
the key inside the window and remembers every call since `issued_at`), two
ways: its own use in the window up to `issued_at` over `spent`, and its own use
between the previous signal's `issued_at` and this one's over the key's
(`_recent_share`: follows a mix that changed, a process that started later or
was slowed down); the larger counts (`_share`). A process whose own use is all
of `spent` is the only spender the worker knows of, share 1. Otherwise it is
the ratio of this process's last minute to the key's burn rate
(`_rate_share`), which the stream job measures over up to 15 minutes: two
spans, so after a downgrade cut the cost of a call the worker's rate still
carries the dearer calls, the ratio underestimates the share and own use is
scaled up too far (one call stood for seven in
`test_two_processes_after_a_downgrade_...`). Without a config entry the share
is 1 (own use only). A share too low makes the guard deny early, until the next
signal (refreshed every 30 s by default, `expires_at` at the latest); one too
high denies late, and the worker's throttle bounds the overshoot. The share is
one figure taken at the signal: a mix that changes after it moves the
projection by that much of the spend since the signal.

Every method runs under one lock: callers are threads, and the check and the
reservation of a call must be one step, or a burst of callers would all pass
the check before any of them reserved.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.budget_rules import (
    METRIC_INDEX,
    Amounts,
    KeyMatcher,
    amounts,
    compile_match,
    key_of_values,
    matched_key,
)
from burnguard.contracts.budgets import Budget, BudgetConfig
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.signals import Signal

#: One model call's usage in every metric at once (`METRICS` order), so any tally can take its own.
Usage = Amounts
#: Before the first call of any model ends, a call is estimated as one call and nothing else.
FIRST_ESTIMATE: Usage = (0.0, 0.0, 0.0, 0.0, 1.0)
#: A share below this is treated as this: protects against a burn rate far above this process's view.
MIN_SHARE = 0.05
#: A reservation older than this is released: a call whose `end` never came must not block forever.
MAX_IN_FLIGHT_S = 600.0
RECENT_S = 60.0


def usage_vector(cost_usd: float | None, attributes: Mapping[str, Any]) -> Usage:
    """A finished model call's usage in every metric: the stream's rule (`budget_rules.amounts`)."""
    return amounts(
        cost_usd,
        float(attributes.get(attr.GEN_AI_USAGE_INPUT_TOKENS) or 0),
        float(attributes.get(attr.GEN_AI_USAGE_OUTPUT_TOKENS) or 0),
        float(attributes.get(attr.TOOL_CALLS) or 0),
        tool_call=False,
        model_call=True,
    )


@dataclass(slots=True, eq=False)
class Tally:
    """This process's use of one budget key since one signal for it, and where the key gets denied.

    The signal is kept as its JSON (`payload`), a third of the model's memory, and built again
    only for a local deny (`signal`).
    """

    payload: bytes
    scope: str
    key: str
    metric: int
    spent: float
    deny_at: float  # the throttle rung in the signal's metric; inf: the budget never throttles
    window_end_s: float
    expires_s: float
    share: float = 1.0
    own: float = 0.0  # settled since the signal was issued
    #: own use in the signal's window up to `issued_at` (None: unknown), for the next signal's share
    before: float | None = None
    reserved: float = 0.0  # estimates of the calls in flight
    #: model -> this key's last call of it, in the metric; passed on to the key's next tally
    learned: dict[str, float] | None = None

    def estimate(self, model: str | None, usage: Usage) -> float:
        """A call of `model` on this key: the key's last call of that model, else `usage` (the process's)."""
        if self.learned is not None and model is not None:
            return self.learned.get(model, usage[self.metric])
        return usage[self.metric]

    def learn(self, model: str, usage: Usage) -> None:
        if self.learned is None:
            self.learned = {}
        self.learned[model] = usage[self.metric]

    @property
    def signal(self) -> Signal:
        return Signal.from_json(self.payload)

    def projected(self) -> float:
        """The key's estimated spend now: the signal's, plus this process's since, scaled to all processes."""
        return self.spent + (self.own + self.reserved) / self.share


class OwnUse:
    """This process's use of one budget key: (end time, amount) of each call over the last minute,
    and the total since `started_s` (when this process began to track the key)."""

    __slots__ = ("calls", "started_s", "total")

    def __init__(self, started_s: float) -> None:
        self.calls: deque[tuple[float, float]] = deque()
        self.started_s = started_s
        self.total = 0.0

    def add(self, end_s: float, amount: float) -> None:
        self.calls.append((end_s, amount))
        self.total += amount
        while self.calls and self.calls[0][0] < end_s - RECENT_S:
            self.calls.popleft()

    def since(self, start_s: float) -> float:
        """Use by calls that ended after `start_s` (within the last minute)."""
        return sum(amount for end_s, amount in self.calls if end_s > start_s)


@dataclass(slots=True, eq=False)
class Reservation:
    """An admitted call's hold on the tallies it counts toward, until `settle` (call it once)."""

    ledger: LocalLedger | None
    model: str | None
    values: dict[str, str]
    estimate: Usage
    started_s: float
    tallies: list[tuple[Tally, float]] = field(default_factory=list)  # and the amount held on each
    recent: list[tuple[OwnUse, int]] = field(default_factory=list)

    def settle(self, cost_usd: float | None, attributes: Mapping[str, Any]) -> None:
        """The call ended: replace its estimate by what it used (nothing, if it failed unpriced)."""
        ledger, self.ledger = self.ledger, None
        if ledger is not None:
            ledger.settle(self, usage_vector(cost_usd, attributes))

    def release(self) -> None:
        """The call was refused after all (e.g. by a step cap): give the hold back, count nothing."""
        ledger, self.ledger = self.ledger, None
        if ledger is not None:
            ledger.release(self)


@dataclass(frozen=True, slots=True)
class _BudgetKeying:
    """How one configured budget keys a call: its id, scope dimensions, compiled match and metric."""

    budget: str
    dimensions: tuple[str, ...]
    matcher: KeyMatcher | None
    metric: int

    def key(self, values: Mapping[str, str]) -> str | None:
        return matched_key(key_of_values(values, self.dimensions), self.matcher)


class LocalLedger:
    """The tallies of every current signal, the calls in flight, and own recent use per budget key."""

    def __init__(
        self, config: BudgetConfig, clock: Callable[[], float], prices: PriceBook | None = None
    ) -> None:
        self._clock = clock
        self._prices = prices or PriceBook(config.prices)
        self._lock = threading.Lock()
        self._tallies: dict[str, Tally] = {}  # by the signal's Kafka key
        self._by_scope: dict[tuple[str, ...], dict[str, list[Tally]]] = {}
        self._in_flight: set[Reservation] = set()
        self._estimates: dict[str, Usage] = {}
        self._last_estimate = FIRST_ESTIMATE
        self._keyings = [
            _BudgetKeying(b.id, b.scope, compile_match(b.match), METRIC_INDEX[b.metric])
            for b in config.budgets
        ]
        self._throttle_at = {b.id: _throttle_at(b) for b in config.budgets}
        self._recent: dict[tuple[str, str], OwnUse] = {}
        self._next_sweep_s = 0.0
        self._next_dead_s = 0.0

    # --- signals ---------------------------------------------------------------------------------
    def on_signal(self, signal: Signal, payload: bytes | None = None) -> None:
        """Start a fresh tally for the signal's key: own use since it was issued, plus the calls in flight.

        `payload` is the signal's JSON as read from the topic (else it is serialised here).
        """
        metric = METRIC_INDEX.get(signal.metric)
        with self._lock:
            previous = self._drop(signal.kafka_key)
            if metric is None:
                return  # a metric this guard cannot measure: leave the key to the signals alone
            now_s = self._clock()
            if now_s >= self._next_dead_s:  # here too: a process that makes no calls still drops them
                self._drop_dead(now_s)
            if now_s >= signal.expires_at.timestamp() or now_s >= signal.window_end.timestamp():
                return  # never live again (see `_live_tallies`): nothing to hold
            tally = self._tally(signal, payload or signal.to_json(), metric, now_s, previous)
            if previous is not None and previous.metric == metric:
                tally.learned = previous.learned
            dimensions = tuple(signal.scope.split("+"))
            for reservation in self._in_flight:
                if key_of_values(reservation.values, dimensions) == signal.key:
                    held = tally.estimate(reservation.model, reservation.estimate)
                    tally.reserved += held
                    reservation.tallies.append((tally, held))
            self._tallies[signal.kafka_key] = tally
            self._by_scope.setdefault(dimensions, {}).setdefault(signal.key, []).append(tally)

    def use_since(self, budget: str, key: str, since_s: float) -> float:
        """This process's settled use of a configured budget's key since `since_s` (last minute only).

        What a new signal's tally starts from; the stream would have counted the same calls
        under the same key and metric (`contracts.budget_rules`).
        """
        with self._lock:
            recent = self._recent.get((budget, key))
            return recent.since(since_s) if recent is not None else 0.0

    def _tally(
        self, signal: Signal, payload: bytes, metric: int, now_s: float, previous: Tally | None
    ) -> Tally:
        throttle_at = self._throttle_at.get(signal.budget, 1.0)
        recent = self._recent.get((signal.budget, signal.key))
        issued_s = signal.issued_at.timestamp()
        before = _own_before(recent, signal)
        if previous is not None and previous.metric != metric:
            previous = None
        return Tally(
            payload,
            signal.scope,
            signal.key,
            metric,
            signal.spent,
            signal.limit * throttle_at if throttle_at is not None else math.inf,
            signal.window_end.timestamp(),
            signal.expires_at.timestamp(),
            share=_share(recent, signal, now_s, before, previous),
            own=recent.since(issued_s) if recent is not None else 0.0,
            before=before,
        )

    def holds(self, kafka_key: str) -> bool:
        """Whether a tally is held under `kafka_key` (the guard's replay skips expired `ok`s of no key)."""
        return kafka_key in self._tallies

    def forget(self, kafka_key: str) -> None:
        with self._lock:
            self._drop(kafka_key)

    def _drop(self, kafka_key: str) -> Tally | None:
        old = self._tallies.pop(kafka_key, None)
        if old is None:
            return None
        by_key = self._by_scope.get(tuple(old.scope.split("+")), {})
        remaining = [t for t in by_key.get(old.key, ()) if t is not old]
        if remaining:
            by_key[old.key] = remaining
        else:
            by_key.pop(old.key, None)
        return old

    # --- calls -----------------------------------------------------------------------------------
    def admit(self, values: dict[str, str], model: str | None, now_s: float) -> Reservation | Tally:
        """Reserve the call's estimate on its live tallies, or return the tally it would break."""
        with self._lock:
            live = self._live_tallies(values, now_s)
            for tally in live:
                if tally.projected() >= tally.deny_at:
                    return tally
            estimate = self._estimate(model)
            reservation = Reservation(self, model, values, estimate, now_s)
            for tally in live:
                held = tally.estimate(model, estimate)
                tally.reserved += held
                reservation.tallies.append((tally, held))
            if now_s >= self._next_sweep_s:  # before tracking: the sweep forgets keys not yet used
                self._sweep(now_s)
            self._track_recent(reservation)
            self._in_flight.add(reservation)
            return reservation

    def _estimate(self, model: str | None) -> Usage:
        """What a call of `model` is expected to use: the last call of that model, else the last
        call of any model priced at `model`'s price (its input tokens at the full input price, so
        never below a cached prompt's cost; kept as it was when that price is unknown)."""
        if not model:
            return self._last_estimate
        known = self._estimates.get(model)
        if known is not None:
            return known
        last = self._last_estimate
        if last is FIRST_ESTIMATE:
            return last
        cost = self._prices.price(model, input_tokens=int(last[2]), output_tokens=int(last[1] - last[2]))
        return last if cost is None else (cost, *last[1:])

    def exceeded(self, values: Mapping[str, str], now_s: float) -> Tally | None:
        """The first live tally whose projection has reached its throttle rung (no reservation made)."""
        with self._lock:
            for tally in self._live_tallies(values, now_s):
                if tally.projected() >= tally.deny_at:
                    return tally
        return None

    def settle(self, reservation: Reservation, usage: Usage) -> None:
        """Move the call from reserved to own on its tallies; log it in the recent use of its keys."""
        end_s = self._clock()
        with self._lock:
            if reservation not in self._in_flight:
                return  # released by the sweep already
            self._in_flight.discard(reservation)
            # a call that failed unpriced says nothing about the next one
            priced = usage[0] > 0 or usage[1] > 0
            learned = reservation.model if priced else None
            for tally, held in reservation.tallies:
                tally.reserved -= held
                tally.own += usage[tally.metric]
                if learned:
                    tally.learn(learned, usage)
            for recent, metric in reservation.recent:
                recent.add(end_s, usage[metric])
            if priced:
                if reservation.model:
                    self._estimates[reservation.model] = usage
                self._last_estimate = usage

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation whose call was never made: its estimate leaves the tallies, no use is added."""
        with self._lock:
            self._drop_reservation(reservation)

    def _drop_reservation(self, reservation: Reservation) -> None:
        if reservation not in self._in_flight:
            return
        self._in_flight.discard(reservation)
        for tally, held in reservation.tallies:
            tally.reserved -= held
        reservation.ledger = None

    def _live_tallies(self, values: Mapping[str, str], now_s: float) -> list[Tally]:
        """Tallies of this call's keys whose signal is neither stale nor of an ended window."""
        found: list[Tally] = []
        for dimensions, by_key in self._by_scope.items():
            key = values.get(dimensions[0]) if len(dimensions) == 1 else key_of_values(values, dimensions)
            if key:
                for tally in by_key.get(key, ()):
                    if now_s < tally.expires_s and now_s < tally.window_end_s:
                        found.append(tally)
        return found

    def _track_recent(self, reservation: Reservation) -> None:
        for keying in self._keyings:
            key = keying.key(reservation.values)
            if key is not None:
                recent = self._recent.get((keying.budget, key))
                if recent is None:
                    recent = self._recent[(keying.budget, key)] = OwnUse(reservation.started_s)
                reservation.recent.append((recent, keying.metric))

    def _sweep(self, now_s: float) -> None:
        """Release reservations of calls that never ended; forget dead tallies and keys with no recent use."""
        self._next_sweep_s = now_s + 10.0
        for reservation in [r for r in self._in_flight if now_s - r.started_s > MAX_IN_FLIGHT_S]:
            self._drop_reservation(reservation)
        if now_s >= self._next_dead_s:
            self._drop_dead(now_s)
        idle = [
            key
            for key, recent in self._recent.items()
            if not recent.calls or recent.calls[-1][0] < now_s - RECENT_S
        ]
        for key in idle:
            del self._recent[key]  # a reservation still holding it only loses the share estimate

    def _drop_dead(self, now_s: float) -> None:
        """Forget tallies whose signal expired or whose window ended: `_live_tallies` never returns them."""
        self._next_dead_s = now_s + 10.0
        dead = [k for k, t in self._tallies.items() if now_s >= t.expires_s or now_s >= t.window_end_s]
        for kafka_key in dead:
            self._drop(kafka_key)  # a reservation still holding it adjusts a tally nobody reads

    @property
    def tallies(self) -> int:
        """Signals this ledger holds a baseline for (live ones, and dead ones until the next sweep)."""
        with self._lock:
            return len(self._tallies)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


def _throttle_at(budget: Budget) -> float | None:
    """The ratio at which the budget throttles, or None when its ladder never does."""
    return next((a.at for a in budget.actions if a.do == "throttle"), None)


def _share(
    recent: OwnUse | None, signal: Signal, now_s: float, before: float | None, previous: Tally | None
) -> float:
    """This process's part of the key's spend: over the signal's own span when it can, else by rates.

    Over the signal's span two figures: the whole window's (`before / spent`) and the part since
    the previous signal (`_recent_share`), which follows a mix of processes that changed (one
    started later or was slowed down, and has run alike since). The larger is taken: a share too
    high scales own use too little, a later local deny that the worker's throttle bounds; one too
    low refuses calls that still fit.
    """
    if before is None or before <= 0 or signal.spent <= 0:
        return _rate_share(recent, signal.burn_rate_per_hour, now_s)
    whole = before / signal.spent
    if whole >= 1 - 1e-9:
        return 1.0  # the only spender the worker knows of
    return min(1.0, max(MIN_SHARE, whole, _recent_share(previous, before, signal.spent)))


def _recent_share(previous: Tally | None, before: float, spent: float) -> float:
    """Own use between the previous signal's `issued_at` and this one's, over the key's (0: unknown)."""
    if previous is None or previous.before is None or spent <= previous.spent:
        return 0.0  # no earlier figure, or a new window in between
    return max(0.0, before - previous.before) / (spent - previous.spent)


def _own_before(recent: OwnUse | None, signal: Signal) -> float | None:
    """This process's own use in the signal's window up to `issued_at` (the span of its `spent`).

    Only when the process began to track the key inside the signal's window (its total is then all
    in the window) and remembers every call since `issued_at` (to take them off the total); None
    otherwise. Calls of this process the worker had not counted yet at `issued_at` are in it and
    not in `spent`: the share comes out a little high, own use is scaled a little less, an
    undercount (the signal that follows corrects it), never an early refusal.
    """
    if recent is None or recent.started_s < signal.window_start.timestamp():
        return None
    issued_s = signal.issued_at.timestamp()
    if recent.calls and issued_s < recent.calls[0][0]:
        return None  # calls since `issued_at` may have left the minute remembered
    return recent.total - recent.since(issued_s)


def _rate_share(recent: OwnUse | None, burn_rate_per_hour: float, now_s: float) -> float:
    """This process's part of a key's recent burn rate; 1 without own recent use to compare."""
    own = recent.since(now_s - RECENT_S) if recent is not None else 0.0
    per_minute = burn_rate_per_hour / 60
    if own <= 0 or per_minute <= 0:
        return 1.0
    return min(1.0, max(MIN_SHARE, own / per_minute))
