"""When the worker forgets a budget window, a session's context growth and a key's signal state.

The worker runs for months; without forgetting, its tables, changelogs, recovery time and the
refresh timer's walk grow with every key that ever spent. A table entry goes once nothing
can count in it any more (docs/ARCHITECTURE.md §7, "Eviction"):

- a calendar window once it ended more than the allowed lateness ago (a late span within the
  lateness still finds it);
- a session window once its session was idle (no span) for `BURNGUARD_SESSION_IDLE_S`;
- a rolling window once every bucket has left it (it has emptied);
- a key's signal state once none of its windows is left.

The clock is the stream's own: each `sweep` record carries the latest time its sender knew
(the wall clock, or the latest trusted event time it decoded if that is later), so every
decision is made inside the partition's stream from what the stream holds, and a replay
decides alike. Each sweep stores its partition's clock in the `window-totals` changelog
(`horizon_key`), after the tombstones; a (replayed) delta for a window absent from the table
that the horizon says has expired is a late span, not a new window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from burnguard.contracts.budgets import Budget
from burnguard.contracts.windows import SESSION_WINDOW
from burnguard.stream.accounting import WindowTotals, window_lengths, window_span

_NS = 1_000_000_000
#: `window-totals` keys that are not windows start with this (budget ids cannot: `check_id`).
RESERVED_PREFIX = "~"
#: Index of `last_event_ns` in `WindowTotals.to_state()` (the table holds either form).
_LAST_EVENT = 3


def horizon_key(partition: int) -> str:
    """The `window-totals` key of a partition's eviction horizon (stored on that partition)."""
    return f"{RESERVED_PREFIX}evicted-through|{partition}"


def is_window_key(state_key: str) -> bool:
    return not state_key.startswith(RESERVED_PREFIX)


def last_event_ns(stored: Any) -> int:
    """The latest event time of a stored window, whichever form the table holds it in."""
    if isinstance(stored, WindowTotals):
        return stored.last_event_ns
    return int(stored[_LAST_EVENT]) if stored and len(stored) > _LAST_EVENT else 0


def split_window_key(state_key: str) -> tuple[str, str, int]:
    """(budget id, key, window_start_ns) of a `budget|key|window_start_ns` table key."""
    budget_id, rest = state_key.split("|", 1)
    key, start = rest.rsplit("|", 1)
    return budget_id, key, int(start)


@dataclass(frozen=True)
class Lifetimes:
    """How long past its last use each kind of state is kept, in ns."""

    lateness_ns: int
    session_idle_ns: int

    @classmethod
    def of(cls, allowed_lateness: timedelta, session_idle: timedelta) -> Lifetimes:
        return cls(int(allowed_lateness.total_seconds() * _NS), int(session_idle.total_seconds() * _NS))

    def window_expired(self, budget: Budget, window_start_ns: int, last_ns: int, clock_ns: int) -> bool:
        """Whether nothing can count in this window any more at `clock_ns`.

        `last_ns` is the latest event time in the window (for a delta not yet
        counted: the delta's). Calendar: ended more than the allowed lateness
        ago. Session: idle longer than the session idle time. Rolling: every
        bucket, the oldest included (it counts until fully gone), has left.
        """
        return last_ns < self.expired_before(budget, window_start_ns, clock_ns)

    def expired_before(self, budget: Budget, window_start_ns: int, clock_ns: int) -> float:
        """`window_expired` for every window of a budget with this start at once: the latest event
        time below which one has expired (-inf: none has; inf: all have, a calendar window).

        A sweep walks every window; most share a few (budget, start) pairs, so it works this out
        once per pair (`BudgetJob._evict_windows`). Integer arithmetic: `last + a < clock` is
        `last < clock - a` exactly.
        """
        window = budget.window_spec
        if window.spec == SESSION_WINDOW:
            return clock_ns - self.session_idle_ns
        rolling_ns, bucket_ns = window_lengths(window)
        if rolling_ns:
            return clock_ns - rolling_ns - bucket_ns
        end = window_span(window, window_start_ns)[1]
        return math.inf if int(end.timestamp()) * _NS + self.lateness_ns < clock_ns else -math.inf

    def session_idle(self, seen_ns: int, clock_ns: int) -> bool:
        return seen_ns + self.session_idle_ns < clock_ns
