"""stream/policy.py: from a window's totals to the signal (docs/ARCHITECTURE.md §6, §8)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from burnguard.contracts.budgets import SEVERITY, Budget
from burnguard.contracts.signals import Signal
from burnguard.stream.accounting import UsageDelta, window_lengths, window_span
from burnguard.stream.policy import (
    WindowTotals,
    _predicts_downgrade,
    _rate_hours,
    _reason,
    _rolling_reset,
    burn_rate_per_hour,
    changed_signal,
    decide_action,
    decide_action_fully,
    decide_new_window,
    projected_exhaustion,
    signal_for_window,
    window_at,
)
from hypothesis import given, settings
from hypothesis import strategies as st

NS = 1_000_000_000
TTL = timedelta(minutes=5)
DAY_START = datetime(2025, 5, 14, tzinfo=UTC)
DAY_END = datetime(2025, 5, 15, tzinfo=UTC)
NOW = datetime(2025, 5, 14, 10, 0, tzinfo=UTC)


def ns(at: datetime) -> int:
    return int(at.timestamp()) * NS


def ladder_budget(**fields) -> Budget:
    base = dict(
        id="tenant-daily",
        scope="tenant",
        window="day",
        limit=50,
        actions=[
            {"at": 0.7, "do": "warn"},
            {"at": 0.85, "do": "downgrade", "to": "standard"},
            {"at": 1.0, "do": "throttle"},
        ],
    )
    base.update(fields)
    return Budget(**base)


def totals(spent: float, first: datetime = NOW - timedelta(hours=2), last: datetime = NOW) -> WindowTotals:
    """`spent` spread evenly over one span a minute, each in the middle of its minute, first..last."""
    minutes = max(int((last - first).total_seconds() // 60), 1)
    window = WindowTotals()
    for i in range(minutes):
        at = first + timedelta(minutes=i, seconds=30)
        window.apply(UsageDelta("b", "acme", 0, spent / minutes, 1, ns(at), ns(at)))
    window.spent = spent  # exact, for the thresholds; the per-minute buckets carry the rounding
    return window


@pytest.mark.parametrize(
    ("spent", "action", "downgrade_to"),
    [
        (0.0, "ok", None),
        (34.99, "ok", None),
        (35.0, "warn", None),
        (42.49, "warn", None),
        (42.5, "downgrade", "standard"),
        (49.99, "downgrade", "standard"),
        (50.0, "throttle", None),
        (80.0, "throttle", None),
    ],
)
def test_action_at_each_ratio(spent: float, action: str, downgrade_to: str | None) -> None:
    signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(spent), NOW, TTL)
    assert signal.action == action
    assert signal.downgrade_to == downgrade_to
    assert signal.ratio == pytest.approx(spent / 50)
    assert signal.spent == pytest.approx(spent)
    assert signal.limit == 50.0


def test_signal_identity_and_timing() -> None:
    budget = ladder_budget(scope=["tenant", "feature"], metric="tokens")
    signal = signal_for_window(budget, "acme/summarize", ns(DAY_START), totals(10), NOW, TTL)
    assert (signal.scope, signal.key, signal.budget) == ("tenant+feature", "acme/summarize", "tenant-daily")
    assert signal.metric == "tokens"
    assert signal.kafka_key == "tenant+feature:acme/summarize@tenant-daily"
    assert signal.issued_at == NOW
    assert signal.expires_at == NOW + TTL
    assert "tenant-daily" in signal.reason and "acme/summarize" in signal.reason


def test_downgrade_without_a_target_class_is_one_step() -> None:
    budget = ladder_budget(actions=[{"at": 0.5, "do": "downgrade"}])
    signal = signal_for_window(budget, "acme", ns(DAY_START), totals(30), NOW, TTL)
    assert signal.action == "downgrade"
    assert signal.downgrade_to is None


def test_window_bounds_in_the_budget_time_zone() -> None:
    budget = ladder_budget(timezone="America/New_York")
    start_ns = budget.window_spec.start_ns(ns(datetime(2025, 3, 9, 12, tzinfo=UTC)))
    signal = signal_for_window(budget, "acme", start_ns, totals(1), datetime(2025, 3, 9, 12, tzinfo=UTC), TTL)
    assert signal.window_start == datetime(2025, 3, 9, 5, tzinfo=UTC)
    assert signal.window_end == datetime(2025, 3, 10, 4, tzinfo=UTC)


def rolling(events: list[tuple[datetime, float]], window: str = "1h") -> tuple[Budget, WindowTotals]:
    budget = ladder_budget(window=window)
    state = WindowTotals()
    for at, amount in events:
        delta = UsageDelta("b", "acme", 0, amount, 1, ns(at), ns(at), bucket_ns=budget.window_spec.bucket_ns)
        state.apply(delta)
    return budget, state


def test_a_rolling_window_counts_the_last_hour_whenever_you_look() -> None:
    # 30 USD at 08:30, 15 USD at 09:10: at 09:20 the last hour holds 45 USD; at 09:45 only 15.
    budget, state = rolling([(NOW - timedelta(minutes=90), 30.0), (NOW - timedelta(minutes=50), 15.0)])
    earlier = NOW - timedelta(minutes=40)
    signal = signal_for_window(budget, "acme", 0, state, earlier, TTL)
    assert signal.spent == pytest.approx(45.0) and signal.action == "downgrade"
    now = NOW - timedelta(minutes=15)
    signal = signal_for_window(budget, "acme", 0, state, now, TTL)
    assert signal.spent == pytest.approx(15.0) and signal.action == "ok"
    assert signal.window_start == now - timedelta(hours=1)


def test_a_rolling_throttle_says_when_enough_spend_has_rolled_out() -> None:
    # 30 USD at 09:00 and 25 USD at 09:20 (55 of 50: throttled). The 09:00 bucket leaves at 10:01,
    # leaving 25 USD (50%): below every rung, so the reset is 10:01.
    budget, state = rolling([(NOW - timedelta(minutes=60), 30.0), (NOW - timedelta(minutes=40), 25.0)])
    signal = signal_for_window(budget, "acme", 0, state, NOW - timedelta(minutes=30), TTL)
    assert signal.action == "throttle"
    assert signal.window_end == NOW + timedelta(minutes=1)
    assert signal_for_window(budget, "acme", 0, state, NOW + timedelta(minutes=1), TTL).action == "ok"


def test_rolling_buckets_beyond_the_window_are_dropped() -> None:
    _, state = rolling([(NOW - timedelta(hours=3), 10.0), (NOW, 1.0)])
    assert state.spent == pytest.approx(1.0)
    assert state.buckets is not None and state.buckets.items(0) == [(ns(NOW) // (60 * NS), 1.0)]


def test_burn_rate_and_projected_exhaustion() -> None:
    # 20 USD spent over 2 hours: 10 USD/h; 30 USD left at 10 USD/h -> exhausted in 3 hours.
    signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(20), NOW, TTL)
    assert signal.burn_rate_per_hour == pytest.approx(10.0)
    assert signal.projected_exhaustion == NOW + timedelta(hours=3)


def test_burn_rate_of_a_single_event_uses_the_minimum_span() -> None:
    one = WindowTotals()
    one.apply(UsageDelta("b", "acme", 0, 0.5, 1, ns(NOW), ns(NOW)))
    # Measured over at least one minute: 0.5 USD/min = 30 USD/h.
    assert burn_rate_per_hour(one, NOW) == pytest.approx(30.0)
    assert burn_rate_per_hour(WindowTotals(), NOW) == 0.0


def test_burn_rate_follows_the_last_minutes_not_the_window_average() -> None:
    # 10 USD spread over two quiet hours, then 10 USD in the last five minutes.
    window = totals(10)
    for minute in range(5):
        at = NOW - timedelta(minutes=minute, seconds=30)
        window.apply(UsageDelta("b", "acme", 0, 2.0, 1, ns(at), ns(at)))
    # The last 15 minutes hold 15 * 10/120 + 10 = 11.25 USD: 45 USD/h, not the 20/2h = 10 USD/h average.
    assert burn_rate_per_hour(window, NOW) == pytest.approx(45.0)


def test_a_steep_burn_downgrades_before_the_fixed_threshold_when_asked_to() -> None:
    # 20 of 50 USD spent (40%, below the 70% warn rung), but at 45 USD/h the rest lasts 40 minutes.
    window = totals(8.75)
    for minute in range(5):
        at = NOW - timedelta(minutes=minute, seconds=30)
        window.apply(UsageDelta("b", "acme", 0, 2.25, 1, ns(at), ns(at)))
    assert window.spent == pytest.approx(20.0)
    plain = signal_for_window(ladder_budget(), "acme", ns(DAY_START), window, NOW, TTL)
    assert plain.action == "ok" and plain.projected_exhaustion is not None
    predictive = ladder_budget(forecast={"downgrade": True, "min_ratio": 0.25})
    signal = signal_for_window(predictive, "acme", ns(DAY_START), window, NOW, TTL)
    assert signal.action == "downgrade"
    assert signal.downgrade_to == "standard"
    assert "predictive" in signal.reason
    assert signal.projected_exhaustion < NOW + timedelta(hours=1)
    # The same spend at a slow pace is projected after the day ends: no downgrade.
    slow = signal_for_window(
        predictive, "acme", ns(DAY_START), totals(20, first=DAY_START + timedelta(minutes=1)), NOW, TTL
    )
    assert slow.action == "ok" and slow.projected_exhaustion is None


def test_no_projection_without_spend() -> None:
    signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), WindowTotals(), NOW, TTL)
    assert signal.action == "ok"
    assert signal.burn_rate_per_hour == 0.0
    assert signal.projected_exhaustion is None


def test_projection_past_the_window_end_is_dropped() -> None:
    # 1 USD over 2 hours: 49 USD left at 0.5 USD/h is 98 hours away, after the day ends.
    signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(1), NOW, TTL)
    assert signal.burn_rate_per_hour == pytest.approx(0.5)
    assert signal.projected_exhaustion is None
    budget = ladder_budget()
    assert projected_exhaustion(budget, 1.0, 0.5, NOW) == NOW + timedelta(hours=98)


def test_exhausted_budget_projects_now() -> None:
    signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(60), NOW, TTL)
    assert signal.projected_exhaustion == NOW
    assert projected_exhaustion(ladder_budget(), 50.0, 0.0, NOW) == NOW


def test_ok_after_the_window_end() -> None:
    after = DAY_END + timedelta(seconds=1)
    for spent in (40, 45, 50, 500):
        signal = signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(spent), after, TTL)
        assert signal.action == "ok", spent
        assert signal.downgrade_to is None
        assert signal.window_end == DAY_END
        assert signal.projected_exhaustion is None
    # Exactly at the end the window is over ([start, end) windows).
    assert signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(500), DAY_END, TTL).action == "ok"
    # One microsecond before it is not.
    just_before = DAY_END - timedelta(microseconds=1)
    assert (
        signal_for_window(ladder_budget(), "acme", ns(DAY_START), totals(500), just_before, TTL).action
        == "throttle"
    )


def test_session_window() -> None:
    budget = ladder_budget(id="session-cap", scope="session", window="session", metric="tool_calls", limit=20)
    signal = signal_for_window(budget, "sess-1", budget.window_spec.start_ns(ns(NOW)), totals(20), NOW, TTL)
    assert signal.action == "throttle"
    assert signal.window_end.year == 9999


def test_context_growth_warns_only_after_a_streak_past_the_size() -> None:
    from burnguard.contracts.budgets import ContextGuard
    from burnguard.stream.accounting import ContextGrowth
    from burnguard.stream.policy import decide_context

    guard = ContextGuard(id="long-context", max_input_tokens=1000, growth_calls=3)
    growth = ContextGrowth()
    growth.observe([400, 700, 900], 0, 1)
    assert decide_context(guard, "s1", growth, NOW, TTL).action == "ok"  # growing, but small
    growth.observe([1200], 0, 2)
    signal = decide_context(guard, "s1", growth, NOW, TTL)
    assert signal.action == "warn" and signal.spent == 1200 and "3 consecutive calls" in signal.reason
    assert not growth.observe([5000], 0, 2)  # a replayed message is not observed twice
    growth.observe([800], 0, 3)  # pruned: the streak breaks
    assert decide_context(guard, "s1", growth, NOW, TTL).action == "ok"
    growth.observe([5000, 6000], 0, 4)  # big again, but only two growing calls
    assert decide_context(guard, "s1", growth, NOW, TTL).action == "ok"


@pytest.mark.parametrize(
    "budget",
    [
        ladder_budget(),
        ladder_budget(forecast={"downgrade": True, "min_ratio": 0.25}),
        ladder_budget(window="1h"),
        ladder_budget(window="week", timezone="Asia/Tokyo"),
    ],
    ids=["calendar", "predictive", "rolling", "tokyo-week"],
)
def test_the_cheap_action_is_the_signals_action(budget: Budget) -> None:
    """Stage 2 skips building a signal when `decide_action` says nothing changed: it must never differ."""
    rolling = budget.window != "day" and budget.window != "week"
    start_ns = 0 if rolling else budget.window_spec.start_ns(ns(NOW))
    bucket_ns = budget.window_spec.bucket_ns
    checked = set()
    for spent in (0.0, 5.0, 12.0, 20.0, 34.99, 35.0, 42.5, 49.99, 50.0, 80.0):
        window = WindowTotals()
        for minute in range(10):
            at = NOW - timedelta(minutes=minute * 7, seconds=30)
            window.apply(UsageDelta("b", "acme", 0, spent / 10, 1, ns(at), ns(at), bucket_ns=bucket_ns))
        for now in (NOW, NOW + timedelta(minutes=20), NOW + timedelta(hours=1), NOW + timedelta(days=8)):
            expected = signal_for_window(budget, "acme", start_ns, window, now, TTL).action
            assert decide_action(budget, start_ns, window, now) == expected, (spent, now)
            checked.add(expected)
    assert {"ok", "warn", "throttle"} <= checked


@pytest.mark.parametrize("window", ["day", "month", "session"])
def test_the_cheap_action_is_the_signals_action_in_every_window_a_budget_has(window: str) -> None:
    """`decide_action` keeps each budget's window ends (a bounded number): any window start, old or
    current, and whichever came before, gives the action its signal has."""
    scope = "session" if window == "session" else "tenant"
    budget = ladder_budget(window=window, scope=scope)
    day = timedelta(days=1)
    starts = [budget.window_spec.start_ns(ns(NOW - n * day)) for n in range(100)]
    if window == "session":
        starts = [0]
    checked = set()
    for round_ in range(2):  # the second round finds the ends kept (or re-made after the bound)
        for index, start_ns in enumerate(starts):
            for spent in (index % 60, 40 + round_ * 5 + index % 3, 55 - round_):
                window_totals = WindowTotals(spent=spent)
                for now in (NOW, NOW - (index % 40) * day):
                    expected = signal_for_window(budget, "acme", start_ns, window_totals, now, TTL).action
                    assert decide_action(budget, start_ns, window_totals, now) == expected, (start_ns, now)
                    checked.add(expected)
    assert {"ok", "warn", "throttle"} <= checked


RUNG_ACTIONS = ("warn", "downgrade", "throttle")


@st.composite
def budgets(draw: st.DrawFn) -> Budget:
    """A budget with a random ladder (1-3 rungs, some at or around the limit), window and forecast."""
    ats = sorted(
        draw(st.sets(st.sampled_from([0.25, 0.5, 0.7, 0.8, 0.85, 0.99, 1.0, 1.5]), min_size=1, max_size=3))
    )
    dos = sorted(
        draw(st.lists(st.sampled_from(RUNG_ACTIONS), min_size=len(ats), max_size=len(ats))), key=SEVERITY.get
    )
    window = draw(st.sampled_from(["day", "month", "session", "1h"]))
    return Budget(
        id="b",
        scope="session" if window == "session" else "tenant",
        window=window,
        limit=draw(st.sampled_from([0.05, 1.0, 50.0])),
        actions=[{"at": at, "do": do} for at, do in zip(ats, dos, strict=True)],
        forecast={"downgrade": draw(st.booleans()), "min_ratio": draw(st.sampled_from([0.0, 0.3, 0.9]))},
    )


#: One step of `test_the_kept_action_is_the_action_worked_out_afresh`: an amount added at a minute, as
#: a share of the limit (some land exactly on a rung; None: the spend halved, as a rolling bucket's
#: eviction lowers it), the clock moved by some
#: minutes (back too), and whether the budgets were reloaded (a new `Budget` object, a new ladder).
STEPS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.floats(0.0, 0.3), st.sampled_from([0.0, 0.125, 0.25])),
        st.one_of(st.sampled_from([0, 1, 3]), st.integers(-90, 24 * 60)),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(first=budgets(), reloaded=budgets(), steps=STEPS)
def test_the_kept_action_is_the_action_worked_out_afresh(
    first: Budget, reloaded: Budget, steps: list
) -> None:
    """`decide_action` answers from the range its window kept (`WindowTotals.settled`) where it can:
    after each change of spend, clock or budget, it gives what `decide_action_fully` gives on a
    copy of the totals that kept nothing, for whichever budget decides."""
    budget, totals, now = first, WindowTotals(), NOW
    start_ns = budget.window_spec.start_ns(ns(NOW)) if budget.window != "session" else 0
    for index, (amount, minutes, reload) in enumerate(steps):
        if reload:
            budget = reloaded if budget is first else first
        now += timedelta(minutes=minutes)
        if amount is None:
            if "1h" in (first.window, reloaded.window):  # a rolling spend falls as buckets leave, not so
                continue
            totals.spent /= 2
        else:
            at = ns(now) - 30 * NS
            totals.add(0, index, amount * budget.limit, 1, at, at, budget.window_spec.bucket_ns)
        expected = decide_action_fully(budget, start_ns, WindowTotals.from_state(totals.to_state()), now)
        assert decide_action(budget, start_ns, totals, now) == expected, (index, totals.spent, now)


def test_a_kept_action_is_not_state() -> None:
    """The kept range is not written to the changelog, and is shared by the keys of a calendar
    window at a rung."""
    budget = ladder_budget()
    start_ns = budget.window_spec.start_ns(ns(NOW))
    one, other = WindowTotals(spent=20.0), WindowTotals(spent=21.0)
    assert decide_action(budget, start_ns, one, NOW) == decide_action(budget, start_ns, other, NOW) == "ok"
    assert one.settled is other.settled
    assert one.settled[3:] == (-math.inf, 0.7, "ok")
    assert one.to_state() == WindowTotals(spent=20.0).to_state()


def test_a_rolling_window_keeps_its_answer_while_its_counted_buckets_and_rung_stay() -> None:
    """A rolling window's kept answer holds until its oldest counted bucket changes (the clock),
    its newest bucket moves (buckets may leave), or the spend may reach the next rung; then it is
    worked out afresh."""
    budget = ladder_budget(window="1h")  # 60 s buckets, limit 50, warn at 35
    bucket_ns = budget.window_spec.bucket_ns
    totals = WindowTotals()
    at = ns(NOW) - 10 * NS
    totals.add(0, 1, 30.0, 1, at, at, bucket_ns)
    assert decide_action(budget, 0, totals, NOW) == "ok"
    kept = totals.settled
    assert kept is not None and kept[0] is budget and kept[-1] == "ok"
    totals.add(0, 2, 4.9, 1, at, at, bucket_ns)  # 34.9: still ok, within the kept room
    assert decide_action(budget, 0, totals, NOW + timedelta(seconds=5)) == "ok"
    assert totals.settled is kept
    totals.add(0, 3, 0.1, 1, at, at, bucket_ns)  # 35.0: the warn rung, past the kept room
    assert decide_action(budget, 0, totals, NOW + timedelta(seconds=5)) == "warn"
    assert totals.settled is not kept
    later = NOW + timedelta(minutes=61)  # the bucket left the window: decided afresh
    assert decide_action(budget, 0, totals, later) == decide_action_fully(budget, 0, totals, later) == "ok"


@pytest.mark.parametrize("change", ["oldest bucket leaves", "clock back", "newest bucket moves"])
def test_a_rolling_windows_kept_answer_ends_where_its_counted_buckets_change(change: str) -> None:
    """Spend leaves a rolling window (or comes back into it) without `totals.spent` telling: when the
    clock passes into the next bucket, when it goes back, and when a later bucket (a clock ahead)
    pushes counted buckets out of the ring. The kept answer must not hold there."""
    budget = ladder_budget(window="1h")  # 60 s buckets, limit 50, warn at 35
    bucket_ns = budget.window_spec.bucket_ns
    totals = WindowTotals()
    oldest = (ns(NOW) - 3600 * NS) // bucket_ns * bucket_ns + NS  # the oldest bucket counted at NOW
    totals.add(0, 1, 40.0, 1, oldest, oldest, bucket_ns)
    totals.add(0, 2, 1.0, 1, ns(NOW) - NS, ns(NOW) - NS, bucket_ns)
    now = NOW
    if change == "clock back":
        now = NOW + timedelta(seconds=60)  # the 40 has left: ok
        assert decide_action(budget, 0, totals, now) == "ok"
        now = NOW  # back: counted again
    elif change == "newest bucket moves":
        assert decide_action(budget, 0, totals, now) == "warn"
        ahead = ns(NOW) + 7200 * NS
        totals.add(0, 3, 1.0, 1, ahead, ahead, bucket_ns)  # the ring moves on: the 40 and the 1 drop out
    else:
        assert decide_action(budget, 0, totals, now) == "warn"
        now = NOW + timedelta(seconds=60)
    assert decide_action(budget, 0, totals, now) == decide_action_fully(budget, 0, totals, now)


def test_a_kept_range_runs_from_its_rung_to_the_next_and_ends_with_the_window() -> None:
    """A rung's range starts at its threshold (a ratio exactly on it is that rung's) and ends before
    the next one, or at the forecast's `min_ratio` below a downgrade; past the window's end the
    kept action no longer answers (a closed window decides `ok`)."""
    budget = ladder_budget()
    start_ns = budget.window_spec.start_ns(ns(NOW))
    on_the_rung = WindowTotals(spent=35.0)  # 0.7 of 50
    assert decide_action(budget, start_ns, on_the_rung, NOW) == "warn"
    assert on_the_rung.settled[3:] == (0.7, 0.85, "warn")
    on_the_rung.spent = 34.99  # below the rung again (a rolling eviction lowers spend so)
    assert decide_action(budget, start_ns, on_the_rung, NOW) == "ok"
    assert decide_action(budget, start_ns, on_the_rung, DAY_END) == "ok"
    assert decide_action(budget, start_ns, WindowTotals(spent=40.0), DAY_END - timedelta(seconds=1)) == "warn"
    closed = WindowTotals(spent=40.0)
    assert decide_action(budget, start_ns, closed, NOW) == "warn"
    assert decide_action(budget, start_ns, closed, DAY_END) == "ok"
    assert decide_action(budget, start_ns, closed, NOW) == "warn"
    yesterday = budget.window_spec.start_ns(ns(NOW - timedelta(days=1)))
    assert decide_action(budget, yesterday, closed, NOW) == "ok"  # the same totals asked of another window
    predictive = ladder_budget(forecast={"downgrade": True, "min_ratio": 0.25})
    below = WindowTotals(spent=5.0)
    assert decide_action(predictive, start_ns, below, NOW) == "ok"
    assert below.settled[3:] == (-math.inf, 0.25, "ok")


def reference_reason(
    budget: Budget, key: str, spent: float, ratio: float, start: datetime, end: datetime, action: str
) -> str:
    """The reason's text as written before its parts were kept per budget and window."""
    return (
        f"budget {budget.id} ({budget.scope_name}={key}): {budget.metric} {spent:.6g} of "
        f"{budget.limit:g} ({ratio:.0%}) in window {budget.window} "
        f"{start.isoformat()}..{end.isoformat()} -> {action}"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"scope": ["tenant", "feature"], "metric": "tokens", "limit": 1234567.5},
        {"window": "day", "timezone": "Asia/Tokyo", "limit": 0.06},
        {"window": "1h"},
        {"window": "session", "scope": ["tenant", "session"], "limit": 3e-7},
    ],
)
def test_the_reason_is_the_text_it_always_was_for_every_window_kind(fields: dict) -> None:
    """Kept parts (per budget; per window start for calendar and session windows) give the text the
    whole format gave, for keys and spends in several windows, each window decided twice; and the
    spend, bounds and burn rate are `window_at`'s and `burn_rate_per_hour`'s."""
    budget = ladder_budget(**fields)
    for day in range(3):
        now = NOW + timedelta(days=day, minutes=7 * day)
        start_ns = budget.window_spec.start_ns(ns(now))
        for key, spent in (("acme", 12.345678901), ("globex/ü", 49.9999999), ("acme", 1e20)):
            window = totals(spent, first=now - timedelta(minutes=30), last=now)
            signal = signal_for_window(budget, key, start_ns, window, now, TTL)
            amount, start, end = window_at(budget, start_ns, window, now)
            if budget.window_spec.rolling_ns:
                end = signal.window_end  # the reset time the signal reports
            expected = reference_reason(budget, key, amount, amount / budget.limit, start, end, signal.action)
            assert (signal.spent, signal.window_start) == (round(amount, 9), start)
            assert signal.burn_rate_per_hour == round(burn_rate_per_hour(window, now), 9)
            assert signal.reason.startswith(expected) and signal.reason[len(expected) :] in ("", "; 0 calls")


def test_a_kept_window_text_is_used_only_for_the_bounds_it_was_made_of() -> None:
    """The same instants in another zone are other text: a kept part is not theirs."""
    budget = ladder_budget()
    start_ns = ns(DAY_START)
    _reason(budget, "acme", 1.0, 0.02, DAY_START, DAY_END, "ok", start_ns)
    tokyo = ZoneInfo("Asia/Tokyo")
    start, end = DAY_START.astimezone(tokyo), DAY_END.astimezone(tokyo)
    text = _reason(budget, "acme", 1.0, 0.02, start, end, "ok", start_ns)
    assert text == reference_reason(budget, "acme", 1.0, 0.02, start, end, "ok")


def reference_signal(
    budget: Budget, key: str, window_start_ns: int, totals: WindowTotals, now: datetime, ttl: timedelta
) -> Signal:
    """`signal_for_window` as it was before signals at wire speed (5058cdd): validated `Signal(...)`,
    the reason's whole format and the call mix's parts joined."""
    rolling_ns, bucket_ns = window_lengths(budget.window_spec)
    now_ns = int(now.timestamp() * NS)
    if rolling_ns:
        spent = totals.rolling_spent(now_ns, rolling_ns, bucket_ns)
        start = datetime.fromtimestamp((now_ns - rolling_ns) / NS, UTC)
        end = datetime.fromtimestamp((now_ns + rolling_ns) / NS, UTC)
    else:
        spent, (start, end) = totals.spent, window_span(budget.window_spec, window_start_ns)
    ratio = spent / budget.limit
    rung = budget.action_for(ratio) if now < end else None
    if rolling_ns:
        end = _rolling_reset(budget, totals, now, rung.at if rung is not None else None)
    action = rung.do if rung is not None else "ok"
    rate = burn_rate_per_hour(totals, now)
    exhaustion = projected_exhaustion(budget, spent, rate, now)
    if exhaustion is not None and exhaustion >= end:
        exhaustion = None
    downgrade_to = rung.to if rung is not None and rung.do == "downgrade" else None
    predicted = _predicts_downgrade(budget, ratio, action, exhaustion, now, end)
    if predicted:
        action, downgrade_to = "downgrade", budget.downgrade_class
    mix = ""
    if totals.mix:
        calls, refused = int(totals.mix[0]), int(totals.mix[2])
        parts = [f"{calls} calls"]
        if calls:
            parts.append(f"{100 * totals.mix[1] / calls:.1f}% fell back to cheaper models")
        parts.append(f"escalations cost ${totals.mix[3]:.4f}")
        if refused:
            parts.append(f"{refused} refused")
        mix = "; " + ", ".join(parts)
    return Signal(
        scope=budget.scope_name,
        key=key,
        budget=budget.id,
        action=action,
        downgrade_to=downgrade_to,
        metric=budget.metric,
        spent=round(spent, 9),
        limit=budget.limit,
        ratio=round(ratio, 6),
        window_start=start,
        window_end=end,
        burn_rate_per_hour=round(rate, 9),
        projected_exhaustion=exhaustion,
        issued_at=now,
        expires_at=now + ttl,
        reason=reference_reason(budget, key, spent, ratio, start, end, action)
        + (f" (predictive: limit projected at {exhaustion:%Y-%m-%dT%H:%M:%SZ})" if predicted else "")
        + mix,
    )


#: A step of `test_a_signal_is_the_one_it_always_was`: an amount (a share of the limit; some huge,
#: past where msgspec writes a float as pydantic does), minutes on the clock, a call mix or none.
SIGNAL_STEPS = st.lists(
    st.tuples(
        st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.0, 0.25, 1.0, 1e17, 1e300])),
        st.integers(-30, 300),
        st.none() | st.lists(st.floats(0.0, 40.0) | st.sampled_from([0.0, 1.0]), min_size=4, max_size=4),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(
    budget=budgets(),
    zone=st.sampled_from(["UTC", "Asia/Tokyo", "America/St_Johns"]),
    metric=st.sampled_from(["cost_usd", "tokens", "calls"]),
    key=st.text(max_size=12),
    steps=SIGNAL_STEPS,
)
def test_a_signal_is_the_one_it_always_was(
    budget: Budget, zone: str, metric: str, key: str, steps: list
) -> None:
    """Differential: on random budgets (ladders, windows, zones, forecasts), keys and totals (call
    mixes, spends past 1e16), `signal_for_window` gives the signal the code before signals at wire
    speed gave: equal, the same fields set, field for field in the same order, the same JSON bytes."""
    budget = Budget(**{**budget.model_dump(), "timezone": zone, "metric": metric})
    bucket_ns = budget.window_spec.bucket_ns
    totals, now = WindowTotals(), NOW
    start_ns = budget.window_spec.start_ns(ns(NOW)) if budget.window != "session" else 0
    for index, (share, minutes, mix) in enumerate(steps):
        now += timedelta(minutes=minutes)
        at = ns(now) - 30 * NS
        totals.add(0, index, share * budget.limit, 1, at, at, bucket_ns, mix)
        signal = signal_for_window(budget, key, start_ns, totals, now, TTL)
        expected = reference_signal(budget, key, start_ns, totals, now, TTL)
        assert signal == expected
        assert signal.model_fields_set == expected.model_fields_set
        assert list(signal.__dict__.items()) == list(expected.__dict__.items())
        assert signal.to_json() == expected.to_json()


def reference_changed_signal(
    budget: Budget,
    key: str,
    window_start_ns: int,
    totals: WindowTotals,
    now: datetime,
    previous: dict | None,
    refresh: bool,
) -> Signal | None:
    """`changed_signal` as it was before it decided once (4a3948a), on a copy of the totals: the
    action worked out afresh (`decide_action_fully`, the cheap `decide_action`'s reference), then,
    if it differs (or to refresh), the signal decided again in full (`reference_signal`)."""
    if previous and previous["window_start_ns"] > window_start_ns:
        return None
    previous_action = previous["action"] if previous else "ok"
    fresh = WindowTotals.from_state(totals.to_state())
    if (
        not refresh
        and reference_signal(budget, key, window_start_ns, fresh, now, TTL).action == previous_action
    ):
        return None
    signal = reference_signal(budget, key, window_start_ns, fresh, now, TTL)
    if signal.action == previous_action and not (refresh and signal.action != "ok"):
        return None
    return signal


#: A step of `test_a_change_is_decided_once`: an amount (a share of the limit), minutes on the clock,
#: the key's published state made up (None: as `changed_signal` left it; else "none" or an action,
#: in this window or a later one), and whether it is a refresh.
CHANGE_STEPS = st.lists(
    st.tuples(
        st.one_of(st.floats(0.0, 0.6), st.sampled_from([0.0, 0.25, 1.0])),
        st.one_of(st.sampled_from([0, 1]), st.integers(-30, 300)),
        st.none() | st.tuples(st.sampled_from(["none", *SEVERITY]), st.booleans()),
        st.booleans(),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=400, deadline=None)
@given(budget=budgets(), key=st.text(max_size=8), steps=CHANGE_STEPS)
def test_a_change_is_decided_once(budget: Budget, key: str, steps: list) -> None:
    """Differential: `changed_signal`, which builds a changed key's signal from the decision that
    gave its action (and keeps where that action holds), publishes what deciding twice published:
    the same signal or none, field for field and byte for byte, on random budgets (forecasts
    included), spends, clocks, published states and refreshes; and the answer it keeps
    (`totals.settled`, of a calendar or session window) is the one deciding twice kept."""
    bucket_ns = budget.window_spec.bucket_ns
    totals, now, previous = WindowTotals(), NOW, None
    start_ns = budget.window_spec.start_ns(ns(NOW)) if budget.window != "session" else 0
    for index, (share, minutes, made_up, refresh) in enumerate(steps):
        now += timedelta(minutes=minutes)
        at = ns(now) - 30 * NS
        totals.add(0, index, share * budget.limit, 1, at, at, bucket_ns)
        if made_up is not None:
            action, later = made_up
            previous = None if action == "none" else {"action": action, "window_start_ns": start_ns + later}
        expected = reference_changed_signal(budget, key, start_ns, totals, now, previous, refresh)
        kept = WindowTotals.from_state(totals.to_state())  # what deciding twice left kept
        kept.settled = totals.settled
        if not refresh and not (previous and previous["window_start_ns"] > start_ns):
            decide_action(budget, start_ns, kept, now)
        signal = changed_signal(budget, key, start_ns, totals, now, previous, TTL, refresh)
        assert signal == expected, (index, totals.spent, now, previous, refresh)
        if signal is not None:
            assert list(signal.__dict__.items()) == list(expected.__dict__.items())
            assert signal.model_fields_set == expected.model_fields_set
            assert signal.to_json() == expected.to_json()
            previous = {"action": signal.action, "window_start_ns": start_ns}
        if budget.window != "1h":  # a rolling window's kept answer holds its totals' own ring
            assert totals.settled == kept.settled


@settings(max_examples=3000, deadline=None)
@given(
    elapsed_ns=st.one_of(
        st.integers(-(10**12), 10**13),
        st.integers(59 * NS, 61 * NS),
        st.integers(0, 10**7).map(lambda n: 900 * NS - 5 * 10**6 + n),
        st.integers(60, 10**6).map(lambda s: s * NS + 500),  # half a microsecond over whole seconds
        st.integers(60 * 10**6, 10**10).map(lambda us: us * 1000 + 500),
        # whole seconds and j/128 of one: a fraction whose microseconds end in exactly .5 (ties)
        st.tuples(st.integers(60, 10**6), st.integers(0, 63)).map(
            lambda t: t[0] * NS + (2 * t[1] + 1) * 7_812_500
        ),
    )
)
def test_the_rate_span_is_the_timedeltas_it_always_was(elapsed_ns: int) -> None:
    """`_rate_hours` is the hours of `max(timedelta(seconds=elapsed / 1e9), 1 minute)` (the burn rate's
    span as it was computed), float for float: below, at and past the minimum, at half microseconds."""
    observed = timedelta(seconds=elapsed_ns / NS)
    assert _rate_hours(elapsed_ns) == max(observed, timedelta(minutes=1)).total_seconds() / 3600


#: A step of `test_a_new_windows_kept_answer_is_the_one_worked_out_afresh`: minutes on the clock
#: (back too, and past a day's end), which window start (the clock's day, the day before: closed,
#: the day after: not begun), and whether the budgets were reloaded (a new `Budget` object).
NEW_WINDOW_STEPS = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([0, 1]), st.integers(-26 * 60, 26 * 60)),
        st.sampled_from([0, -1, 1]),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(first=budgets(), reloaded=budgets(), steps=NEW_WINDOW_STEPS)
def test_a_new_windows_kept_answer_is_the_one_worked_out_afresh(
    first: Budget, reloaded: Budget, steps: list
) -> None:
    """`decide_new_window` (stage 2's window opened by a key's first row) gives an empty window the
    action and the kept answer (`settled`) `decide_action_fully` gives it, whatever window it was
    asked about before: the same budget's windows one after another (each empty window of a start
    reuses the last one's kept answer), closed ones, ones not begun, across reloaded budgets and
    forecasts that may predict at no spend."""
    budget, now = first, NOW
    for minutes, day, reload in steps:
        if reload:
            budget = reloaded if budget is first else first
        now += timedelta(minutes=minutes)
        if budget.window in ("session", "1h"):
            start_ns = 0
        else:
            start_ns = budget.window_spec.start_ns(ns(now + timedelta(days=day)))
        totals, fresh = WindowTotals(), WindowTotals()
        expected = decide_action_fully(budget, start_ns, fresh, now)
        assert decide_new_window(budget, start_ns, totals, now) == expected, (now, start_ns)
        assert totals.settled == fresh.settled, (now, start_ns)
