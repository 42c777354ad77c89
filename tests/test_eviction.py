"""When the worker forgets state (`stream/eviction.py`): calendar windows after the lateness, idle
sessions, emptied rolling windows; and the records and table values eviction added."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from burnguard.contracts.budgets import Budget
from burnguard.stream.accounting import ContextGrowth, WindowTotals
from burnguard.stream.eviction import Lifetimes, horizon_key, is_window_key, last_event_ns, split_window_key
from burnguard.stream.records import SWEEP, SweepRecord, record_version

S = 1_000_000_000
LIFETIMES = Lifetimes.of(timedelta(hours=1), timedelta(minutes=10))
DAY0 = datetime(2026, 3, 2, tzinfo=UTC)
DAY0_NS = int(DAY0.timestamp()) * S


def budget(window: str, scope: str = "tenant", timezone: str = "UTC") -> Budget:
    return Budget(id="b", scope=scope, window=window, limit=1.0, timezone=timezone)


def test_a_calendar_window_goes_only_after_its_end_plus_the_allowed_lateness() -> None:
    day = budget("day")
    end = DAY0_NS + 86_400 * S
    assert not LIFETIMES.window_expired(day, DAY0_NS, DAY0_NS + S, end + 3600 * S)
    assert LIFETIMES.window_expired(day, DAY0_NS, DAY0_NS + S, end + 3600 * S + 1)


def test_a_calendar_window_ends_in_its_time_zone() -> None:
    tokyo = budget("day", timezone="Asia/Tokyo")
    start = int(datetime(2026, 3, 1, 15, tzinfo=UTC).timestamp()) * S  # Tokyo midnight
    end = start + 86_400 * S
    assert not LIFETIMES.window_expired(tokyo, start, start, end + 3600 * S)
    assert LIFETIMES.window_expired(tokyo, start, start, end + 3600 * S + 1)


def test_a_session_goes_after_it_was_idle_for_the_idle_time() -> None:
    session = budget("session", scope="session")
    last = DAY0_NS + 5 * S
    assert not LIFETIMES.window_expired(session, 0, last, last + 600 * S)
    assert LIFETIMES.window_expired(session, 0, last, last + 600 * S + 1)


def test_a_rolling_window_goes_once_its_oldest_bucket_has_left() -> None:
    hour = budget("1h")
    last = DAY0_NS
    emptied = last + 3600 * S + 60 * S  # the window plus one bucket (a minute for 1h)
    assert not LIFETIMES.window_expired(hour, 0, last, emptied)
    assert LIFETIMES.window_expired(hour, 0, last, emptied + 1)


def test_the_last_event_reads_either_form_a_window_is_held_in() -> None:
    totals = WindowTotals()
    totals.add(0, 1, 2.0, 1, 10, 20, 0)
    assert last_event_ns(totals) == 20
    assert last_event_ns(totals.to_state()) == 20
    assert last_event_ns(None) == 0


def test_horizon_keys_are_not_window_keys_and_window_keys_split() -> None:
    assert not is_window_key(horizon_key(3))
    assert is_window_key("b|acme/x|17")
    assert split_window_key("b|a|b|17") == ("b", "a|b", 17)


def test_context_growth_keeps_when_it_was_seen_and_reads_the_older_layout() -> None:
    growth = ContextGrowth()
    assert growth.observe([10, 20], 0, 5, clock_ns=99)
    assert not growth.observe([30], 0, 5, clock_ns=200)  # a replay changes nothing
    assert ContextGrowth.from_state(growth.to_state()) == growth
    older = ContextGrowth.from_state([20, 1, 2, {"0": 5}])
    assert (older.calls, older.seen_ns) == (2, 0)
    assert LIFETIMES.session_idle(older.seen_ns, 600 * S + 1)


def test_a_sweep_record_is_a_current_record_with_its_clock() -> None:
    wire = SweepRecord(123).to_wire()
    assert wire == {"kind": SWEEP, "clock_ns": 123}
    assert record_version(wire) == 2
    assert SweepRecord.from_wire(wire).clock_ns == 123
