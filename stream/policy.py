"""Where a signal is decided: from a budget window's spend to a `Signal`.

Pure functions of the budget, the window's totals and the clock, so the rules
are tested without Kafka and every worker decides the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from burnguard.contracts.budgets import SEVERITY, Action, Budget, ContextGuard
from burnguard.contracts.signals import SIGNAL_VERSION, Signal
from burnguard.contracts.windows import ROLLING_BUCKETS
from burnguard.stream.accounting import (
    MIX_CALLS,
    MIX_ESCALATION_USD,
    MIX_FALLBACKS,
    MIX_REFUSED,
    NS_PER_MINUTE,
    RECENT_MINUTES,
    ContextGrowth,
    WindowTotals,
    window_lengths,
    window_span,
)

_NS = 1_000_000_000
#: The burn rate is measured over at least this long, so the first span of a
#: window does not extrapolate to an absurd rate.
_MIN_RATE_SPAN = timedelta(minutes=1)
_MIN_RATE_NS = 60 * _NS
_MIN_RATE_HOURS = _MIN_RATE_SPAN.total_seconds() / 3600
#: The burn rate's look-back (`RECENT_MINUTES`) in ns.
_RECENT_NS = RECENT_MINUTES * 60 * _NS


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / _NS, UTC)


#: The clock `_now_ns` turned into ns last, and its ns (the datetime held: its id is not reused).
_last_clock: tuple[datetime | None, int] = (None, 0)


def _now_ns(now: datetime) -> int:
    """`int(now.timestamp() * _NS)`, kept for the last `now` object.

    Stage 2 decides every row of a record against one `now` (`BudgetJob._account_rows`), and an
    aware datetime's `timestamp()` is ~0.5 us of a signal: the same object gives the same ns.
    """
    global _last_clock
    last, ns = _last_clock
    if now is not last:
        ns = int(now.timestamp() * _NS)
        _last_clock = (now, ns)
    return ns


def burn_rate_per_hour(totals: WindowTotals, now: datetime) -> float:
    """Spend per hour over the last `RECENT_MINUTES` (or since the window's first span, if later).

    Looking at recent minutes only makes the rate, and so the forecast, follow
    a burst as it happens instead of averaging it away over the whole window.
    """
    if not totals.spans:
        return 0.0
    return _burn_rate(totals, int(now.timestamp() * _NS))


def _burn_rate(totals: WindowTotals, now_ns: int) -> float:
    """`burn_rate_per_hour` of totals with spans, at `now_ns` (`now` as the callers turn it into ns)."""
    since_ns = max(now_ns - _RECENT_NS, totals.first_event_ns)
    return totals.recent.total(since_ns // NS_PER_MINUTE) / _rate_hours(now_ns - since_ns)  # `recent_spend`


def _rate_hours(elapsed_ns: int) -> float:
    """`max(timedelta(seconds=elapsed_ns / 1e9), _MIN_RATE_SPAN).total_seconds() / 3600` without the
    two timedeltas (~0.9 us of a signal's burn rate): the same float.

    `timedelta` keeps whole microseconds: the float's whole seconds, then its fraction times 1e6
    (one float product) rounded half to even (CPython's `accum` and `delta_new`: the parity is
    the total's, and a million whole-second microseconds are even). `total_seconds` divides the
    microseconds by 10**6 as ints (correctly rounded). Up to a minute (or negative: events ahead
    of the clock) the rounded span is at most a minute: the minimum decides.
    `tests/test_policy.py` holds the two equal.
    """
    if elapsed_ns <= _MIN_RATE_NS:
        return _MIN_RATE_HOURS
    seconds = elapsed_ns / _NS
    whole = int(seconds)
    return (whole * 1_000_000 + round((seconds - whole) * 1e6)) / 1_000_000 / 3600


#: Projections further out than this are "not in sight" (and would overflow `datetime`).
_HORIZON = timedelta(days=3660)


def projected_exhaustion(
    budget: Budget, spent: float, rate_per_hour: float, now: datetime
) -> datetime | None:
    """When the limit is hit at the current burn rate; None when not within the horizon."""
    if spent >= budget.limit:
        return now
    if rate_per_hour <= 0:
        return None
    hours = (budget.limit - spent) / rate_per_hour
    if hours * 3600 > _HORIZON.total_seconds():
        return None
    return now + timedelta(hours=hours)


def signal_for_window(
    budget: Budget,
    key: str,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    ttl: timedelta,
) -> Signal:
    """The signal for one budget key in one window as of `now`.

    `window_at` and `burn_rate_per_hour`, with the budget's `_Windows` looked up and `now` turned
    into ns once: each did both again.
    """
    decided = _decide(budget, window_start_ns, totals, now)
    return _signal_of(budget, key, window_start_ns, totals, now, ttl, decided)


#: What `_decide` works out: the budget's `_Windows`, `now` in ns (a rolling window's; None for a
#: calendar or session window, whose action needs no clock in ns), the window's spend, its ratio to
#: the limit, whether the window is open and the rung reached (None: none, or the window is closed).
_Decided = tuple["_Windows", int | None, float, float, bool, Action | None]


def _decide(budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime) -> _Decided:
    """The decision both the action and the signal start from (`window_at`'s spend, the rung reached).

    A row that changes a key's action was decided twice: `decide_action_fully` for the action,
    then `signal_for_window` again in full for its signal. `changed_signal` now hands this one
    decision to the signal (`_signal_of`). A rolling window is open (its end is `now` plus its
    length) and its bounds, two datetimes, are made only for a signal.
    """
    windows, now_ns = _windows_of(budget), None
    if windows.rolling:
        now_ns = _now_ns(now)
        spent, open_ = totals.rolling_spent(now_ns, windows.rolling, windows.bucket_ns), True
    else:  # a calendar or session window, its end looked up once per window
        spent, open_ = totals.spent, now < windows.end(window_start_ns)
    ratio = spent / budget.limit
    return windows, now_ns, spent, ratio, open_, budget.action_for(ratio) if open_ else None


def _signal_of(
    budget: Budget,
    key: str,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    ttl: timedelta,
    decided: _Decided,
) -> Signal:
    """`signal_for_window` from its decision (`_decide` of the same budget, window, totals and clock)."""
    windows, now_ns, spent, ratio, _, rung = decided
    if now_ns is None:
        now_ns = _now_ns(now)
    rolling = windows.rolling
    if rolling:
        start = _from_ns(now_ns - rolling)
        end = _rolling_reset(budget, totals, now, rung.at if rung is not None else None)
    else:
        start, end = windows.span(window_start_ns)
    action = rung.do if rung is not None else "ok"
    rate = _burn_rate(totals, now_ns) if totals.spans else 0.0
    exhaustion = projected_exhaustion(budget, spent, rate, now)
    if exhaustion is not None and exhaustion >= end:
        exhaustion = None  # the window ends first
    downgrade_to = rung.to if rung is not None and rung.do == "downgrade" else None
    # most budgets do not forecast: the call and its five other arguments only for those that do
    predicted = budget.forecast.downgrade and _predicts_downgrade(budget, ratio, action, exhaustion, now, end)
    if predicted:
        action, downgrade_to = "downgrade", budget.downgrade_class
    calendar_start = None if rolling else window_start_ns
    reason = _reason(budget, key, spent, ratio, start, end, action, calendar_start, windows)
    if predicted:
        reason += f" (predictive: limit projected at {exhaustion:%Y-%m-%dT%H:%M:%SZ})"
    if totals.mix:
        reason += call_mix_reason(totals.mix)
    # Every value but the key and the numbers is of a type validation keeps: `of_fields` checks those.
    return Signal.of_fields(
        {
            "v": SIGNAL_VERSION,
            "scope": budget.scope_name,
            "key": key,
            "budget": budget.id,
            "action": action,
            "downgrade_to": downgrade_to,
            "metric": budget.metric,
            "spent": round(spent, 9),
            "limit": budget.limit,
            "ratio": round(ratio, 6),
            "window_start": start,
            "window_end": end,
            "burn_rate_per_hour": round(rate, 9),
            "projected_exhaustion": exhaustion,
            "issued_at": now,
            "expires_at": now + ttl,
            "reason": reason,
        }
    )


def changed_signal(
    budget: Budget,
    key: str,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    previous: Mapping[str, Any] | None,
    ttl: timedelta,
    refresh: bool = False,
) -> Signal | None:
    """The signal to publish for a key whose last published state is `previous`, or None.

    `previous` is `{"action", "window_start_ns"}` (None: nothing published, i.e.
    ok). A `Signal` (a pydantic model with a formatted reason) is only built when
    the action differs from the last published one, or to refresh a restriction;
    the window's kept answer (`decide_action`) settles most other deltas. The worker
    (stage 2) and `burnguard budgets simulate` both decide through this function.

    Decided once: where the kept answer does not hold, the decision that gives the action
    (`_decide`, as `decide_action_fully` makes it) is the one the signal is built from.
    """
    if previous and previous["window_start_ns"] > window_start_ns:
        return None  # a late span for an older window: counted, but the current window rules
    previous_action = previous["action"] if previous else "ok"
    kept = None if refresh else _kept_action(budget, window_start_ns, totals, now)
    if kept == previous_action:
        return None
    decided = _decide(budget, window_start_ns, totals, now)
    if kept is None and not refresh:  # `decide_action_fully` from this decision
        signal = _action_or_signal(budget, window_start_ns, totals, now, decided, key, ttl)
        if type(signal) is str:
            if signal == previous_action:
                return None
            signal = _signal_of(budget, key, window_start_ns, totals, now, ttl, decided)
    else:
        signal = _signal_of(budget, key, window_start_ns, totals, now, ttl, decided)
    if signal.action == previous_action and not (refresh and signal.action != "ok"):
        return None
    return signal


def window_at(
    budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime
) -> tuple[float, datetime, datetime]:
    """(spent, start, end) of the window as of `now`: fixed for calendar windows, moving for rolling ones."""
    now_ns = int(now.timestamp() * _NS)
    start, end = window_bounds(budget, window_start_ns, now_ns)
    return window_spent(budget, window_start_ns, totals, now_ns), start, end


def window_spent(budget: Budget, window_start_ns: int, totals: WindowTotals, now_ns: int) -> float:
    """`window_at`'s spend alone: the snapshot timer takes the bounds once per budget and start."""
    windows = _windows_of(budget)
    if not windows.rolling:
        return totals.spent
    return totals.rolling_spent(now_ns, windows.rolling, windows.bucket_ns)


def window_bounds(budget: Budget, window_start_ns: int, now_ns: int) -> tuple[datetime, datetime]:
    """`window_at`'s (start, end): the same for every key of a budget with this start (a rolling
    window's moves with `now_ns` alone)."""
    windows = _windows_of(budget)
    if not windows.rolling:
        return windows.span(window_start_ns)
    return _from_ns(now_ns - windows.rolling), _from_ns(now_ns + windows.rolling)


def decide_action(budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime) -> str:
    """The action `decide` returns, without building the signal.

    Stage 2 asks this for every delta and builds a `Signal` only when the
    answer differs from the last published one, which is rare: comparing a
    ratio with the rungs is all most deltas need. Most rows do not even need
    that: a window keeps where its last answer holds (`totals.settled`); a
    calendar or session window the range of spend ratios and its end
    (`_Windows.settled`), a rolling window the stretch of clock over which its
    counted buckets stay the same and the spend it may grow to
    (`_rolling_settled`). Within them the answer is the same.
    """
    kept = _kept_action(budget, window_start_ns, totals, now)
    return kept if kept is not None else decide_action_fully(budget, window_start_ns, totals, now)


def _kept_action(budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime) -> str | None:
    """The window's kept answer (`totals.settled`) where it holds for this budget, spend and clock;
    else None."""
    settled = totals.settled
    if settled is None:
        return None
    if len(settled) == CALENDAR_SETTLED:
        held_for, start_ns, end, low, high, action = settled
        if (
            held_for is budget
            and start_ns == window_start_ns
            and now < end
            and low <= totals.spent / budget.limit < high
        ):
            return action
    else:
        held_for, since, until, buckets, newest, cap, action = settled
        if (
            held_for is budget
            and since <= now < until
            and totals.buckets is buckets
            and buckets.newest == newest
            and totals.spent < cap
        ):
            return action
    return None


def decide_new_window(budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime) -> str:
    """`decide_action` of a window's empty totals (`WindowTotals()`, not yet in the table), with the
    kept answer it leaves: stage 2 asks it for every window a key's first row opens
    (`BudgetJob._new_window`), one per agent session and session budget.

    Every empty window of a budget with one start has no spend: the kept answer the last one
    left (a calendar or session window's, `_Windows.empty`) is this one's where it still holds
    (`_kept_action`: the same budget, start and rung range, before the window's end), and is the
    tuple `decide_action_fully` would keep (`_Windows.settled` of the same ratio, 0). Else the
    window is decided in full. Deciding each in full was ~4% of stage 2 (BENCHMARKS.md, hSig).
    """
    windows = _windows_of(budget)
    kept = windows.empty.get(window_start_ns)
    if kept is not None:
        totals.settled = kept
        action = _kept_action(budget, window_start_ns, totals, now)
        if action is not None:
            return action
        totals.settled = None
    action = decide_action_fully(budget, window_start_ns, totals, now)
    settled = totals.settled
    if settled is not None and len(settled) == CALENDAR_SETTLED:
        if len(windows.empty) >= _WINDOW_ENDS_KEPT:
            windows.empty.clear()
        windows.empty[window_start_ns] = settled
    return action


def decide_action_fully(budget: Budget, window_start_ns: int, totals: WindowTotals, now: datetime) -> str:
    """`decide_action` worked out from the budget, the totals and the clock (the reference: tests
    hold `decide_action` to it); where the answer holds is kept in `totals.settled`, unless a
    predictive downgrade may decide."""
    decided = _decide(budget, window_start_ns, totals, now)
    action = _action_or_signal(budget, window_start_ns, totals, now, decided, "", timedelta(0))
    return action if type(action) is str else action.action


def _action_or_signal(
    budget: Budget,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    decided: _Decided,
    key: str,
    ttl: timedelta,
) -> str | Signal:
    """`decide_action_fully` from its decision: the action, with where it holds kept in
    `totals.settled`; or, where a predictive downgrade may decide (it needs the burn rate), the
    signal itself (for `key`, `ttl`), whose action it is: `changed_signal` publishes that one."""
    windows, now_ns, spent, ratio, open_, rung = decided
    action = rung.do if rung is not None else "ok"
    if open_ and _may_predict(budget, ratio, action):
        return _signal_of(budget, key, window_start_ns, totals, now, ttl, decided)
    if windows.rolling:
        totals.settled = _rolling_settled(windows, totals, now, now_ns, spent, ratio, action)
    elif open_:
        totals.settled = windows.settled(window_start_ns, ratio, action)
    return action


#: The lengths of a calendar or session window's `settled` tuple and of a rolling window's (stage 2's
#: native rows read both: contracts/native/src/totals.rs).
CALENDAR_SETTLED = 6
ROLLING_SETTLED = 7
#: A rolling window's kept answer stops this long before its oldest counted bucket changes (ns),
#: and leaves this share of the limit unused below the next rung: room for the clock's and the
#: sums' float rounding (see `_rolling_settled`).
_CLOCK_ROOM_NS = 1_000_000
_SPEND_ROOM = 1e-6


def _rolling_settled(
    windows: _Windows,
    totals: WindowTotals,
    now: datetime,
    now_ns: int,
    spent: float,
    ratio: float,
    action: str,
) -> tuple[Any, ...] | None:
    """(budget, since, until, buckets, newest, cap, action): `action` is what `decide_action` gives
    for this rolling window while `since <= now < until`, its ring is the same with the same
    newest bucket, and `totals.spent < cap`. None when the window has no ring yet, or no room.

    Over that stretch of clock the oldest counted bucket is the same (`now` maps to ns
    monotonically; `until` is checked to map below the next bucket's start). With the newest
    bucket unchanged nothing left the ring, so each counted bucket only grew by what was added
    (amounts are >= 0, as everywhere in stage 2; a float sum is monotone in each term): the spend
    is at least `spent`, the rung at least the one reached. `totals.spent` grows by the same
    amounts (nothing was evicted from it), so the counted spend stays below the next rung (or a
    forecast's `min_ratio` below a downgrade) while `totals.spent` stays below `cap`: the room
    left, less `_SPEND_ROOM` of the limit and of the spend for the sums' rounding.
    """
    buckets = totals.buckets
    if buckets is None:
        return None
    budget, bucket_ns = windows.budget, windows.bucket_ns
    _, _, high = windows.rung_range(ratio, action)
    until = windows.until(((now_ns - windows.rolling) // bucket_ns + 1) * bucket_ns + windows.rolling)
    if until is None:
        return None
    if high == math.inf:
        cap = math.inf
    else:
        room = high * budget.limit - spent - _SPEND_ROOM * (high * budget.limit + abs(totals.spent))
        if not room > 0:
            return None
        cap = totals.spent + room
    return (budget, now, until, buckets, buckets.newest, cap, action)


#: Relative room left for float rounding between a row's summed amount and the spend after each of
#: its steps (at most a few hundred additions: ~1e-13 relative), on both sides of a rung.
_ROUNDING_ROOM = 1e-9


def settles_alike(
    budget: Budget,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    action: str,
    added: float,
    last_events_ns: Iterable[int] = (),
    bucket_ns: int | None = None,
) -> bool:
    """Whether `decide_action` gives `action` after each of a combined row's steps, added in turn.

    The steps add `added` in all (each amount >= 0; `last_events_ns`: each step's last event,
    rolling windows only). The spend then only grows from the current one to at most the sum
    (a float sum is monotone in each term), and `Budget.action_for`'s rung only moves up the
    ladder as the ratio grows: the same rung at both ends (with `_ROUNDING_ROOM` each way) is the
    same rung after every step. A predictive downgrade depends on the burn rate, not only on the
    spend: it must be out of reach at the upper end. A rolling window's spend at `now` only grows
    too while no step's bucket, nor the newest one kept, lies past the ring's reach from the
    window's first counted bucket (else a step would push counted buckets out of the ring).
    `bucket_ns`: the rows' bucket size; other than the budget's (its window changed while they
    were in flight), a step may push spend out of a ring the budget does not measure: no.
    False means: decide after each step (the caller walks them).
    """
    settling = _settling(budget, window_start_ns, totals, now, action, bucket_ns)
    return settling is not None and settling.holds(added, last_events_ns)


def settling_steps(
    budget: Budget,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    action: str,
    steps: Iterable[tuple[float, int]],
    bucket_ns: int | None = None,
) -> int:
    """How many of a combined row's steps (each's amount and last event), from the first, settle
    alike: the longest run of them for which `settles_alike` holds.

    It holds for every shorter run if it holds for a run (less is added, fewer buckets reached;
    the rung only moves up as the sum grows), so the first step for which it fails ends the run.
    That step may change the action: the caller decides after it alone, then asks again from
    the next step with the action published then.
    """
    settling = _settling(budget, window_start_ns, totals, now, action, bucket_ns)
    if settling is None:
        return 0
    added, settled = 0.0, 0
    for amount, last_ns in steps:
        added += amount  # as the caller sums a whole run for `settles_alike`
        if not settling.holds(added, (last_ns,)):
            break
        settled += 1
    return settled


class _Settling(NamedTuple):
    """What `settles_alike` checks of steps added to a window as it is now (`_settling`): the steps
    settle alike while `holds` for their sum and each one's last event."""

    budget: Budget
    action: str
    #: the counted spend now; None: a closed calendar window, which decides `ok` whatever is added
    spent: float | None
    #: the rung at the spend now (less the rounding room), whose action is `action`
    low: Action | None
    #: a rolling window's first bucket past the ring's reach (None: a calendar or session window)
    reach: int | None
    bucket_ns: int

    def holds(self, added: float, last_events_ns: Iterable[int]) -> bool:
        """Whether steps adding `added` in all, ending at `last_events_ns`, leave `action` decided."""
        if self.spent is None:
            return True
        reach, bucket_ns = self.reach, self.bucket_ns
        if reach is not None and any(last_ns // bucket_ns >= reach for last_ns in last_events_ns):
            return False
        budget = self.budget
        high_ratio = (self.spent + added) * (1 + _ROUNDING_ROOM) / budget.limit
        return budget.action_for(high_ratio) is self.low and not _may_predict(budget, high_ratio, self.action)


def _settling(
    budget: Budget,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    action: str,
    bucket_ns: int | None,
) -> _Settling | None:
    """`settles_alike`'s checks of the window itself, whatever the steps; None where no step settles
    alike (the rows' bucket size not the budget's, the ring's newest bucket out of reach, the
    published action not the one decided now, or within rounding of it)."""
    windows = _windows_of(budget)
    if bucket_ns is not None and bucket_ns != windows.bucket_ns:
        return None
    reach = None
    if windows.rolling:
        now_ns, bucket_ns = int(now.timestamp() * _NS), windows.bucket_ns
        first = (now_ns - windows.rolling) // bucket_ns
        buckets = totals.buckets
        reach = first + (len(buckets.amounts) if buckets is not None else ROLLING_BUCKETS + 1)
        if buckets is not None and buckets.newest >= reach:
            return None
        spent = totals.rolling_spent(now_ns, windows.rolling, bucket_ns)
    elif now < windows.end(window_start_ns):
        spent = totals.spent
    elif action == "ok":  # a closed calendar window decides `ok` whatever is added
        return _Settling(budget, action, None, None, None, 0)
    else:
        return None
    low = budget.action_for(spent * (1 - _ROUNDING_ROOM) / budget.limit)
    if (low.do if low is not None else "ok") != action:
        return None
    return _Settling(budget, action, spent, low, reach, windows.bucket_ns)


class _Windows:
    """What `decide_action` needs of a budget's window, worked out once per budget (and window).

    Stage 2 decides for every delta row; `window_at` hashed the budget's `Window` (a dataclass,
    hashed in Python) twice per row to find the same few window ends in its caches, and built
    two datetimes per row of a rolling window.
    """

    __slots__ = (
        "_settled",
        "_span_texts",
        "_spans",
        "_texts",
        "_until",
        "bucket_ns",
        "budget",
        "empty",
        "rolling",
        "window",
    )

    def __init__(self, budget: Budget) -> None:
        self.budget = budget  # held, so its id is not reused while this entry lives
        self.window = budget.window_spec
        #: a rolling window's length in ns (0: a calendar or session window) and its bucket size
        self.rolling, self.bucket_ns = window_lengths(self.window)
        self._spans: dict[int, tuple[datetime, datetime]] = {}
        self._texts: tuple[str, str] | None = None
        #: window start -> ((start, end), their part of a reason): `span_text`
        self._span_texts: dict[int, tuple[tuple[datetime, datetime], str]] = {}
        #: (window start, the rung's position) -> what `settled` gives, one tuple shared by every key
        self._settled: dict[tuple[int, int], tuple[Budget, int, datetime, float, float, str]] = {}
        #: a rolling window's last `until`: (the next bucket's start in ns, the bound or None)
        self._until: tuple[int, datetime | None] = (0, None)
        #: window start -> the kept answer an empty calendar or session window left (`decide_new_window`)
        self.empty: dict[int, tuple[Budget, int, datetime, float, float, str]] = {}

    def texts(self) -> tuple[str, str]:
        """The budget's parts of a signal's reason (`_reason`): before the key, and around the limit."""
        if self._texts is None:
            budget = self.budget
            self._texts = (f"budget {budget.id} ({budget.scope_name}=", f" of {budget.limit:g} (")
        return self._texts

    def bounds_text(self, start: datetime, end: datetime) -> str:
        """A reason's part from the window's spec to the action, for these bounds."""
        return f") in window {self.budget.window} {start.isoformat()}..{end.isoformat()} -> "

    def span_text(self, window_start_ns: int, start: datetime, end: datetime) -> str:
        """`bounds_text` of a calendar or session window starting at `window_start_ns`, kept per start.

        Kept with the bounds it was made of and used only for the same objects (`span` hands out
        the same ones per start; equal datetimes in other zones would write other text).
        """
        kept = self._span_texts.get(window_start_ns)
        if kept is not None and kept[0][0] is start and kept[0][1] is end:
            return kept[1]
        if len(self._span_texts) >= _WINDOW_ENDS_KEPT:
            self._span_texts.clear()
        text = self.bounds_text(start, end)
        self._span_texts[window_start_ns] = ((start, end), text)
        return text

    def rung_range(self, ratio: float, action: str) -> tuple[int, float, float]:
        """(position, low, high): `action`, decided at `ratio` without a prediction, is what the
        budget's ladder gives at any ratio in [low, high) (position: the rung's, -1 below all).

        `Budget.action_for` picks the last rung whose `at` is at most the ratio (the rungs ascend):
        the same rung for every ratio from its `at` up to, not including, the next rung's. Below a
        downgrade, a budget that predicts may downgrade from its forecast's `min_ratio` on, so the
        range ends there too. A NaN ratio lies in no range.
        """
        low, high, position = -math.inf, math.inf, -1
        for rung in self.budget.actions:
            if not ratio >= rung.at:
                high = rung.at
                break
            low, position = rung.at, position + 1
        forecast = self.budget.forecast
        if forecast.downgrade and SEVERITY[action] < SEVERITY["downgrade"]:
            high = min(high, forecast.min_ratio)
        return position, low, high

    def settled(
        self, window_start_ns: int, ratio: float, action: str
    ) -> tuple[Budget, int, datetime, float, float, str]:
        """(budget, window start, end, low, high, action): `action` is what `decide_action` gives
        for this open calendar or session window at any spend ratio in [low, high) (`rung_range`)
        before `end`. The tuple is the same object for every key of the window at that rung.
        """
        position, low, high = self.rung_range(ratio, action)
        settled = self._settled.get((window_start_ns, position))
        if settled is None or settled[3:] != (low, high, action):
            if len(self._settled) >= _WINDOW_ENDS_KEPT:
                self._settled.clear()
            end = self.end(window_start_ns)
            settled = self._settled[(window_start_ns, position)] = (
                self.budget, window_start_ns, end, low, high, action
            )  # fmt: skip
        return settled

    def until(self, next_first_ns: int) -> datetime | None:
        """The clock before which a rolling window's oldest counted bucket is the one before
        `next_first_ns` (`_CLOCK_ROOM_NS` early, checked to map below it as `now` maps to ns);
        None if it does not. Kept for the latest bucket: every key's kept answer shares it."""
        known, until = self._until
        if known != next_first_ns:
            until = _from_ns(next_first_ns - _CLOCK_ROOM_NS)
            if not int(until.timestamp() * _NS) < next_first_ns:
                until = None
            self._until = (next_first_ns, until)
        return until

    def end(self, window_start_ns: int) -> datetime:
        """The end of a calendar (or session) window, as `window_at` gives it."""
        return self.span(window_start_ns)[1]

    def span(self, window_start_ns: int) -> tuple[datetime, datetime]:
        """(start, end) of a calendar (or session) window: `window_span`, without hashing the `Window`."""
        span = self._spans.get(window_start_ns)
        if span is None:
            if len(self._spans) >= _WINDOW_ENDS_KEPT:
                self._spans.clear()
            span = self._spans[window_start_ns] = window_span(self.window, window_start_ns)
        return span


#: Budgets (`_WINDOWS_KEPT`) and window ends per budget (`_WINDOW_ENDS_KEPT`) remembered at most.
_WINDOWS_KEPT = 1024
_WINDOW_ENDS_KEPT = 64
#: id(budget) -> its `_Windows`; the entry holds the budget, so an id is never another budget's.
_windows: dict[int, _Windows] = {}


def _windows_of(budget: Budget) -> _Windows:
    windows = _windows.get(id(budget))
    if windows is None or windows.budget is not budget:
        if len(_windows) >= _WINDOWS_KEPT:
            _windows.clear()
        windows = _windows[id(budget)] = _Windows(budget)
    return windows


def _may_predict(budget: Budget, ratio: float, action: str) -> bool:
    """Whether a projection could raise `action` to a predictive downgrade (see `_predicts_downgrade`)."""
    forecast = budget.forecast
    return forecast.downgrade and ratio >= forecast.min_ratio and SEVERITY[action] < SEVERITY["downgrade"]


def _rolling_reset(budget: Budget, totals: WindowTotals, now: datetime, rung_at: float | None) -> datetime:
    """When enough spend has rolled out of the window to fall below the reached rung.

    That is when a restriction of a rolling budget lifts by itself; a signal
    says so in `window_end`, which subscribers treat as its reset time.
    """
    windows = _windows_of(budget)
    rolling_ns, bucket_ns = windows.rolling, windows.bucket_ns
    now_ns = _now_ns(now)
    buckets = totals.rolling_buckets(now_ns, rolling_ns, bucket_ns)
    remaining = sum(amount for _, amount in buckets)
    for index, amount in buckets:
        leaves_at = _from_ns((index + 1) * bucket_ns + rolling_ns)
        remaining -= amount
        if rung_at is None or remaining / budget.limit < rung_at:
            return max(leaves_at, now + timedelta(seconds=1))
    return now + timedelta(seconds=1)


def _predicts_downgrade(
    budget: Budget, ratio: float, action: str, exhaustion: datetime | None, now: datetime, end: datetime
) -> bool:
    """A budget that asks for it downgrades as soon as the limit is projected inside the window."""
    forecast = budget.forecast
    return (
        forecast.downgrade
        and exhaustion is not None
        and now < end
        and ratio >= forecast.min_ratio
        and SEVERITY[action] < SEVERITY["downgrade"]
    )


def call_mix_reason(mix: list[float] | None) -> str:
    """How the window's model calls went: the share that fell back to cheaper models, what
    escalations cost and how many calls were refused (empty when the budget counts no calls)."""
    if not mix:
        return ""
    calls, refused = int(mix[MIX_CALLS]), int(mix[MIX_REFUSED])
    escalations = f"escalations cost ${mix[MIX_ESCALATION_USD]:.4f}"
    if calls:  # most: one f-string (the parts and their join cost a signal ~0.4 us)
        fell_back = 100 * mix[MIX_FALLBACKS] / calls
        text = f"; {calls} calls, {fell_back:.1f}% fell back to cheaper models, {escalations}"
    else:
        text = f"; 0 calls, {escalations}"
    return f"{text}, {refused} refused" if refused else text


def _reason(
    budget: Budget,
    key: str,
    spent: float,
    ratio: float,
    start: datetime,
    end: datetime,
    action: str,
    window_start_ns: int | None = None,
    windows: _Windows | None = None,
) -> str:
    """`budget <id> (<scope>=<key>): <metric> <spent> of <limit> (<ratio>) in window <spec>
    <start>..<end> -> <action>`.

    What depends on the budget alone, and on the window for a calendar or session window (whose
    bounds follow from `window_start_ns`; None for a rolling window, whose bounds move with the
    clock), is formatted once (`_Windows.texts`): two `isoformat`s and the budget's parts were
    half of the text's cost, and every signal of a window's keys repeated them. `windows`: the
    budget's, if the caller holds it.
    """
    windows = windows or _windows_of(budget)
    head, limit = windows.texts()
    if window_start_ns is None:
        bounds = windows.bounds_text(start, end)
    else:
        bounds = windows.span_text(window_start_ns, start, end)
    return f"{head}{key}): {budget.metric} {spent:.6g}{limit}{ratio:.0%}{bounds}{action}"


def decide_context(
    guard: ContextGuard, session: str, growth: ContextGrowth, now: datetime, ttl: timedelta
) -> Signal:
    """`warn` while a session's prompts have kept growing past the guard's size."""
    growing = growth.streak >= guard.growth_calls and growth.last_input > guard.max_input_tokens
    return Signal(
        scope="session",
        key=session,
        budget=guard.id,
        action="warn" if growing else "ok",
        metric="input_tokens",
        spent=float(growth.last_input),
        limit=float(guard.max_input_tokens),
        ratio=round(growth.last_input / guard.max_input_tokens, 6),
        window_start=_from_ns(0),
        window_end=datetime(9999, 1, 1, tzinfo=UTC),
        issued_at=now,
        expires_at=now + ttl,
        reason=(
            f"context guard {guard.id} (session={session}): input tokens per call grew over "
            f"{growth.streak} consecutive calls to {growth.last_input} (limit {guard.max_input_tokens}, "
            f"after {guard.growth_calls} growing calls) -> {'warn' if growing else 'ok'}"
        ),
    )
