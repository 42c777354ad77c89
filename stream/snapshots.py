"""Budget usage snapshots on their way out: which windows wait for one, and their record batches.

The snapshot timer (`BudgetJob._snapshot`) writes one `budget_usage` record per changed window
every few seconds: tens of thousands per run under load. Each used to cost a `producer.send`
(a coroutine, a future and the accumulator's checks) and a murmur2 hash of its key; now the
records go into aiokafka record batches through `stream/record_batches.py:RecordBatches` (queued per
partition, handed over in order, one delivery future per batch), and what a window's records
share from run to run (its Kafka key, partition and the JSON up to its bounds) is remembered.

Delivery. A snapshot whose batch fails (refused by the broker, the hand-over failing, the
producer stopping, or not ready to take it) is not dropped: its window is snapshotted again at
the next run, from the totals then current, so a retry never writes an older value over a newer
one. A window evicted since keeps the failed record's bytes as its last snapshot, unless a
later snapshot of the same window was taken (that one settles it); a window whose partition
moved to another worker is snapshotted at the revoke if it waits for one (`leaving`), then left
to its new owner (`disown`): Faust's memory store keeps its totals here, going stale. The revoke
waits until every batch holding a revoked window is settled (`in_flight`), so none lands after the
new owner's snapshots, and one that fails is covered by them (`on_rebalance_complete` snapshots every
window of the assigned partitions, also when this worker keeps the partition). The stall
guard is asked before each hand-over, as for the changelog. The timer never waits for
the broker: while a partition has too many batches queued, the rest of the run waits, as window
keys, for the next run. Failures are counted and logged, never silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from operator import attrgetter
from typing import Any, NamedTuple

from aiokafka.errors import MessageSizeTooLargeError
from burnguard.contracts.budgets import Budget
from burnguard.contracts.snapshots import (
    usage_bounds,
    usage_head_of,
    usage_head_parts,
    usage_kafka_key_parts,
    usage_value,
)
from burnguard.stream.partitioner import key_partition, native_part
from burnguard.stream.record_batches import RECORD_OVERHEAD_BYTES, RecordBatches, check_size
from faust.types import AppT

logger = logging.getLogger(__name__)

#: Windows whose Kafka key, partition and JSON head are remembered at most (~250 bytes each): a
#: window past that is encoded from scratch at each snapshot, not remembered in place of another
#: (the timer walks the windows in a cycle, where evicting one for another would never hit).
SNAPSHOT_KEYS_KEPT = 1 << 16


def usage_value_writer() -> Callable[[bytes, bytes, float, float, int, bytes], bytes]:
    """`usage_value` as the snapshot timer writes it, chosen once (`native_part`): the native
    `UsageValues.write` where the native module is in use (the amounts written by
    contracts/native/src/snapshot.rs, ~0.2 us where the reference takes ~1.2; what it does not
    write exactly is handed to `usage_value`), else `usage_value`. The same bytes either way."""
    return native_part("UsageValues", _new_usage_values) or usage_value


def _new_usage_values(native: Any) -> Callable[[bytes, bytes, float, float, int, bytes], bytes] | None:
    """The `write` of a `UsageValues` made by the native module's class `native`, or None (an older build)."""
    try:
        return native(usage_value).write
    except (AttributeError, TypeError, ValueError) as exc:
        logger.warning("native snapshot values not used (the Python ones are): %s; rebuild: make venv", exc)
        return None


class WindowKey(NamedTuple):
    """What a window's snapshots share while its budget stays the same object (a tuple, made at a
    window's first snapshot, which is most snapshots under session keys: a frozen dataclass's
    `__init__` sets each field through `object.__setattr__`)."""

    budget: Budget
    kafka_key: bytes
    partition: int
    head: bytes


class WindowParts(NamedTuple):
    """What the snapshots of a budget's windows with one start share in a run (`SnapshotRun.parts`):
    the window's start and `usage_bounds`, and the Kafka key's and JSON head's bytes around the key
    (`usage_kafka_key_parts`, `usage_head_parts`), so a window's first snapshot only joins them."""

    budget: Budget
    start: datetime
    bounds: bytes
    kafka_key: tuple[bytes, bytes]
    head: tuple[bytes, bytes]


def window_parts(budget: Budget, start: datetime, end: datetime) -> WindowParts:
    """The `WindowParts` of the budget's windows spanning `start` to `end`."""
    scope = budget.scope_name
    before, after = usage_kafka_key_parts(scope, budget.id, budget.window, start)
    head = usage_head_parts(budget.id, scope, budget.metric, budget.window)
    kafka_key = (before.encode(), after.encode())
    return WindowParts(budget, start, usage_bounds(start, end), kafka_key, head)


class Snapshot(NamedTuple):
    """One `budget_usage` record of a window (`state_key`), numbered in the order it was taken."""

    state_key: str
    kafka_key: bytes
    partition: int
    value: bytes
    taken: int


class UsageSnapshots:
    """The windows waiting for a snapshot, and the snapshot records handed to the producer.

    `live(state_key)` says whether the window is still in the totals table (else it was
    evicted: a failed snapshot of it is kept as its last one, not snapshotted again).
    """

    def __init__(self, app: AppT, topic: str, partitions: int, live: Callable[[str], bool]) -> None:
        self.app = app
        self.topic = topic
        self.partitions = partitions
        self.live = live
        #: a failed batch stops nothing: its windows are snapshotted again (`_settle`)
        self.batches = RecordBatches(app, stop_on_failure=False)
        #: changed windows not yet snapshotted, oldest first change first (a dict as an ordered set;
        #: stage 2 adds to it on every delta, so it is a plain dict, not a method)
        self.waiting: dict[str, None] = {}
        #: windows whose snapshot failed: snapshotted first at the next run
        self.retrying: dict[str, None] = {}
        #: evicted windows' last snapshots not yet handed over (sent first at the next run)
        self.finals: dict[str, Snapshot] = {}
        #: per window with a snapshot not yet delivered, the number of its latest one
        self._latest: dict[str, int] = {}
        #: windows this worker evicted while their latest snapshot was not yet delivered
        self._evicted: set[str] = set()
        self._keys: dict[str, WindowKey] = {}
        #: each partition's outcome of a `write` not settled yet, with its snapshots (`in_flight`)
        self._outcomes: dict[asyncio.Future[Any], list[Snapshot]] = {}
        self._taken = 0
        #: snapshots whose batch failed (each retried), and records refused for their size (lost)
        self.failed = 0
        self.too_large = 0

    def take(self, limit: int) -> list[str]:
        """Up to `limit` windows to snapshot in this run: the retried ones first, then the oldest changes.

        They stay in line until their slice `claim`s them: the timer pauses between slices, and
        an eviction (or a revoke) meanwhile must still find a window waiting.
        """
        candidates = dict.fromkeys([*islice(self.retrying, limit), *islice(self.waiting, limit)])
        return list(islice(candidates, limit))

    def claim(self, state_keys: Iterable[str]) -> list[str]:
        """Of the windows `take` gave, those still in line (not evicted nor moved away since), out of
        line: they are snapshotted now."""
        claimed = []
        for state_key in state_keys:
            retrying = self.retrying.pop(state_key, _ABSENT) is not _ABSENT
            if self.waiting.pop(state_key, _ABSENT) is not _ABSENT or retrying:
                claimed.append(state_key)
        return claimed

    def put_back(self, state_keys: Iterable[str]) -> None:
        """Windows taken but not claimed in this run (if still in line): first in line at the next one."""
        for state_key in state_keys:
            if self.waiting.pop(state_key, _ABSENT) is not _ABSENT or state_key in self.retrying:
                self.retrying[state_key] = None

    def leaving(self, gone: Callable[[str], bool]) -> list[str]:
        """The windows in line whose partition is being revoked (`gone`), out of line: snapshotted at
        the revoke, while the next owner does not read yet; later this worker's totals of them
        (Faust's memory store keeps them) could be older than the new owner's."""
        return self.claim(
            [state_key for state_key in dict.fromkeys([*self.retrying, *self.waiting]) if gone(state_key)]
        )

    def nothing_to_take(self, state_key: str) -> None:
        """The window has no snapshot to take (its budget removed, its totals emptied): a failed one
        of it is not retried, and nothing of it is kept."""
        self._latest.pop(state_key, None)
        self._evicted.discard(state_key)

    def disown(self, gone: Callable[[str], bool]) -> None:
        """Forget the windows whose partition moved away (`gone`): none is snapshotted again by this
        worker, a failed snapshot of theirs included. Not the windows this worker evicted: their
        failed last snapshot is their last value (no owner holds them any more)."""
        for state_key in [state_key for state_key in self._latest if gone(state_key)]:
            if state_key not in self._evicted:
                del self._latest[state_key]
        for line in (self.retrying, self.waiting, self._keys):
            for state_key in [state_key for state_key in line if gone(state_key)]:
                del line[state_key]

    def evicting(self, state_key: str, build: Callable[[], Snapshot | None]) -> None:
        """The window leaves the table: its last change, if not yet snapshotted, is kept as its final
        snapshot (`build`), handed over at the next run before any other."""
        waiting = self.waiting.pop(state_key, _ABSENT) is not _ABSENT
        if (self.retrying.pop(state_key, _ABSENT) is not _ABSENT or waiting) and (snapshot := build()):
            self.finals[state_key] = snapshot
        self._keys.pop(state_key, None)  # after `build`, which remembers it
        if state_key in self._latest:  # its latest snapshot holds its last value: sent again if it fails
            self._evicted.add(state_key)

    def forget_keys(self) -> None:
        """Drop what is remembered of each window (the budgets changed)."""
        self._keys.clear()

    def window_key(self, state_key: str, key: str, parts: WindowParts) -> WindowKey:
        """The window's Kafka key, partition and JSON head, remembered while its budget is the same object.

        Made from the parts its budget's windows share (`WindowParts`): the key's bytes and its
        JSON string (`usage_head_of`) joined in between. A calendar window's start is in its Kafka
        key, and fixed; a rolling or session window's key leaves it out (`usage_kafka_key_parts`).
        """
        budget = parts.budget
        known = self._keys.get(state_key)
        if known is not None and known.budget is budget:
            return known
        kafka_key = parts.kafka_key[0] + key.encode() + parts.kafka_key[1]
        head = usage_head_of(parts.head, key)
        made = _tuple_new(WindowKey, (budget, kafka_key, key_partition(kafka_key, self.partitions), head))
        if known is not None or len(self._keys) < SNAPSHOT_KEYS_KEPT:
            self._keys[state_key] = made
        return made

    def snapshot(self, state_key: str, window: WindowKey, value: bytes) -> Snapshot:
        """A numbered snapshot record of the window (later ones settle what earlier ones failed to)."""
        taken = self._taken = self._taken + 1
        self._latest[state_key] = taken
        self._evicted.discard(state_key)
        return _tuple_new(Snapshot, (state_key, window.kafka_key, window.partition, value, taken))

    def take_finals(self) -> list[Snapshot]:
        """Evicted windows' last snapshots, to hand over before the run's others (a window's older
        record, if one is still queued, is in an earlier batch of the same partition)."""
        finals, self.finals = list(self.finals.values()), {}
        return finals

    def crowded(self) -> bool:
        """Whether some partition has too many batches queued: the run's rest waits for the next run."""
        return self.batches.crowded()

    def write(self, snapshots: list[Snapshot]) -> list[asyncio.Future[Any]]:
        """Queue the snapshots in their partitions' record batches, in order; a failed batch's
        windows are snapshotted again (`_settle`). Never waits; returns a future per partition's
        records, done (never failed) once they are settled.

        Raises what the producer raised when it could not take a batch (not ready, stopping):
        those snapshots and the ones after them are settled as failed, so retried.
        """
        by_partition: dict[int, list[Snapshot]] = {}
        max_bytes = int(self.app.conf.producer_max_request_size)
        surely_fits = max_bytes - RECORD_OVERHEAD_BYTES
        for snapshot in snapshots:
            size = len(snapshot.kafka_key) + len(snapshot.value)
            if size > surely_fits and not self._fits(snapshot, max_bytes):
                continue
            group = by_partition.get(snapshot.partition)
            if group is None:
                by_partition[snapshot.partition] = [snapshot]
            else:
                group.append(snapshot)
        groups, outcomes = list(by_partition.items()), []
        for index, (partition, group) in enumerate(groups):
            try:
                delivered = self.batches.append(self.topic, partition, map(_RECORD, group))
            except Exception as exc:
                for _, untaken in groups[index:]:
                    self._settle(untaken, exc)
                raise
            outcome = asyncio.gather(*delivered, return_exceptions=True)
            outcome.add_done_callback(lambda done, group=group: self._settle(group, _failure(done)))
            self._outcomes[outcome] = group
            outcome.add_done_callback(self._outcomes.pop)
            outcomes.append(outcome)
        return outcomes

    def in_flight(self, gone: Callable[[str], bool]) -> list[asyncio.Future[Any]]:
        """The outcomes not settled yet of batches holding a window of a revoked partition (`gone`).

        The revoke waits for them, not only for its own (`leaving`): one queued before it, of a window
        unchanged since, would otherwise be handed over after the revoke, and could land after the
        new owner's snapshot of the window (a rolling window's `spent` and `updated_at` move with
        time), or fail when no one retries it here.
        """
        return [
            outcome
            for outcome, group in self._outcomes.items()
            if any(gone(snapshot.state_key) for snapshot in group)
        ]

    def _fits(self, snapshot: Snapshot, max_bytes: int) -> bool:
        """Whether the record is within the producer's max request size; a larger one can never be
        written: logged with its key and counted, not retried."""
        try:
            check_size(self.topic, snapshot.kafka_key, snapshot.value, max_bytes)
        except MessageSizeTooLargeError as exc:
            self.too_large += 1
            self._latest.pop(snapshot.state_key, None)
            logger.error("budget usage snapshot of %r not written: %s", snapshot.state_key, exc)
            return False
        return True

    def _settle(self, group: list[Snapshot], failure: BaseException | None) -> None:
        """After a batch: delivered, each window's latest snapshot is done; failed, each window whose
        latest snapshot this was gets another (a live one from its current totals at the next run,
        one this worker evicted these bytes again). A window that left otherwise (its partition
        moved to another worker, whose snapshots may be newer) gets none from this worker."""
        if failure is not None:
            self.failed += len(group)
            logger.warning(
                "%d budget usage snapshots not delivered, retried at the next run (but for windows whose"
                " partition moved to another worker): %r",
                len(group),
                failure,
            )
        for snapshot in group:
            state_key = snapshot.state_key
            if self._latest.get(state_key) != snapshot.taken:
                continue  # a later snapshot of the window was taken: it settles the window
            if failure is not None and self.live(state_key):
                self.retrying[state_key] = None
            elif failure is not None and state_key in self._evicted:  # these bytes are its last value
                self.finals[state_key] = snapshot
            else:
                del self._latest[state_key]
                self._evicted.discard(state_key)


def _failure(done: asyncio.Future[list[Any]]) -> BaseException | None:
    """The first failure among a gathered group of delivery futures, or None if all were delivered."""
    if done.cancelled():
        return asyncio.CancelledError()
    return next((result for result in done.result() if isinstance(result, BaseException)), None)


#: `dict.pop`'s default for a window not waiting.
_ABSENT = object()
#: A snapshot's (Kafka key, value), as `RecordBatches.append` takes a record.
_RECORD = attrgetter("kafka_key", "value")
#: Makes a `Snapshot` or a `WindowKey` from a tuple of its fields: a NamedTuple's own `__new__` is
#: a Python function (~0.35 us against ~0.15), and the timer makes one or two per window.
_tuple_new = tuple.__new__
