"""Stage 1's micro-batches reach the usage topic in order, and `otlp_spans` commits wait for them.

A micro-batch's records (usage records, dead letters) are handed to the producer after the agent
has read it, and Faust acks it then. Faust commits an acked offset after a producer flush, which
does not fail when the broker refused a record: only the record's delivery future tells. So:

- The commits of `otlp_spans` are capped at what delivered micro-batches cover
  (`stream/takeover.py:InOrderReads.written`, as stage 2's table changes cap theirs).
- A micro-batch is handed over only once the one before it is delivered. Stage 2's replay marks
  keep per key the highest source offset applied (`WindowTotals.add`): had a later micro-batch
  landed, the refused one's messages read again would count as replays, lost. The wait is
  usually none: the previous one had the whole next micro-batch's decoding to land.
- A refused micro-batch is read again: its partitions are sought back to its first offsets, its
  dead letters that did not land are forgotten (so the re-reading parks them), and a micro-batch
  begun before the refusal was known is not sent (it is read again with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from burnguard.stream.deadletters import Parked
from faust.types import TP

logger = logging.getLogger(__name__)


@dataclass
class SentMicroBatch:
    """A micro-batch's records handed to the producer, and what its delivery lets commit."""

    futures: list[asyncio.Future[Any]]
    #: per partition, its first offset in the micro-batch: where it is read again if refused
    first: dict[TP, int]
    #: per partition, the offset below which every record is delivered once this one is
    covers: dict[TP, int]
    #: its dead letters, each with the index of its record's future
    parked: list[tuple[Parked, int]] = field(default_factory=list)

    def failure(self) -> BaseException | None:
        """The first failed record's error (settled futures only), or None."""
        for future in self.futures:
            if future.cancelled():
                return asyncio.CancelledError()
            if future.exception() is not None:
                return future.exception()
        return None

    def failed_count(self) -> int:
        return sum(1 for future in self.futures if not _landed(future))

    def unparked(self) -> list[Parked]:
        """Its dead letters whose record did not land."""
        return [source for source, index in self.parked if not _landed(self.futures[index])]


def _landed(future: asyncio.Future[Any]) -> bool:
    return not future.cancelled() and future.exception() is None


class MicroBatchDeliveries:
    """At most one micro-batch in flight; its delivery raises the commit cap, its refusal reads it again.

    `on_delivered(covers)` lets Faust commit up to `covers`; `on_refused(sent)` seeks the partitions
    back and forgets the unlanded dead letters. Both run once per micro-batch, from the delivery's
    callback or from the agent's wait, whichever sees it settled first.
    """

    def __init__(
        self,
        on_delivered: Callable[[dict[TP, int]], None],
        on_refused: Callable[[SentMicroBatch], None],
    ) -> None:
        self._on_delivered = on_delivered
        self._on_refused = on_refused
        self._in_flight: SentMicroBatch | None = None
        #: micro-batches refused so far: one begun at an older count is not sent
        self.refusals = 0
        #: records the broker refused, over all refused micro-batches
        self.refused_records = 0

    async def previous_delivered(self, began_at: int) -> bool:
        """Wait for the micro-batch in flight to settle; whether one begun at `began_at` refusals may go."""
        await self.settled()
        return self.refusals == began_at

    async def settled(self) -> None:
        """Wait for the micro-batch in flight, if any, to be delivered or refused (and handled)."""
        sent = self._in_flight
        if sent is not None:
            await asyncio.wait(sent.futures)
            self._settle(sent)

    def abandon(self) -> None:
        """Stop following the micro-batch in flight (partitions lost): no cap raised, nothing read again."""
        self._in_flight = None

    def track(self, sent: SentMicroBatch) -> None:
        """Follow a micro-batch just handed over (the previous one settled: `previous_delivered`)."""
        if not sent.futures:
            self._on_delivered(sent.covers)
            return
        self._in_flight = sent
        gathered = asyncio.gather(*sent.futures, return_exceptions=True)  # retrieves every error
        gathered.add_done_callback(lambda _: self._settle(sent))

    def _settle(self, sent: SentMicroBatch) -> None:
        if sent is not self._in_flight:  # handled already
            return
        self._in_flight = None
        failure = sent.failure()
        if failure is None:
            self._on_delivered(sent.covers)
            return
        self.refusals += 1
        failed = sent.failed_count()
        self.refused_records += failed
        logger.error(
            "the broker refused %d of a micro-batch's %d records (%r): reading it again from %s",
            failed,
            len(sent.futures),
            failure,
            ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(sent.first.items())),
        )
        self._on_refused(sent)
