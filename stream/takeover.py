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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import faust
from faust.types import TP, AppT

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: The attribute of the Faust consumer that holds its `BetweenFetches`.
_HOOK = "_burnguard_between_fetches"


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


def between_fetches(consumer: Any) -> BetweenFetches:
    """The consumer's `BetweenFetches`, installed on first use."""
    hook = getattr(consumer, _HOOK, None)
    if hook is None:
        hook = BetweenFetches(consumer)
        setattr(consumer, _HOOK, hook)
    return hook


class SeeksBetweenFetches(faust.Sensor):
    """A Faust sensor that installs `BetweenFetches` before the fetcher (re)starts."""

    def on_rebalance_start(self, app: AppT) -> dict:
        between_fetches(app.consumer)
        return super().on_rebalance_start(app)


class RewindAfterRecovery(SeeksBetweenFetches):
    """A Faust sensor: after every rebalance, re-read the agents' partitions from the commit."""

    def __init__(self, app: AppT, topics: Iterable[str]) -> None:
        super().__init__()
        self.app = app
        self.topics = frozenset(topics)
        self._rewinding: set[asyncio.Task[None]] = set()

    def on_rebalance_end(self, app: AppT, state: dict[str, Any]) -> None:
        """Faust calls this once recovery has finished and the flow has resumed."""
        task = asyncio.ensure_future(self.rewind())
        self._rewinding.add(task)
        task.add_done_callback(self._rewinding.discard)

    async def rewind(self) -> None:
        """Seek each assigned partition of `topics` to its commit (log start if none), between fetches."""
        consumer = self.app.consumer
        try:
            targets = await between_fetches(consumer).run(lambda: self._rewind_now(consumer))
        except Exception as exc:  # a rebalance took the partitions meanwhile: it ends in a rewind too
            logger.warning("could not rewind to the committed offsets: %r", exc)
            return
        if targets:
            logger.info("rewound to the committed offsets: %s", _describe(targets))

    async def _rewind_now(self, consumer: Any) -> dict[TP, int]:
        partitions = {tp for tp in consumer.assignment() if tp.topic in self.topics}
        if not partitions:
            return {}
        targets = await self._targets(consumer, partitions)
        await _seek_each(consumer, targets)
        return targets

    @staticmethod
    async def _targets(consumer: Any, partitions: set[TP]) -> dict[TP, int]:
        committed = await consumer.seek_to_committed()
        targets = {tp: committed[tp] for tp in partitions if committed.get(tp)}
        uncommitted = partitions - targets.keys()
        if uncommitted:
            targets.update(await consumer.earliest_offsets(*uncommitted))
        return targets


async def seek_back(consumer: Any, targets: Mapping[TP, int]) -> None:
    """Seek each partition to its offset, in the fetcher loop between two batches (see module doc)."""
    await between_fetches(consumer).run(lambda: _seek_each(consumer, targets))


async def _seek_each(consumer: Any, targets: Mapping[TP, int]) -> None:
    """Seek through Faust's own `seek`, which resets Faust's read offset along with the position.

    A seek on aiokafka alone would leave the read offset where it was, and
    Faust drops records below it as already read.
    """
    for tp, offset in sorted(targets.items()):
        await consumer.seek(tp, offset)


def _describe(targets: dict[TP, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(targets.items()))
