"""Budget windows (docs/ARCHITECTURE.md §6): calendar windows in a time zone, rolling durations, sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from burnguard.contracts.windows import (
    Window,
    WindowError,
    check_timezone,
    check_window,
    parse_duration_seconds,
)

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
NS = 1_000_000_000


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def ns(at: datetime) -> int:
    return int(at.timestamp()) * NS


# --- calendar windows in UTC --------------------------------------------------------------------


def test_day_in_utc() -> None:
    assert Window("day").bounds(utc(2025, 5, 14, 13, 37, 5)) == (utc(2025, 5, 14), utc(2025, 5, 15))
    # Midnight belongs to the day it starts; the end is exclusive.
    assert Window("day").bounds(utc(2025, 5, 15)) == (utc(2025, 5, 15), utc(2025, 5, 16))
    assert Window("day").bounds(utc(2025, 5, 14, 23, 59, 59, 999999))[1] == utc(2025, 5, 15)


def test_week_in_utc_starts_on_monday() -> None:
    # 2025-05-14 is a Wednesday; its ISO week runs Monday 12th .. Monday 19th.
    assert Window("week").bounds(utc(2025, 5, 14, 8)) == (utc(2025, 5, 12), utc(2025, 5, 19))
    assert Window("week").bounds(utc(2025, 5, 12)) == (utc(2025, 5, 12), utc(2025, 5, 19))
    assert Window("week").bounds(utc(2025, 5, 18, 23, 59)) == (utc(2025, 5, 12), utc(2025, 5, 19))
    # A week across a year boundary.
    assert Window("week").bounds(utc(2025, 1, 1)) == (utc(2024, 12, 30), utc(2025, 1, 6))


def test_month_in_utc() -> None:
    assert Window("month").bounds(utc(2025, 2, 14)) == (utc(2025, 2, 1), utc(2025, 3, 1))
    assert Window("month").bounds(utc(2024, 2, 29, 23)) == (utc(2024, 2, 1), utc(2024, 3, 1))
    assert Window("month").bounds(utc(2024, 12, 31, 23, 59)) == (utc(2024, 12, 1), utc(2025, 1, 1))
    assert Window("month").bounds(utc(2025, 1, 31)) == (utc(2025, 1, 1), utc(2025, 2, 1))


# --- calendar windows in other zones ----------------------------------------------------------


def test_day_in_tokyo_ends_at_tokyo_midnight() -> None:
    # 2025-05-14 16:00 UTC is already the 15th in Tokyo (UTC+9).
    start, end = Window("day", "Asia/Tokyo").bounds(utc(2025, 5, 14, 16))
    assert (start, end) == (utc(2025, 5, 14, 15), utc(2025, 5, 15, 15))
    assert start.astimezone(TOKYO) == datetime(2025, 5, 15, tzinfo=TOKYO)
    # One hour earlier it is still the 14th in Tokyo.
    assert Window("day", "Asia/Tokyo").bounds(utc(2025, 5, 14, 14, 59)) == (
        utc(2025, 5, 13, 15),
        utc(2025, 5, 14, 15),
    )


def test_week_and_month_in_tokyo() -> None:
    # Sunday 2025-06-01 16:00 UTC is Monday 01:00 in Tokyo: a new week has begun there.
    assert Window("week", "Asia/Tokyo").bounds(utc(2025, 6, 1, 16)) == (
        utc(2025, 6, 1, 15),
        utc(2025, 6, 8, 15),
    )
    # 2025-05-31 20:00 UTC is June 1st in Tokyo.
    assert Window("month", "Asia/Tokyo").bounds(utc(2025, 5, 31, 20)) == (
        utc(2025, 5, 31, 15),
        utc(2025, 6, 30, 15),
    )


def test_day_in_new_york_standard_and_daylight_time() -> None:
    # January: EST (UTC-5).
    assert Window("day", "America/New_York").bounds(utc(2025, 1, 15, 12)) == (
        utc(2025, 1, 15, 5),
        utc(2025, 1, 16, 5),
    )
    # July: EDT (UTC-4).
    assert Window("day", "America/New_York").bounds(utc(2025, 7, 15, 12)) == (
        utc(2025, 7, 15, 4),
        utc(2025, 7, 16, 4),
    )
    # 03:00 UTC on July 15th is still the 14th in New York.
    assert Window("day", "America/New_York").bounds(utc(2025, 7, 15, 3))[0] == utc(2025, 7, 14, 4)


def test_spring_forward_day_is_23_hours() -> None:
    start, end = Window("day", "America/New_York").bounds(utc(2025, 3, 9, 12))
    assert (start, end) == (utc(2025, 3, 9, 5), utc(2025, 3, 10, 4))
    assert end - start == timedelta(hours=23)
    assert start.astimezone(NY) == datetime(2025, 3, 9, tzinfo=NY)
    assert end.astimezone(NY) == datetime(2025, 3, 10, tzinfo=NY)


def test_fall_back_day_is_25_hours() -> None:
    start, end = Window("day", "America/New_York").bounds(utc(2025, 11, 2, 12))
    assert (start, end) == (utc(2025, 11, 2, 4), utc(2025, 11, 3, 5))
    assert end - start == timedelta(hours=25)
    # The repeated hour (01:00-02:00 local happens twice) is inside the same window.
    assert Window("day", "America/New_York").bounds(utc(2025, 11, 2, 5, 30)) == (start, end)
    assert Window("day", "America/New_York").bounds(utc(2025, 11, 2, 6, 30)) == (start, end)


def test_dst_change_at_midnight() -> None:
    # Santiago springs forward at midnight: 2025-09-07 00:00 local does not exist, the day starts at 01:00.
    start, end = Window("day", "America/Santiago").bounds(utc(2025, 9, 7, 12))
    assert (start, end) == (utc(2025, 9, 7, 4), utc(2025, 9, 8, 3))
    assert end - start == timedelta(hours=23)
    # It falls back at midnight: 23:00-24:00 on 2025-04-05 happens twice, so that day has 25 hours.
    start, end = Window("day", "America/Santiago").bounds(utc(2025, 4, 6, 3, 30))
    assert (start, end) == (utc(2025, 4, 5, 3), utc(2025, 4, 6, 4))
    assert end - start == timedelta(hours=25)


def test_week_and_month_across_dst() -> None:
    # The week of Monday 2025-03-03 .. 2025-03-10 contains the spring-forward Sunday: 7 days - 1 hour.
    start, end = Window("week", "America/New_York").bounds(utc(2025, 3, 5))
    assert (start, end) == (utc(2025, 3, 3, 5), utc(2025, 3, 10, 4))
    assert end - start == timedelta(days=7) - timedelta(hours=1)
    # March 2025 in New York starts in EST and ends in EDT.
    start, end = Window("month", "America/New_York").bounds(utc(2025, 3, 15))
    assert (start, end) == (utc(2025, 3, 1, 5), utc(2025, 4, 1, 4))
    assert end - start == timedelta(days=31) - timedelta(hours=1)


def test_bounds_accepts_any_aware_datetime() -> None:
    local = datetime(2025, 3, 9, 8, 0, tzinfo=NY)
    assert Window("day", "America/New_York").bounds(local) == (utc(2025, 3, 9, 5), utc(2025, 3, 10, 4))
    assert Window("day").bounds(local) == (utc(2025, 3, 9), utc(2025, 3, 10))


# --- durations ----------------------------------------------------------------------------------


def test_parse_duration_seconds() -> None:
    assert parse_duration_seconds("90m") == 5400
    assert parse_duration_seconds("1h") == 3600
    assert parse_duration_seconds("24h") == 86400
    assert parse_duration_seconds("30d") == 30 * 86400
    for text in ("day", "1y", "h", "1.5h", " 1h", "-1h"):
        assert parse_duration_seconds(text) is None


def test_durations_are_rolling_windows_kept_in_sixty_buckets() -> None:
    at = utc(2025, 5, 14, 13, 37, 5)
    hour = Window("1h")
    assert hour.rolling_ns == 3600 * NS
    assert hour.bucket_ns == 60 * NS  # a sixtieth, at least a minute
    assert Window("24h").bucket_ns == 24 * 60 * NS
    assert Window("30d").bucket_ns == 12 * 3600 * NS
    assert Window("15m").bucket_ns == 60 * NS  # never below a minute
    # One state per key: no fixed bounds, the moving ones are computed when deciding.
    assert hour.start_ns(ns(at)) == 0
    assert hour.bounds(at) == Window("session").bounds(at)
    for calendar in ("day", "week", "month", "session"):
        assert Window(calendar).rolling_ns == 0 and Window(calendar).bucket_ns == 0


def test_durations_ignore_the_time_zone() -> None:
    assert Window("24h", "America/New_York").bucket_ns == Window("24h").bucket_ns
    assert Window("1h", "Asia/Tokyo").start_ns(ns(utc(2025, 3, 9, 12, 30))) == 0


def test_session_window_never_rolls_over() -> None:
    a = Window("session").bounds(utc(2025, 1, 1))
    b = Window("session").bounds(utc(2031, 7, 4, 3))
    assert a == b
    start, end = a
    assert start == utc(1970, 1, 1)
    assert end.year == 9999
    assert Window("session").start_ns(ns(utc(2025, 1, 1))) == 0


# --- start_ns -------------------------------------------------------------------------------


def test_start_ns_matches_bounds() -> None:
    at = utc(2025, 3, 9, 12, 34, 56)
    assert Window("day", "America/New_York").start_ns(ns(at) + 123_456_789) == ns(utc(2025, 3, 9, 5))
    assert Window("month", "Asia/Tokyo").start_ns(ns(at)) == ns(utc(2025, 2, 28, 15))


def test_start_ns_at_and_just_before_a_boundary() -> None:
    midnight = ns(utc(2025, 1, 2))
    day = Window("day")
    assert day.start_ns(midnight) == midnight
    assert day.start_ns(midnight - 1_000) == ns(utc(2025, 1, 1))
    # A span ending 1 ns before midnight belongs to the day that is ending, not to the next one.
    assert day.start_ns(midnight - 1) == ns(utc(2025, 1, 1))


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["day", "week", "month", "session", "1h", "24h", "30d", "15m"])
def test_check_window_accepts(text: str) -> None:
    assert check_window(text) == text


@pytest.mark.parametrize("text", ["fortnight", "0h", "0d", "1y", "", "DAY"])
def test_check_window_rejects(text: str) -> None:
    with pytest.raises(WindowError, match="is not one of"):
        check_window(text)


def test_check_timezone() -> None:
    assert check_timezone("Asia/Tokyo") == "Asia/Tokyo"
    for name in ("Mars/Olympus", "", "../etc/passwd"):
        with pytest.raises(WindowError, match="unknown time zone"):
            check_timezone(name)
