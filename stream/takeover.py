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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import faust
from faust.types import TP, AppT

logger = logging.getLogger(__name__)


class RewindAfterRecovery(faust.Sensor):
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
        """Seek each assigned partition of `topics` to its commit (log start if none)."""
        consumer = self.app.consumer
        partitions = {tp for tp in consumer.assignment() if tp.topic in self.topics}
        if not partitions:
            return
        try:
            targets = await self._targets(consumer, partitions)
            await seek_back(consumer, targets)
        except Exception as exc:  # a rebalance took the partitions meanwhile: it ends in a rewind too
            logger.warning("could not rewind %s to the committed offsets: %r", sorted(partitions), exc)
            return
        logger.info("rewound to the committed offsets: %s", _describe(targets))

    @staticmethod
    async def _targets(consumer: Any, partitions: set[TP]) -> dict[TP, int]:
        committed = await consumer.seek_to_committed()
        targets = {tp: committed[tp] for tp in partitions if committed.get(tp)}
        uncommitted = partitions - targets.keys()
        if uncommitted:
            targets.update(await consumer.earliest_offsets(*uncommitted))
        return targets


async def seek_back(consumer: Any, targets: Mapping[TP, int]) -> None:
    """Seek through Faust's own `seek`, which resets Faust's read offset along with the position.

    A seek on aiokafka alone would leave the read offset where it was, and
    Faust drops records below it as already read.
    """
    for tp, offset in sorted(targets.items()):
        await consumer.seek(tp, offset)


def _describe(targets: dict[TP, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(targets.items()))
