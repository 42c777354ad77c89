"""From decoded spans to usage deltas per budget window.

The stream's first stage reads whole OTLP batches and turns them, here, into
one `UsageDelta` per (budget, key, window) touched by the batch. Summing
inside the batch before anything is sent keeps the second stage's event rate
proportional to the number of active budget keys, not to the span rate.

Everything here runs once per span or once per delta, so the budget set is
compiled once per configuration (`_BudgetSet`, with the rules of
`contracts.budget_rules`) and calendar window bounds are
cached (`WindowClock`): the hot path is attribute reads and integer compares.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.budget_rules import (
    KEY_SEPARATOR,
    METRIC_INDEX,
    NOTHING,
    KeyMatcher,
    compile_match,
    scope_reader,
    span_amounts,
    span_keys,
)
from burnguard.contracts.budgets import Budget, BudgetConfig
from burnguard.contracts.otlp import NATIVE_ERRORS
from burnguard.contracts.pricing import PriceBook, price_if_unpriced
from burnguard.contracts.usage import SpanUsage
from burnguard.contracts.windows import ROLLING_BUCKETS, SESSION_WINDOW, Window
from burnguard.stream.partitioner import native_module_in_use
from burnguard.stream.records import DeltaRow

logger = logging.getLogger(__name__)

_NS = 1_000_000_000
NS_PER_MINUTE = 60 * _NS
#: How far back the burn rate looks.
RECENT_MINUTES = 15


@lru_cache(maxsize=256)
def window_lengths(window: Window) -> tuple[int, int]:
    """(rolling_ns, bucket_ns) of a window; `Window` parses its spec on every property read."""
    return window.rolling_ns, window.bucket_ns


def _whole_seconds_ns(at: datetime) -> int:
    """The same rounding as `Window.start_ns`, so cached and uncached starts are equal."""
    return int(at.timestamp()) * _NS


def calendar_bounds_ns(window: Window, at_ns: int) -> tuple[int, int]:
    """[start, end) in epoch ns of the calendar window that holds `at_ns` (rounded to the second)."""
    seconds, rest_ns = divmod(at_ns, _NS)
    at = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest_ns // 1000)
    start, end = window.bounds(at)
    return _whole_seconds_ns(start), _whole_seconds_ns(end)


@lru_cache(maxsize=4096)
def window_span(window: Window, window_start_ns: int) -> tuple[datetime, datetime]:
    """(start, end) datetimes of the window starting at `window_start_ns`: built once per window."""
    return window.bounds(datetime.fromtimestamp(window_start_ns / _NS, UTC))


class WindowClock:
    """`Window.start_ns` with the current window's [start, end) kept as integers.

    Almost every span falls into the window the previous one fell into, so the
    time-zone arithmetic runs once per window instead of once per span.
    """

    __slots__ = ("_end", "_start", "_window", "fixed")

    def __init__(self, window: Window) -> None:
        self._window = window
        #: rolling and session windows are keyed once per budget key (start 0)
        self.fixed = window.spec == SESSION_WINDOW or bool(window_lengths(window)[0])
        self._start = self._end = 0

    def start_ns(self, at_ns: int) -> int:
        if self.fixed:
            return 0
        return self.bounds_ns(at_ns)[0]

    def bounds_ns(self, at_ns: int) -> tuple[int, int]:
        """[start, end) of the calendar window that holds `at_ns` (not for a `fixed` window)."""
        if self._start <= at_ns < self._end:
            return self._start, self._end
        start, end = calendar_bounds_ns(self._window, at_ns)
        if start >= self._start:  # a late span does not evict the newest window
            self._start, self._end = start, end
        return start, end


def partition_key_of(budget: str, key: str) -> str:
    """All state of one budget key lives on one partition, so one worker owns it."""
    return f"{budget}|{key}"


@dataclass(slots=True)
class UsageDelta:
    """What one batch added to one budget key in one window.

    `source_partition` / `source_offset` name the `otlp_spans` message the
    delta came from. A worker that dies before committing that offset
    replays the message and sends the same delta again; the second stage
    recognises it by this origin and does not count it twice.
    """

    budget: str
    key: str
    window_start_ns: int
    amount: float = 0.0
    spans: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0
    source_partition: int = -1
    source_offset: int = -1
    bucket_ns: int = 0  # rolling windows: the size of the time buckets the spend is kept in
    #: How the model calls went (see `CallMix`); None for tool-call budgets and older records.
    mix: list[float] | None = None

    @property
    def partition_key(self) -> str:
        return partition_key_of(self.budget, self.key)

    @property
    def state_key(self) -> str:
        return f"{self.budget}|{self.key}|{self.window_start_ns}"

    def to_row(self) -> list[Any]:
        """The delta inside a batch record: `DeltaRow(...).to_wire()`, without the tuple in between.

        One per delta of every message (tens per small message); building the `DeltaRow` and
        copying it into a list cost more than the list. `test_usage_records` checks both agree.
        """
        row = [
            self.budget,
            self.key,
            self.window_start_ns,
            self.amount,
            self.spans,
            self.first_event_ns,
            self.last_event_ns,
            self.bucket_ns,
        ]
        if self.mix is not None:
            row.append(self.mix)
        return row

    @classmethod
    def from_row(cls, row: list[Any], source_partition: int = -1, source_offset: int = -1) -> UsageDelta:
        budget, key, window_start_ns, amount, spans, first, last, bucket_ns, mix = DeltaRow.from_wire(row)
        source = (source_partition, source_offset)
        return cls(budget, key, window_start_ns, amount, spans, first, last, *source, bucket_ns, mix)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageDelta:
        """A version 1 single-delta record (`stream/records.py`: when this can go)."""
        return cls(**data)


#: The call mix of a budget window: model calls made, of them on a cheaper class than asked for
#: (routed down or downgraded), calls refused before they were made, and what escalation retries
#: cost (USD). The signal's reason reports it (docs/ARCHITECTURE.md §8).
MIX_CALLS, MIX_FALLBACKS, MIX_REFUSED, MIX_ESCALATION_USD = range(4)
MIX_FIELDS = 4


_REFUSED_CALL = (0.0, 0.0, 1.0, 0.0)
#: The mix of most calls: made, on the class asked for, not an escalation retry.
_PLAIN_CALL = (1.0, 0.0, 0.0, 0.0)


def call_mix(usage: SpanUsage) -> tuple[float, ...]:
    """What one model call adds to a window's call mix (in `MIX_*` order)."""
    if usage.is_refused_call:
        return _REFUSED_CALL
    fell_back = usage.fallback or bool(usage.downgraded_from and not usage.routed_from)
    escalation_usd = (usage.cost_usd or 0.0) if usage.escalated_from else 0.0
    return (1.0, float(fell_back), 0.0, escalation_usd)


#: Zero bytes as spaces, and the bytes `bytes.lstrip()` strips as whitespace as something else.
_ZERO_AS_SPACE = bytes.maketrans(b"\0\t\n\x0b\x0c\r ", b" xxxxxx")


#: Per ring size, its slots all 0.0, as an array to copy and as bytes to compare: a new window
#: makes one or two rings and adds to them at once (stage 2, most rows of new keys).
_ZERO_SLOTS: dict[int, tuple[array, bytes]] = {}


def _zeros(size: int) -> tuple[array, bytes]:
    """`size` slots of 0.0 (copied with `[:]`, ~7x cheaper than `array("d", bytes(8 * size))`) and
    their bytes (a ring whose slots are these holds nothing to evict: no sum, no reset)."""
    known = _ZERO_SLOTS.get(size)
    if known is None:
        zeros = array("d", bytes(8 * size))
        known = _ZERO_SLOTS[size] = (zeros, zeros.tobytes())
    return known


class Ring:
    """Amounts for the newest `size` consecutive indices (minutes, buckets) in a fixed array.

    A dict keyed by the index as a string cost ~10 KB per fully used rolling
    key; a ring of floats indexed by `index % size` costs 8 bytes a slot and
    adding to it needs no scan for the newest index.
    """

    __slots__ = ("amounts", "newest")

    def __init__(self, size: int, newest: int = -1, amounts: array | None = None) -> None:
        self.newest = newest  # -1: empty
        self.amounts = amounts if amounts is not None else _zeros(size)[0][:]

    def add(self, index: int, amount: float) -> float:
        """Add `amount` at `index`; return what fell out of the ring (older than `size` indices)."""
        amounts = self.amounts
        size = len(amounts)
        evicted = 0.0
        if index > self.newest:
            if self.newest < 0 or index - self.newest >= size:
                zeros, zero_bytes = _zeros(size)
                if amounts.tobytes() != zero_bytes:  # a new window's ring is empty already
                    evicted = sum(amounts)
                    amounts[:] = zeros
            else:
                for passed in range(self.newest + 1, index + 1):
                    evicted += amounts[passed % size]
                    amounts[passed % size] = 0.0
            self.newest = index
        elif index <= self.newest - size:
            return amount  # already out of the ring: counted and dropped at once
        amounts[index % size] += amount
        return evicted

    def _since(self, first: int) -> tuple[int, array]:
        """(index of the oldest, amounts oldest first) of the slots from index `first` on."""
        amounts = self.amounts
        size = len(amounts)
        lowest = max(first, self.newest - size + 1)
        if lowest > self.newest:
            return lowest, array("d")
        start, end = lowest % size, self.newest % size + 1
        return lowest, amounts[start:end] if start < end else amounts[start:] + amounts[:end]

    def items(self, first: int) -> list[tuple[int, float]]:
        """(index, amount) of the non-empty slots from index `first` on, oldest first."""
        lowest, amounts = self._since(first)
        return [(lowest + offset, amount) for offset, amount in enumerate(amounts) if amount]

    def total(self, first: int) -> float:
        """`sum(self._since(first)[1])`, the same slots in the same order without the call and its
        tuple: every signal's burn rate asks it."""
        amounts = self.amounts
        size = len(amounts)
        newest = self.newest
        lowest = max(first, newest - size + 1)
        if lowest > newest:
            return 0  # `sum` of no slots
        start, end = lowest % size, newest % size + 1
        return sum(amounts[start:end] if start < end else amounts[start:] + amounts[:end])

    def to_state(self) -> list[Any]:
        """[newest, [amounts from the oldest non-empty slot to the newest]]: short for sparse rings.

        Once per changelog record. The leading empty slots are found on the bytes (0.0 is all zero
        bytes): `bytes.lstrip(b"\0")` tests each byte against its argument, ~1 us for a rolling
        ring, so the zero bytes become spaces and the whitespace strip (a table look-up) finds them.
        """
        amounts = self.amounts
        cut = (self.newest + 1) % len(amounts)  # the oldest slot's position
        ordered = amounts[cut:] + amounts[:cut] if cut else amounts
        raw = ordered.tobytes()
        skip = (len(raw) - len(raw.translate(_ZERO_AS_SPACE).lstrip())) // ordered.itemsize
        return [self.newest, ordered[skip:].tolist()]

    @classmethod
    def from_state(cls, size: int, state: Any) -> Ring:
        """From `to_state`, or from the `{index: amount}` dict earlier versions stored."""
        ring = cls(size)
        if isinstance(state, dict):
            for index, amount in sorted((int(i), a) for i, a in state.items()):
                ring.add(index, amount)
            return ring
        newest, ordered = state
        for offset, amount in enumerate(ordered):
            ring.add(newest - len(ordered) + 1 + offset, amount)
        ring.newest = newest
        return ring


def _rolling_ring() -> Ring:
    # The oldest bucket still counts while partly inside the window: a window's worth plus one.
    return Ring(ROLLING_BUCKETS + 1)


@dataclass(slots=True)
class WindowTotals:
    """The running totals of one budget key in one window, and which deltas are in them.

    `applied` maps each source partition to the highest source offset whose
    delta is included. Deltas from one source partition reach a key in
    offset order (one stage-one stream per partition, one ordered producer
    per usage partition), so "offset not above the mark" means "already
    counted": exactly-once totals from at-least-once delivery. The mark is
    stored in the same table value as the totals, so the changelog can never
    hold one without the other.

    The table holds these objects themselves (Faust's JSON codec writes the
    changelog through `__json__`); after a recovery it holds the JSON lists,
    which `from_state` turns back into an object.
    """

    spent: float = 0.0
    spans: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    #: Spend per minute of event time over the last `RECENT_MINUTES`, for a burn rate that
    #: follows what happens now.
    recent: Ring = field(default_factory=lambda: Ring(RECENT_MINUTES))
    #: Rolling windows only: spend per time bucket, a window's worth.
    buckets: Ring | None = None
    #: The window's call mix (`MIX_*` fields), when its budget counts model calls.
    mix: list[float] | None = None
    #: Not state (not in `to_state`, not compared): the span of spend over which
    #: `policy.decide_action` is known to give one action for this window (`policy.Settled`),
    #: so most rows are decided by a few compares. Any change of spend is checked against it.
    settled: Any = field(default=None, compare=False, repr=False)

    def apply(self, delta: UsageDelta) -> bool:
        """Add `delta` unless it is a replay of one already counted; True if it was added."""
        return self.add(
            delta.source_partition,
            delta.source_offset,
            delta.amount,
            delta.spans,
            delta.first_event_ns,
            delta.last_event_ns,
            delta.bucket_ns,
            delta.mix,
        )

    def add(
        self,
        source_partition: int,
        source_offset: int,
        amount: float,
        spans: int,
        first_event_ns: int,
        last_event_ns: int,
        bucket_ns: int,
        mix: list[float] | None = None,
    ) -> bool:
        """`apply` without a `UsageDelta`: stage 2 reads the fields straight from a batch row."""
        if source_partition >= 0:
            source = str(source_partition)
            if source_offset <= self.applied.get(source, -1):
                return False
            self.applied[source] = source_offset
        self.spent += amount
        self.spans += spans
        if not self.first_event_ns or first_event_ns < self.first_event_ns:
            self.first_event_ns = first_event_ns
        if last_event_ns > self.last_event_ns:
            self.last_event_ns = last_event_ns
        recent, minute = self.recent, last_event_ns // NS_PER_MINUTE
        if minute == recent.newest:  # most rows: `Ring.add` in the ring's newest minute, inlined
            amounts = recent.amounts
            amounts[minute % len(amounts)] += amount
        else:
            recent.add(minute, amount)
        if bucket_ns:
            buckets, bucket = self.buckets, last_event_ns // bucket_ns
            if buckets is None:
                buckets = self.buckets = _rolling_ring()
            if bucket == buckets.newest:  # as above: nothing falls out of the ring
                amounts = buckets.amounts
                amounts[bucket % len(amounts)] += amount
            else:
                self.spent -= buckets.add(bucket, amount)
        if mix:
            current = self.mix
            if current is not None and len(current) == len(mix) == MIX_FIELDS:  # the usual case, unrolled
                a, b = current, mix
                self.mix = [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
            elif current is None and len(mix) == MIX_FIELDS:  # a new window's first row, as below
                self.mix = [0.0 + mix[0], 0.0 + mix[1], 0.0 + mix[2], 0.0 + mix[3]]
            else:
                self.mix = [a + b for a, b in zip(current or [0.0] * MIX_FIELDS, mix, strict=False)]
        return True

    def add_steps(
        self, source_partition: int, steps: list[list[Any]], bucket_ns: int, counts_calls: bool
    ) -> None:
        """Add a combined row's steps (`records.Step`s as on the wire) in turn, each as `add` adds it.

        Stage 2's path for a row decided once (`BudgetJob._apply_at_once`), most steps: a `Step`
        built per step and `add` called with it were most of that path. A step in the ring's
        newest minute (and bucket), with a plain call mix or none, not at or below the mark, is
        added here by the very operations `add` runs on it, in the same order (the totals are
        those of `add` bit for bit, `tests/test_accounting.py`); any other step goes through `add`.
        """
        source = str(source_partition)
        applied, recent = self.applied, self.recent
        for offset, amount, spans, first_ns, span_ns, *own_mix in steps:
            last_ns = first_ns + span_ns
            minute, buckets, current = last_ns // NS_PER_MINUTE, self.buckets, self.mix
            if (
                own_mix
                or minute != recent.newest
                or offset <= applied.get(source, -1)
                or (bucket_ns and (buckets is None or last_ns // bucket_ns != buckets.newest))
                or (counts_calls and (current is None or len(current) != MIX_FIELDS))
            ):
                plain = [float(spans), 0.0, 0.0, 0.0] if counts_calls else None  # as `Step.from_wire`
                mix = own_mix[0] if own_mix else plain
                self.add(source_partition, offset, amount, spans, first_ns, last_ns, bucket_ns, mix)
                continue
            applied[source] = offset
            self.spent += amount
            self.spans += spans
            if not self.first_event_ns or first_ns < self.first_event_ns:
                self.first_event_ns = first_ns
            if last_ns > self.last_event_ns:
                self.last_event_ns = last_ns
            amounts = recent.amounts
            amounts[minute % len(amounts)] += amount
            if bucket_ns:
                amounts = buckets.amounts
                amounts[last_ns // bucket_ns % len(amounts)] += amount
            if counts_calls:  # `add`'s unrolled sum with the plain mix [spans, 0, 0, 0]
                self.mix = [current[0] + float(spans), current[1] + 0.0, current[2] + 0.0, current[3] + 0.0]

    def rolling_buckets(self, now_ns: int, window_ns: int, bucket_ns: int) -> list[tuple[int, float]]:
        """(index, amount) of the buckets (partly) inside the window ending at `now_ns`, oldest first."""
        if self.buckets is None:
            return []
        return self.buckets.items((now_ns - window_ns) // bucket_ns)

    def rolling_spent(self, now_ns: int, window_ns: int, bucket_ns: int) -> float:
        if self.buckets is None:
            return 0.0
        return self.buckets.total((now_ns - window_ns) // bucket_ns)

    def recent_spend(self, since_ns: int) -> float:
        """Spend in the minutes from `since_ns` on (minute resolution)."""
        return self.recent.total(since_ns // NS_PER_MINUTE)

    def to_state(self) -> list[Any]:
        return [
            self.spent,
            self.spans,
            self.first_event_ns,
            self.last_event_ns,
            self.applied,
            self.recent.to_state(),
            self.buckets.to_state() if self.buckets is not None else None,
            self.mix,
        ]

    def __json__(self) -> list[Any]:
        return self.to_state()

    @classmethod
    def from_state(cls, state: list[Any] | WindowTotals | None) -> WindowTotals:
        """From `to_state`, or from a state in an earlier layout (`STATE_LAYOUTS`): it lacks the rest."""
        if isinstance(state, WindowTotals):
            return state
        if not state:
            return cls()
        padded = [
            *state[:STATE_FIELDS],
            *[None] * (STATE_FIELDS - len(state)),
        ]  # a newer layout's extras: ignored
        spent, spans, first, last, applied, recent, buckets, mix = padded
        return cls(
            spent,
            spans,
            first,
            last,
            dict(applied) if applied else {},
            Ring.from_state(RECENT_MINUTES, recent) if recent is not None else Ring(RECENT_MINUTES),
            Ring.from_state(ROLLING_BUCKETS + 1, buckets) if buckets else None,
            list(mix) if mix else None,
        )


#: The fields of a `WindowTotals.to_state` list, now.
STATE_FIELDS = 8
#: The layouts of the state by length, each with what the next one added. The table's changelog
#: is compacted: a key's state keeps the layout it was written in until its key counts again, so
#: the older layouts can go only once every changelog was rewritten (e.g. rebuilt from an empty
#: topic) by a worker of the current layout.
STATE_LAYOUTS = {
    4: "spent, spans, first_event_ns, last_event_ns",
    5: "+ applied (source offsets: exactly-once totals)",
    6: "+ recent (the burn-rate ring)",
    7: "+ buckets (rolling windows)",
    8: "+ mix (the call mix, commit 73411b7)",
}


@dataclass
class BatchStats:
    spans: int = 0
    unpriced: int = 0  # model calls without a known price (charged by the `unpriced:` rule, if any)
    too_late: int = 0  # (span, budget) pairs whose window had closed beyond the allowed lateness


def fill_model_class(usage: SpanUsage, config: BudgetConfig) -> None:
    if not usage.model_class and usage.is_model_call:
        usage.model_class = config.model_class(usage.model)


#: One budget in the per-span loop, a tuple to unpack in one step: (budget id, index of its scope's
#: key, index of its window's start, index of its metric's amount, its glob or None, bucket_ns,
#: whether it counts model calls and so reports their call mix, the budget).
_Entry = tuple[str, int, int, int, "KeyMatcher | None", int, bool, Budget]


def _entry(budget: Budget, scope: int, window: int) -> _Entry:
    matcher = compile_match(budget.match)
    bucket_ns = window_lengths(budget.window_spec)[1]
    calls = budget.metric != "tool_calls"
    return (budget.id, scope, window, METRIC_INDEX[budget.metric], matcher, bucket_ns, calls, budget)


class _BudgetSet:
    """A configuration's budgets compiled for the per-span loop.

    Budgets share scopes and windows (the bench's 20 budgets have 10 scopes and 8 windows), so
    each span's key per scope and window start per window are worked out once, and each budget
    it matches is a few index reads and one dict look-up.

    `starts_at` keeps the window starts of the last event time with the range of times they
    hold for; `signature` reads a span's value of every dimension some scope reads, from which
    its keys, and so the budgets that take it, follow (`usage_deltas` groups spans by it).
    """

    __slots__ = (
        "_starts",
        "_starts_range",
        "clocks",
        "dimensions",
        "entries",
        "fixed_starts",
        "for_kind",
        "scopes",
        "signature",
        "summer",
    )

    def __init__(self, budgets: Iterable[Budget]) -> None:
        scopes: dict[tuple[str, ...], int] = {}
        windows: dict[Window, int] = {}
        entries: list[_Entry] = []
        for budget in budgets:
            scope = scopes.setdefault(budget.scope, len(scopes))
            window = windows.setdefault(budget.window_spec, len(windows))
            entries.append(_entry(budget, scope, window))
        self.entries = entries
        #: (is a model call made or refused, has tool calls) -> the budgets that count such a span,
        #: in the order of the file (the order of the deltas)
        self.for_kind = {
            (calls, tools): [entry for entry in entries if (calls if entry[6] else tools)]
            for calls in (False, True)
            for tools in (False, True)
        }
        self.scopes = [scope_reader(scope) for scope in scopes]
        dimensions = tuple(dict.fromkeys(dimension for scope in scopes for dimension in scope))
        self.dimensions = dimensions
        #: (the native module, its `Summer` for these dimensions or None), made at first use
        self.summer: tuple[Any, Any] = (None, None)
        #: a span's values of every dimension some scope reads: its keys follow from them
        self.signature = attrgetter(*dimensions) if dimensions else _no_signature
        clocks = [(index, WindowClock(window)) for window, index in windows.items()]
        #: calendar windows only: rolling and session windows start at 0
        self.clocks = [(index, clock) for index, clock in clocks if not clock.fixed]
        self.fixed_starts = [0] * len(windows)
        self._starts: tuple[int, ...] = ()
        self._starts_range = (0, 0)

    def starts(self, event_ns: int) -> list[int]:
        """The start of the window that holds `event_ns`, per window."""
        starts = self.fixed_starts.copy()
        for index, clock in self.clocks:
            starts[index] = clock.start_ns(event_ns)
        return starts

    def starts_at(self, event_ns: int) -> tuple[int, ...]:
        """`starts` as a tuple, the same object while `event_ns` stays in every current window."""
        low, high = self._starts_range
        if low <= event_ns < high:
            return self._starts
        starts = self.fixed_starts.copy()
        low, high = _EARLIEST, _LATEST
        for index, clock in self.clocks:
            start, end = clock.bounds_ns(event_ns)
            starts[index] = start
            low, high = max(low, start), min(high, end)
        self._starts, self._starts_range = tuple(starts), (low, high)
        return self._starts

    def starts_range(self, event_ns: int) -> tuple[tuple[int, ...], int, int]:
        """`starts_at` and the [low, high) range of event times it holds for (the native loop's cache)."""
        starts = self.starts_at(event_ns)
        return (starts, *self._starts_range)


_EARLIEST, _LATEST = -(1 << 63), 1 << 63


def _no_signature(_usage: SpanUsage) -> None:
    """The signature of a span when no budget has a scope (no budgets)."""
    return None


_compiled: tuple[BudgetConfig | None, _BudgetSet] = (None, _BudgetSet(()))


def _budget_set(config: BudgetConfig) -> _BudgetSet:
    """The compiled budgets of `config`, rebuilt when the configuration object changes."""
    global _compiled
    if _compiled[0] is not config:
        _compiled = (config, _BudgetSet(config.budgets))
    return _compiled[1]


#: A delta as `usage_rows` builds it: its `DeltaRow` wire list itself (the call mix appended for
#: budgets that count model calls), so stage 1 sends it as it is. The indices of its fields:
_AMOUNT, _SPANS, _FIRST, _LAST, _MIX = (
    DeltaRow._fields.index(name) for name in ("amount", "spans", "first_event_ns", "last_event_ns", "mix")
)


class _Group:
    """The spans of one batch that go to the same deltas: their count and event-time range.

    A span's amount is added to each of the group's deltas at once (a float sum, so in span
    order, as the per-span path adds it); the count and the first and last event time are
    order-free, so they are kept here and added to the deltas once, at the end (`_settle`).
    """

    __slots__ = ("first", "last", "spans", "targets")

    def __init__(self, targets: list[tuple[list[Any], int, bool]]) -> None:
        self.targets = targets  # (delta row, index of its metric's amount, whether it keeps a call mix)
        self.spans = 0
        self.first = _LATEST
        self.last = 0

    def settle(self) -> None:
        for row, _, _ in self.targets:
            row[_SPANS] += self.spans
            if not row[_FIRST] or self.first < row[_FIRST]:
                row[_FIRST] = self.first
            if self.last > row[_LAST]:
                row[_LAST] = self.last


def _row_for(
    rows: dict[tuple[str, str, int], list[Any]], slot: tuple[str, str, int], calls: bool, bucket_ns: int
) -> list[Any]:
    """The batch's delta row for (budget, key, window start), made empty on first use."""
    row = rows.get(slot)
    if row is None:
        row = rows[slot] = (
            [*slot, 0.0, 0, 0, 0, bucket_ns, [0.0] * MIX_FIELDS]
            if calls
            else [*slot, 0.0, 0, 0, 0, bucket_ns]
        )
    return row


def _targets(
    entries: list[_Entry],
    keys: list[str | None],
    starts: tuple[int, ...],
    rows: dict[tuple[str, str, int], list[Any]],
) -> list[tuple[list[Any], int, bool]]:
    """The delta rows of the budgets that take a span with these keys, made when new (in file order).

    `_count`'s match: a budget takes the span when the span has a key under its scope and the
    budget's match takes the key.
    """
    targets = []
    for budget_id, scope, window, metric, matcher, bucket_ns, calls, _budget in entries:
        key = keys[scope]
        if key is None or (matcher is not None and not matcher.matches(key)):
            continue
        slot = (budget_id, key, starts[window])
        row = rows.get(slot)
        if row is None:  # most (span group, budget) pairs find their row: a call only to make one
            row = _row_for(rows, slot, calls, bucket_ns)
        targets.append((row, metric, calls))
    return targets


def usage_deltas(
    usages: Iterable[SpanUsage],
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None = None,
    source: tuple[int, int] = (-1, -1),
    closed_before_ns: int = 0,
    *,
    per_span: bool = False,
) -> list[UsageDelta]:
    """Sum a batch of spans into deltas for every budget each span matches (`usage_rows`).

    `source` is the (partition, offset) of the message the batch came from.
    """
    rows = usage_rows(usages, config, prices, stats, closed_before_ns, per_span=per_span)
    return [UsageDelta.from_row(row, *source) for row in rows]


def usage_rows(
    usages: Iterable[SpanUsage],
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None = None,
    closed_before_ns: int = 0,
    *,
    per_span: bool = False,
) -> list[list[Any]]:
    """`usage_deltas` as the rows stage 1 sends (`DeltaRow.to_wire()` each), without the objects.

    A small message (10-20 spans) makes tens of deltas, each built, then copied into its row:
    most of stage 1's work per message. Here the row is the delta from the start.

    A late span counts in the window of its event time, unless that window
    ended before `closed_before_ns` (now minus the allowed lateness): budgets
    are decided by then, so it is counted in `stats.too_late` instead (the
    ClickHouse history still records the span).

    Spans in the same windows with the same signature and kind share a `_Group`, matched to its
    deltas once, for its first span; the others only add their amounts (a session's calls of
    one class in one batch match once: nothing is remembered across batches). A span older
    than `closed_before_ns` (whose windows may have closed, budget by budget) goes through the
    per-span reference path (`_count`), and so does every span with `per_span` (the tests compare
    the two) or when a span carries no event time (the first event time then depends on order).

    With the native module (contracts/native, `Summer`) its loop adds the common spans and hands
    every other span to `_Batch.add`, the reference, in order (`_natively_summed`).
    """
    return _summed(usages, config, prices, stats, closed_before_ns, per_span, detached=False)


def usage_rows_detached(
    usages: Iterable[SpanUsage],
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None = None,
    closed_before_ns: int = 0,
) -> Any:
    """`usage_rows` for a micro-batch's native group (`records.new_group_rows`): the native loop's
    own rows (`MessageRows`, which `Groups.add` takes) when it summed every span itself, so no
    Python list is made per row; else `usage_rows`' list, the same rows.

    A small message makes ~39 rows, each a list, a call mix and a dict slot that `GroupRows` then
    regrouped, combined and freed: most of stage 1's per-message rest (BENCHMARKS.md, "Stage 1 on
    small messages").
    """
    return _summed(usages, config, prices, stats, closed_before_ns, False, detached=True)


def _summed(
    usages: Iterable[SpanUsage],
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None,
    closed_before_ns: int,
    per_span: bool,
    *,
    detached: bool,
) -> Any:
    """`usage_rows`, and with `detached` `usage_rows_detached`."""
    usages = usages if isinstance(usages, list) else list(usages)
    budgets = _budget_set(config)
    summer = None if per_span else _summer(budgets)
    if summer is not None:
        rows = _natively_summed(summer, usages, budgets, config, prices, stats, closed_before_ns, detached)
        if rows is not None:
            return rows
    per_span = per_span or not all(usage.end_ns or usage.start_ns for usage in usages)
    batch = _Batch(budgets, config, prices, stats, closed_before_ns, per_span)
    for usage in usages:
        batch.add(usage)
    return batch.finish()


class _Batch:
    """One `usage_rows` call: its rows and groups, and `add`, the per-span reference loop's body.

    The native loop calls `add` for each span it hands over (`prepare` and `count`, split for a
    model call it needs priced or classed first) and `starts_range` when an event time leaves its
    cached window starts; it makes the rows of its own groups in `rows` (`_row_for`'s rows, copied).
    """

    __slots__ = (
        "budgets",
        "charged",
        "closed_before_ns",
        "config",
        "groups",
        "per_span",
        "prices",
        "rows",
        "stats",
    )

    def __init__(
        self,
        budgets: _BudgetSet,
        config: BudgetConfig,
        prices: PriceBook,
        stats: BatchStats | None,
        closed_before_ns: int,
        per_span: bool,
    ) -> None:
        self.budgets, self.config, self.prices, self.stats = budgets, config, prices, stats
        self.closed_before_ns, self.per_span = closed_before_ns, per_span
        self.rows: dict[tuple[str, str, int], list[Any]] = {}
        self.groups: dict[tuple[Any, bool, bool, tuple[int, ...]], _Group] = {}
        #: spans charged by the `unpriced:` rule here: a second reading finds them priced
        self.charged = 0

    def add(self, usage: SpanUsage) -> None:
        """Price, classify and count one span (the reference: every rule is applied here)."""
        self.count(usage, self.prepare(usage))

    def prepare(self, usage: SpanUsage) -> bool:
        """Price the span if it came without a cost, class its model, count it in `stats`; True
        for a model call (the native loop calls it for such calls and then sums the span itself)."""
        stats = self.stats
        charged_as_unpriced = price_if_unpriced(usage, self.prices)  # it decides which spans need a price
        self.charged += charged_as_unpriced
        if not usage.model_class:
            fill_model_class(usage, self.config)
        model_call = usage.is_model_call
        if stats is not None:
            stats.spans += 1
            stats.unpriced += charged_as_unpriced or (model_call and usage.cost_usd is None)
        return model_call

    def count(self, usage: SpanUsage, model_call: bool | None = None) -> None:
        """Add a prepared span to the rows of the budgets it counts for."""
        budgets, stats = self.budgets, self.stats
        if model_call is None:
            model_call = usage.is_model_call
        tool_call = usage.is_tool_call or usage.tool_calls > 0
        refused = usage.is_refused_call  # counted in the call mix only: it used nothing
        if not (model_call or tool_call or refused):
            return
        event_ns = usage.end_ns or usage.start_ns
        amounts = NOTHING if refused else span_amounts(usage)
        calls = model_call or refused
        unusual = None if not calls or (mix := call_mix(usage)) == _PLAIN_CALL else mix
        if self.per_span or event_ns < self.closed_before_ns:
            keys, starts = span_keys(budgets.scopes, usage), budgets.starts(event_ns)
            span = (event_ns, keys, starts, amounts, unusual, self.closed_before_ns)
            _count(budgets.for_kind[(calls, tool_call)], span, self.rows, stats)
            return
        starts = budgets.starts_at(event_ns)
        group_key = (budgets.signature(usage), calls, tool_call, starts)
        group = self.groups.get(group_key)
        if group is None:
            group = self.groups[group_key] = _Group(self.new_targets(usage, calls, tool_call, starts))
        group.spans += 1
        if event_ns < group.first:
            group.first = event_ns
        if event_ns > group.last:
            group.last = event_ns
        for row, metric, counts_calls in group.targets:
            row[_AMOUNT] += amounts[metric]
            if unusual is not None and counts_calls:
                _count_unusual_call(row[_MIX], unusual)

    def new_targets(
        self, usage: SpanUsage, calls: bool, tool_call: bool, starts: tuple[int, ...]
    ) -> list[tuple[list[Any], int, bool]]:
        """The rows of a new group whose first span is `usage` (its keys, matched to the budgets)."""
        budgets = self.budgets
        keys = span_keys(budgets.scopes, usage)
        return _targets(budgets.for_kind[(calls, tool_call)], keys, starts, self.rows)

    def starts_range(self, event_ns: int) -> tuple[tuple[int, ...], int, int]:
        return self.budgets.starts_range(event_ns)

    def finish(self) -> list[list[Any]]:
        """The rows, each group's count and event times settled into them."""
        for group in self.groups.values():
            group.settle()
        _settle_call_mix(self.rows.values())
        return list(self.rows.values())


@dataclass(slots=True)
class NativeSumFailures:
    """Calls of the native loop that raised (a Rust panic included), each batch then summed again
    by the reference from the start, and native modules that could not take a budget set (a build
    older than this file): nothing was lost, but the crate needs a fix or `make venv`."""

    count: int = 0


native_sum_failures = NativeSumFailures()


def _natively_summed(
    summer: Any,
    usages: list[SpanUsage],
    budgets: _BudgetSet,
    config: BudgetConfig,
    prices: PriceBook,
    stats: BatchStats | None,
    closed_before_ns: int,
    detached: bool = False,
) -> Any:
    """`usage_rows` with the native loop; None when it declined the batch (nothing done then).
    With `detached`, the loop's own `MessageRows` where no span was handed over (`add_all_detached`).

    A call that raises is summed again by the reference from the start, with `stats` as they
    were: the spans it priced stay priced (the same price again), and those it charged by the
    `unpriced:` rule are counted as the reference would have counted them.
    """
    before = None if stats is None else (stats.spans, stats.unpriced, stats.too_late)
    batch = _Batch(budgets, config, prices, stats, closed_before_ns, False)
    own = None
    try:
        if detached:
            summed = summer.add_all_detached(usages, batch, closed_before_ns, (MIX_CALLS, MIX_REFUSED))
            counted, own = (None, None) if summed is None else summed
        else:
            counted = summer.add_all(usages, batch, closed_before_ns)
    except NATIVE_ERRORS as exc:  # a panic must not end the worker: the reference sums
        native_sum_failures.count += 1
        logger.error(
            "native usage sums failed (%d so far), the Python loop sums: %r", native_sum_failures.count, exc
        )
        if stats is not None and before is not None:
            stats.spans, stats.unpriced, stats.too_late = before
            stats.unpriced += batch.charged
        return None
    if counted is None:
        return None
    if stats is not None:
        stats.spans += counted
    return batch.finish() if own is None else own


def _summer(budgets: _BudgetSet) -> Any | None:
    """The native loop for `budgets`, None without the module (or with one older than this file,
    which is logged): made once per budget set and module."""
    module = native_sums_in_use()
    if budgets.summer[0] is not module:
        budgets.summer = (module, None if module is None else _new_summer(module, budgets))
    return budgets.summer[1]


def _new_summer(module: Any, budgets: _BudgetSet) -> Any | None:
    """The rules the native loop reads, handed in as data: the usage class, the dimensions of a
    group's signature, what `is_model_call` and `is_tool_call` test, the row layout, each scope's
    dimensions and the key separator (`span_keys`), the budgets' scopes, windows, metrics and
    matchers (`KeyMatcher`s: globs are judged in Python), an empty row per budget made by
    `_row_for` (which the loop copies for a new row), and `for_kind` as entry indices."""
    dimensions = budgets.dimensions
    entries = [
        (
            scope,
            window,
            metric,
            None if matcher is None else (matcher.pattern, matcher),
            _row_for({}, (budget_id, "", 0), calls, bucket_ns),  # the native loop's rows are copies
        )
        for budget_id, scope, window, metric, matcher, bucket_ns, calls, _budget in budgets.entries
    ]
    index_of = {id(entry): index for index, entry in enumerate(budgets.entries)}
    kinds = [
        [index_of[id(entry)] for entry in budgets.for_kind[(calls, tools)]]
        for calls in (False, True)
        for tools in (False, True)
    ]
    try:
        return module.Summer(
            SpanUsage,
            list(dimensions),
            sorted(attr.MODEL_CALL_OPERATIONS),
            attr.OP_EXECUTE_TOOL,
            (_AMOUNT, _SPANS, _FIRST, _LAST),
            [[dimensions.index(name) for name in scope.dimensions] for scope in budgets.scopes],
            KEY_SEPARATOR,
            entries,
            kinds,
            len(budgets.fixed_starts),
        )
    except (AttributeError, TypeError, ValueError) as exc:  # a build older than this file
        native_sum_failures.count += 1
        logger.warning("native usage sums not used (the Python loop is): %s; rebuild: make venv", exc)
        return None


def native_sums_in_use() -> Any | None:
    """The native module `usage_rows` uses: the decoder's (`otlp.native_in_use`, BURNGUARD_NATIVE)."""
    global _native
    if _native is _NOT_CHOSEN:
        _native = native_module_in_use()
    return _native


_NOT_CHOSEN: Any = object()
_native: Any = _NOT_CHOSEN


def _count_unusual_call(mix: list[float], call_mix: tuple[float, ...]) -> None:
    """Add a model call's mix other than a plain call's to a row's (see `_settle_call_mix`)."""
    for index, value in enumerate(call_mix):
        mix[index] += value


def _settle_call_mix(rows: Iterable[list[Any]]) -> None:
    """The calls made of each model-call delta: its spans less the refused ones.

    The per-(span, budget) loop adds only the mix of calls that were not plain ones (refused,
    fell back, escalated). The counts are whole numbers, exact in floats whatever the order of
    the additions; the escalation cost is the same sum as before, its zeros left out.
    """
    for row in rows:
        if len(row) > _MIX:
            mix = row[_MIX]
            mix[MIX_CALLS] = float(row[_SPANS]) - mix[MIX_REFUSED]


#: What `_count` needs of one span: (event_ns, keys per scope, starts per window, amounts per
#: metric, its call mix unless a plain call's or none, closed_before_ns).
_Span = tuple[int, list["str | None"], list[int], tuple[float, ...], "tuple[float, ...] | None", int]


def _count(
    entries: list[_Entry],
    span: _Span,
    rows: dict[tuple[str, str, int], list[Any]],
    stats: BatchStats | None,
) -> None:
    """Add one span to the delta row of each of `entries` it matches (the per-(span, budget) loop)."""
    event_ns, keys, starts, amounts, unusual_mix, closed_before_ns = span
    for budget_id, scope, window, metric, matcher, bucket_ns, calls, budget in entries:
        key = keys[scope]
        if key is None or (matcher is not None and not matcher.matches(key)):
            continue
        if event_ns < closed_before_ns and _window_closed(budget, event_ns, closed_before_ns):
            if stats is not None:
                stats.too_late += 1
            continue
        row = _row_for(rows, (budget_id, key, starts[window]), calls, bucket_ns)
        row[_AMOUNT] += amounts[metric]
        row[_SPANS] += 1
        if not row[_FIRST] or event_ns < row[_FIRST]:
            row[_FIRST] = event_ns
        if event_ns > row[_LAST]:
            row[_LAST] = event_ns
        if calls and unusual_mix is not None:
            _count_unusual_call(row[_MIX], unusual_mix)


def _window_closed(budget: Budget, event_ns: int, closed_before_ns: int) -> bool:
    window = budget.window_spec
    rolling_ns = window_lengths(window)[0]
    if rolling_ns:
        return event_ns + rolling_ns < closed_before_ns
    if window.spec == SESSION_WINDOW:
        return False
    return calendar_bounds_ns(window, event_ns)[1] <= closed_before_ns


def context_observations(usages: Iterable[SpanUsage], config: BudgetConfig) -> list[list[Any]]:
    """Per (context guard, session): [guard, session, the input tokens of its model calls in event order]."""
    if not config.context_guards:
        return []
    calls: dict[str, list[tuple[int, int]]] = {}
    for usage in usages:
        if usage.session and usage.is_model_call and usage.input_tokens:
            calls.setdefault(usage.session, []).append((usage.end_ns, usage.input_tokens))
    return [
        [guard.id, session, [tokens for _, tokens in sorted(observed)]]
        for guard in config.context_guards
        for session, observed in calls.items()
    ]


@dataclass(slots=True)
class ContextGrowth:
    """How a session's input tokens per call developed: the last size and the growth streak."""

    last_input: int = 0
    streak: int = 0  # consecutive calls whose input grew
    calls: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    #: The stream's clock when the session was last observed, so an idle session can be forgotten.
    seen_ns: int = 0

    def observe(
        self, inputs: list[int], source_partition: int, source_offset: int, clock_ns: int = 0
    ) -> bool:
        """Add a batch of observations unless it is a replay; True if added."""
        if source_partition >= 0:
            source = str(source_partition)
            if source_offset <= self.applied.get(source, -1):
                return False
            self.applied[source] = source_offset
        self.seen_ns = max(self.seen_ns, clock_ns)
        for tokens in inputs:
            self.streak = self.streak + 1 if self.calls and tokens > self.last_input else 0
            self.last_input = tokens
            self.calls += 1
        return True

    def to_state(self) -> list[Any]:
        return [self.last_input, self.streak, self.calls, self.applied, self.seen_ns]

    @classmethod
    def from_state(cls, state: list[Any] | None) -> ContextGrowth:
        """From `to_state`, or from the four fields written before `seen_ns` (seen at 0: idle)."""
        if not state:
            return cls()
        last_input, streak, calls, applied, *rest = state
        return cls(last_input, streak, calls, dict(applied), int(rest[0]) if rest else 0)
