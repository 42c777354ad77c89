"""Taking over partitions: read each one again from its committed offset once recovery is over.

The stall of faust-streaming#629, as it happens here (faust-streaming 0.15.3,
aiokafka 0.14; state dumps of stalled workers are described in
`stream/liveness.py`): while a worker restores its tables after a rebalance,
Faust's fetcher already runs, and it marks records read (its read offset)
even when the agents' flow is suspended and the record was never delivered.
At the end of recovery Faust seeks back to the committed offsets, but only
for partitions with a commit above 0, and before the flow resumes. A
partition whose previous owner died before its first commit keeps its
position at the end of what was fetched: the worker is Ready, fetches, and
never processes those records; and records fetched between that seek and the
flow resuming are skipped the same way on any partition. When newer records
then arrive and get committed, the skipped ones are lost without any lag to
show for it.

So once Faust reports the rebalance fully completed (the flow running again),
`RewindAfterRecovery` seeks every partition the agents read to its committed
offset, or to the log start where there is none, through Faust's own `seek`,
which resets the read offset with the position. Records that were delivered
after all are read twice: the totals' per-source-offset marks
(`accounting.WindowTotals.applied`) recognise the second reading, and a bad
message is dead-lettered once per process. The cost is re-reading up to one
commit interval per rebalance.

Every seek here runs inside Faust's fetcher loop, between two fetched
batches (`BetweenFetches`), never from another task. A seek from another
task lands while the fetcher still holds records fetched before it: the next
of those, above the new read offset, makes Faust take the offsets in between
as a gap (counted as acked; with no commit yet, no check at all) and moves
the read offset past them again, so the records the seek was for are dropped
as already read when they arrive, and the commit goes past them: lost, with
no lag and no stall to show (seen under CPU load: the rewind after a SIGKILL
takeover, and the watchdog's seek, each lost a tenant's records that way).
Between batches the fetcher holds no record, so the seek's read offset is
the one the next record is compared with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import faust
from aiokafka.protocol.commit import OffsetCommitRequest
from faust.exceptions import ConsumerNotStarted
from faust.types import TP, AppT

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: The attributes of the Faust consumer that hold its `BetweenFetches` and `InOrderReads`.
_HOOK = "_burnguard_between_fetches"
_IN_ORDER = "_burnguard_in_order_reads"


class FetcherStopped(Exception):
    """The fetcher stopped (a rebalance, or the worker stopping) before the seek ran."""


class BetweenFetches:
    """Runs seeks in Faust's fetcher loop before its next fetch, when it holds no fetched record.

    Installed by wrapping the consumer's `getmany`, which the fetcher loop calls
    once per batch and iterates to the end before calling it again. The
    fetcher looks `getmany` up each time it starts, so the wrapper must be in
    place before then: `SeeksBetweenFetches` installs it when a rebalance starts.
    """

    def __init__(self, consumer: Any) -> None:
        self._pending: list[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = []
        fetch = consumer.getmany

        async def getmany(timeout: float) -> AsyncIterator[Any]:
            await self.run_pending()
            async for item in fetch(timeout=timeout):
                yield item

        consumer.getmany = getmany

    async def run(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action` in the fetcher loop before its next fetch; its result or its exception."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((action, future))
        return await future

    async def run_pending(self) -> None:
        """Run what was asked for since the last fetch, in order (the fetcher loop calls this)."""
        pending, self._pending = self._pending, []
        for index, (action, future) in enumerate(pending):
            if future.done():  # the caller gave up waiting
                continue
            try:
                result = await action()
            except asyncio.CancelledError:  # the fetcher is being stopped: the rest never run
                for _, waiting in pending[index:]:
                    if not waiting.done():
                        waiting.set_exception(FetcherStopped())
                raise
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)


def _installed(consumer: Any, attribute: str, install: Callable[[Any], T]) -> T:
    """What `install` made for this consumer: made on first use, kept on the consumer (one each)."""
    installed = getattr(consumer, attribute, None)
    if installed is None:
        installed = install(consumer)
        setattr(consumer, attribute, installed)
    return installed


def between_fetches(consumer: Any) -> BetweenFetches:
    """The consumer's `BetweenFetches`, installed on first use."""
    return _installed(consumer, _HOOK, BetweenFetches)


class InOrderReads:
    """The agents read each partition in offset order from its commit, or not at all.

    The totals' replay marks (`accounting.WindowTotals.applied`) keep the
    highest source offset applied: a record applied after a higher one of its
    partition counts as a replay, so every record Faust skips and delivers
    later is lost (seen under CPU load: after a takeover the agents got a
    partition from offset 76 before the rewind, and 1..75 later). So each
    agent admits a record only at the next offset it expects, kept per
    partition: set to the commit by every seek here, moved on by each record
    admitted. A record past it is not processed, and the partition is sought
    back to the expected offset (between fetches); one below it is a
    re-reading, which the marks recognise. A partition without an expected
    offset (taken over, not yet rewound) is rewound to its commit first.
    Records deleted by retention before they were read are passed over, with
    a warning. The topics must not hold transaction markers (no producer of
    them is transactional): an offset without a record would be sought back
    to for ever, and the watchdog would end it with exit 70.

    Faust would commit a record it was given, processed or not, and with no
    commit yet it commits past a gap: so its commits of these partitions are
    capped at the expected offset.

    The partitions of `written_topics` are capped too at `written`: the
    offset below which every processed record's output is delivered (stage
    2's table changes, `stream/changelog.py`; stage 1's micro-batches,
    `stream/deliveries.py`); nothing is committed there before the first.
    Faust forgets the acks it takes for a commit, so the acks at or above
    this cap are kept back for a later commit (Faust would otherwise see a
    gap after the cap and never commit that partition again).
    """

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.fetches = between_fetches(consumer)
        #: the topics whose partitions are read in order (the agents')
        self.topics: set[str] = set()
        #: per partition, the next offset the agents are to process
        self.expected: dict[TP, int] = {}
        #: the topics whose commits also wait for their records' output to be delivered
        self.written_topics: set[str] = set()
        #: per partition of `written_topics`, the offset below which the output is delivered
        self.written: dict[TP, int] = {}
        self._seeking: dict[TP, asyncio.Task[None]] = {}
        new_offset = consumer._new_offset

        def capped_new_offset(tp: TP) -> int | None:
            if tp.topic not in self.topics:
                return new_offset(tp)
            if tp.topic in self.written_topics:
                offset = self._new_offset_below(tp, self.written.get(tp), new_offset)
            else:
                offset = new_offset(tp)
            expected = self.expected.get(tp)
            return None if offset is None or expected is None else min(offset, expected)

        consumer._new_offset = capped_new_offset

    def _new_offset_below(
        self, tp: TP, cap: int | None, new_offset: Callable[[TP], int | None]
    ) -> int | None:
        """Faust's `_new_offset` over the acks below `cap` only; the others stay for a later commit."""
        if cap is None:
            return None
        acked = self.consumer._acked[tp]
        later = [offset for offset in acked if offset >= cap]
        if not later:
            return new_offset(tp)
        acked[:] = [offset for offset in acked if offset < cap]
        try:
            return new_offset(tp)
        finally:
            acked.extend(later)
            acked.sort()

    def admit(self, message: Any) -> bool:
        """Whether an agent may process this record now (see the class doc)."""
        tp, offset = message.tp, message.offset
        if tp.topic not in self.topics:
            return True
        expected = self.expected.get(tp)
        if expected is None:
            self._seek_later(tp, None)
            return False
        if offset < expected:
            return True
        if offset == expected:
            self.expected[tp] = offset + 1
            return True
        if tp in self._seeking:
            return False
        logger.info(
            "%s[%d]: got offset %d before %d: reading again from %d",
            tp.topic,
            tp.partition,
            offset,
            expected,
            expected,
        )
        self._seek_later(tp, expected)
        return False

    def read_again(self, first: Mapping[TP, int]) -> None:
        """Read each partition again from `first[tp]` before any record past it (a failed send).

        Faust restarts an agent whose batch raised and hands it the records after that batch, whose
        events it acks anyway: the expected offset goes back (capping the commits), and is sought to.
        """
        for tp, offset in first.items():
            expected = self.expected.get(tp)
            if expected is not None and offset < expected:
                logger.info(
                    "%s[%d]: reading again from %d (its micro-batch was not sent)",
                    tp.topic,
                    tp.partition,
                    offset,
                )
                self.expected[tp] = offset
                self._seek_later(tp, offset)

    def _seek_later(self, tp: TP, offset: int | None) -> None:
        """Seek `tp` to `offset` (its commit when None) between fetches, once at a time."""
        if tp in self._seeking:
            return
        task = asyncio.ensure_future(self._seek(tp, offset))
        self._seeking[tp] = task
        task.add_done_callback(lambda _: self._seeking.pop(tp, None))

    async def _seek(self, tp: TP, offset: int | None) -> None:
        try:
            if offset is None:
                targets = await self.fetches.run(lambda: rewind_now(self.consumer, {tp}))
                logger.info("rewound to the committed offsets: %s", _describe(targets))
            else:
                await self.fetches.run(lambda: self._seek_back_now(tp, offset))
        except Exception as exc:  # revoked meanwhile, or the fetcher stopped: the next record retries
            logger.warning("could not seek %s[%d] back: %r", tp.topic, tp.partition, exc)

    async def _seek_back_now(self, tp: TP, offset: int) -> None:
        """Seek back to `offset`, or to the log start when retention deleted the records from there."""
        start = (await self.consumer.earliest_offsets(tp)).get(tp, 0)
        if start > offset:
            logger.warning(
                "%s[%d]: offsets %d..%d were deleted (retention) before they were read: reading on from %d",
                tp.topic,
                tp.partition,
                offset,
                start - 1,
                start,
            )
            offset = start
        await _seek_each(self.consumer, {tp: offset})

    def forget_unassigned(self) -> None:
        """Drop what is kept for partitions no longer assigned."""
        assigned = self.consumer.assignment()
        for tp in [tp for tp in self.expected if tp not in assigned]:
            del self.expected[tp]
        for tp in [tp for tp in self.written if tp not in assigned]:
            del self.written[tp]


def in_order_reads(consumer: Any) -> InOrderReads:
    """The consumer's `InOrderReads`, installed on first use (with its `BetweenFetches`)."""
    return _installed(consumer, _IN_ORDER, InOrderReads)


class PartitionsLost(Exception):
    """The group expelled this worker before it gave its partitions up: another may own them already."""


def membership_lost(consumer: Any) -> bool:
    """Whether the group no longer counts this worker as a member (Faust's consumer).

    aiokafka resets the generation when the broker expelled the member (its
    session expired: a stalled loop, a network split) or moved on to a newer
    generation without it; it notices at its next heartbeat, commit or
    sync, and then calls the revoke listener before rejoining. Such a revoke
    is not the one an ordinary rebalance waits for: the partitions may have
    been assigned to another worker already, which writes their changelogs.
    A consumer not started yet has never joined, so it has lost nothing.
    """
    try:
        aiokafka_consumer = consumer._thread._ensure_consumer()
    except ConsumerNotStarted:
        return False
    return aiokafka_consumer._coordinator.generation == OffsetCommitRequest.DEFAULT_GENERATION_ID


class StallGuard:
    """Holds a changelog write back after this process stood still, until the group still counts it.

    The heartbeats run in the consumer's thread; they stop only when the whole
    process stops (SIGSTOP, a paused VM, swapping). Resumed after more than
    the session timeout, the worker is expelled but does not know it until
    its next heartbeat is answered, a few milliseconds later; a write handed
    to the producer in between (the flush timer wakes first) puts its older
    values into changelogs another worker owns by then, after that worker's
    newer ones: a recovery reads them last and loses the counts in between.

    So something `tick`s at least every `period_s` (a quarter of the session
    timeout); a gap of more than half the session timeout since the last tick
    means the process stood still, possibly long enough to be expelled (an
    expulsion takes a stall of the session timeout less a heartbeat
    interval, at most a quarter of it), and the next write first waits (up
    to two heartbeat intervals) for aiokafka to report the membership lost.
    It writes only if it was not.
    """

    def __init__(self, app: AppT) -> None:
        self.app = app
        self.period_s = app.conf.broker_session_timeout / 4
        self.stall_s = app.conf.broker_session_timeout / 2
        self.confirm_s = 2 * app.conf.broker_heartbeat_interval + 0.5
        self._seen = time.monotonic()
        self._suspect = False

    def tick(self) -> None:
        """Called at least every `period_s` while the process runs (the changelog-flush timer)."""
        now = time.monotonic()
        if now - self._seen > self.stall_s:
            self._suspect = True
        self._seen = now

    async def still_member(self) -> bool:
        """Whether a write may go out now (see the class doc)."""
        self.tick()
        if self._suspect:
            deadline = time.monotonic() + self.confirm_s
            while time.monotonic() < deadline and not membership_lost(self.app.consumer):
                await asyncio.sleep(0.05)
            self._suspect = membership_lost(self.app.consumer)
        return not self._suspect


class SeeksBetweenFetches(faust.Sensor):
    """A Faust sensor that installs `BetweenFetches` before the fetcher (re)starts."""

    def on_rebalance_start(self, app: AppT) -> dict:
        between_fetches(app.consumer)
        return super().on_rebalance_start(app)


class RewindAfterRecovery(SeeksBetweenFetches):
    """A Faust sensor: after every rebalance, re-read the agents' partitions from the commit.

    It also makes the agents read `topics` in order (`InOrderReads`), and caps
    the commits of `written_topics` at what their delivered output covers.
    """

    def __init__(self, app: AppT, topics: Iterable[str], written_topics: Iterable[str] = ()) -> None:
        super().__init__()
        self.app = app
        self.topics = frozenset(topics)
        self.written_topics = frozenset(written_topics)
        self._rewinding: set[asyncio.Task[None]] = set()

    def on_rebalance_start(self, app: AppT) -> dict:
        reads = in_order_reads(app.consumer)
        reads.topics.update(self.topics)
        reads.written_topics.update(self.written_topics)
        return super().on_rebalance_start(app)

    def on_rebalance_end(self, app: AppT, state: dict[str, Any]) -> None:
        """Faust calls this once recovery has finished and the flow has resumed."""
        task = asyncio.ensure_future(self.rewind())
        self._rewinding.add(task)
        task.add_done_callback(self._rewinding.discard)

    async def rewind(self) -> None:
        """Seek each assigned partition of `topics` to its commit (log start if none), between fetches."""
        consumer = self.app.consumer
        reads = in_order_reads(consumer)
        try:
            targets = await reads.fetches.run(lambda: rewind_now(consumer, self._assigned(consumer)))
        except Exception as exc:  # a rebalance took the partitions meanwhile: it ends in a rewind too
            logger.warning("could not rewind to the committed offsets: %r", exc)
            return
        reads.forget_unassigned()
        if targets:
            logger.info("rewound to the committed offsets: %s", _describe(targets))

    def _assigned(self, consumer: Any) -> set[TP]:
        return {tp for tp in consumer.assignment() if tp.topic in self.topics}


async def rewind_now(consumer: Any, partitions: set[TP]) -> dict[TP, int]:
    """Seek `partitions` to their commit (log start where none): only ever between fetches."""
    if not partitions:
        return {}
    committed = await consumer.seek_to_committed()
    targets = {tp: committed[tp] for tp in partitions if committed.get(tp)}
    uncommitted = partitions - targets.keys()
    if uncommitted:
        targets.update(await consumer.earliest_offsets(*uncommitted))
    await _seek_each(consumer, targets)
    return targets


async def seek_back(consumer: Any, targets: Mapping[TP, int]) -> None:
    """Seek each partition to its offset, in the fetcher loop between two batches (see module doc)."""
    await between_fetches(consumer).run(lambda: _seek_each(consumer, targets))


async def _seek_each(consumer: Any, targets: Mapping[TP, int]) -> None:
    """Seek through Faust's own `seek`, which resets Faust's read offset along with the position.

    A seek on aiokafka alone would leave the read offset where it was, and
    Faust drops records below it as already read.
    """
    reads = getattr(consumer, _IN_ORDER, None)
    for tp, offset in sorted(targets.items()):
        await consumer.seek(tp, offset)
        if reads is not None and tp.topic in reads.topics:
            reads.expected[tp] = offset


def _describe(targets: dict[TP, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(targets.items()))
