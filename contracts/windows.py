"""Budget windows: which period a span's spend counts in (docs/ARCHITECTURE.md §6).

Calendar windows (`day`, `week`, `month`) follow the budget's time zone, so a
tenant in Tokyo has its day end at Tokyo midnight. Duration windows (`1h`,
`24h`, `30d`) are rolling: the spend of the last hour, whenever you look. They
are kept as 60 buckets of a sixtieth of the duration (at least a minute), and
the oldest bucket counts until it has left the window entirely, so a rolling
budget errs on the side of restricting for at most one bucket longer.
`session` windows never roll over.
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
ROLLING_BUCKETS = 60


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

    @property
    def rolling_ns(self) -> int:
        """The duration of a rolling window in nanoseconds; 0 for calendar and session windows."""
        seconds = parse_duration_seconds(self.spec)
        return seconds * 1_000_000_000 if seconds else 0

    @property
    def bucket_ns(self) -> int:
        """The bucket size of a rolling window: a sixtieth of it, at least a minute; 0 otherwise."""
        return max(self.rolling_ns // ROLLING_BUCKETS, 60_000_000_000) if self.rolling_ns else 0

    def bounds(self, at: datetime) -> tuple[datetime, datetime]:
        """The [start, end) of the window that contains the instant `at` (aware datetime).

        A rolling window has no fixed bounds: it is keyed once per budget key
        (start 0), and its moving bounds are computed when deciding.
        """
        if self.spec == SESSION_WINDOW or self.rolling_ns:
            return _EPOCH, _FAR_FUTURE
        return _calendar_bounds(self.spec, at.astimezone(ZoneInfo(self.timezone)))

    def start_ns(self, at_ns: int) -> int:
        """Window start as epoch nanoseconds, for keying state by window."""
        if self.spec == SESSION_WINDOW or self.rolling_ns:
            return 0
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
