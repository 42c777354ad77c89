"""Budget windows: which period a span's spend counts in (DESIGN.md §5).

Calendar windows (`day`, `week`, `month`) follow the budget's time zone, so a
tenant in Tokyo has its day end at Tokyo midnight. Duration windows (`1h`,
`24h`, `30d`) are aligned to the epoch; `session` windows never roll over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CALENDAR_WINDOWS = ("day", "week", "month")
SESSION_WINDOW = "session"
_DURATION = re.compile(r"^(\d+)(m|h|d)$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class WindowError(ValueError):
    pass


def parse_duration_seconds(text: str) -> int | None:
    """`90m` -> 5400; None when `text` is not a duration."""
    found = _DURATION.match(text)
    if not found:
        return None
    return int(found.group(1)) * _UNIT_SECONDS[found.group(2)]


def check_window(text: str) -> str:
    if text in CALENDAR_WINDOWS or text == SESSION_WINDOW:
        return text
    seconds = parse_duration_seconds(text)
    if seconds is None or seconds <= 0:
        raise WindowError(
            f"window {text!r} is not one of day, week, month, session or a duration like 1h, 24h, 30d"
        )
    return text


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise WindowError(f"unknown time zone {name!r}") from exc
    return name


@dataclass(frozen=True, slots=True)
class Window:
    """A window specification resolved once, so the hot path only does arithmetic."""

    spec: str
    timezone: str = "UTC"

    def bounds(self, at: datetime) -> tuple[datetime, datetime]:
        """The [start, end) of the window that contains the instant `at` (aware datetime)."""
        if self.spec == SESSION_WINDOW:
            return _EPOCH, _FAR_FUTURE
        seconds = parse_duration_seconds(self.spec)
        if seconds is not None:
            start_s = int(at.timestamp()) // seconds * seconds
            start = datetime.fromtimestamp(start_s, UTC)
            return start, start + timedelta(seconds=seconds)
        return _calendar_bounds(self.spec, at.astimezone(ZoneInfo(self.timezone)))

    def start_ns(self, at_ns: int) -> int:
        """Window start as epoch nanoseconds, for keying state by window."""
        seconds, rest_ns = divmod(at_ns, 1_000_000_000)  # integers: a float loses the last microsecond
        start, _ = self.bounds(datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest_ns // 1000))
        return int(start.timestamp()) * 1_000_000_000


def _calendar_bounds(spec: str, local: datetime) -> tuple[datetime, datetime]:
    zone = local.tzinfo
    day = local.date()
    if spec == "day":
        first, last = day, day + timedelta(days=1)
    elif spec == "week":  # ISO weeks start on Monday
        first = day - timedelta(days=day.weekday())
        last = first + timedelta(days=7)
    else:
        first = day.replace(day=1)
        last = (first + timedelta(days=32)).replace(day=1)
    start = datetime(first.year, first.month, first.day, tzinfo=zone)
    end = datetime(last.year, last.month, last.day, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)
