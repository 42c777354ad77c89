"""Kafka records in aiokafka record batches, queued per (topic, partition) and handed over in order.

A burst of records to a few partitions (a changelog write, a snapshot run) costs most in
`producer.send` per record (a coroutine, a future and the accumulator's checks each). So the
records go straight into record batches, one delivery future per batch. Used by the table
changes (`stream/changelog.py`) and the budget usage snapshots (`stream/snapshots.py`);
`RecordBatches` says how a partition's order holds and why nobody waits for the producer's drains.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError, ProducerClosed
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.types import AppT

#: Batches of one partition not yet handed to the producer, at most, before a write waits (or,
#: for the snapshots, is `crowded`): the caller goes on while a partition's earlier batch
#: drains, but not without bound.
MAX_QUEUED_BATCHES = 4
#: Below this many bytes under the producer's max request size a record's key and value surely
#: fit; above, the exact size is estimated (a record's and a batch's headers).
RECORD_OVERHEAD_BYTES = 512
#: Why a write or a queued batch was held back (the stall guard said the group expelled the worker).
HELD_BACK = "the group expelled this worker while it stood still"


async def always() -> bool:
    """The default `may_hand_over` (and `TableChanges.write`'s `may_write`): nothing holds it back."""
    return True


class RecordBatches:
    """Records in aiokafka record batches, queued per (topic, partition), handed over in order.

    A partition's records must reach the producer in the order they were
    written: a key's older value landing after its newer one is what a
    recovery would read last. `send_batch` waits while an earlier batch of
    the partition is still in the producer's accumulator (the sender drains
    it with its next request, after the one in flight). So each partition
    has a queue of batches not handed over yet, and a task (`_hand_over`)
    that hands them over oldest first; a write appends its records to the
    newest of them while it has room (aiokafka closes a full one and the
    write opens the next). The agent waits for no drain: back-to-back writes
    share a batch, as they shared the producer's open batch with `send`, and
    it waits only while a partition has more than `MAX_QUEUED_BATCHES` full
    batches queued (a broker that does not keep up slows the agent down).

    Two users: the table changes (`stream/changelog.py:TableChanges`) and the
    budget usage snapshots (`stream/snapshots.py`, `stop_on_failure=False`).
    A lost changelog record makes every later cover wrong, so a failed
    hand-over refuses every later append; a lost snapshot is only taken
    again, so a failure fails the batches queued then and the next append
    starts afresh.
    """

    def __init__(self, app: AppT, stop_on_failure: bool = True) -> None:
        self.app = app
        self.stop_on_failure = stop_on_failure
        self._queued: dict[tuple[str, int], deque[_QueuedBatch]] = {}
        self._handing_over: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._failed: BaseException | None = None
        #: asked before each hand-over (the latest write's `may_write`: the stall guard)
        self.may_hand_over: Callable[[], Awaitable[bool]] = always

    async def room(self) -> None:
        """Wait while some partition has more than `MAX_QUEUED_BATCHES` batches not handed over yet."""
        while (long := self._longest()) is not None:
            await asyncio.wait([long[0].delivered])

    def crowded(self) -> bool:
        """Whether `room` would wait (for a caller that rather comes back later)."""
        return self._longest() is not None

    def _longest(self) -> deque[_QueuedBatch] | None:
        return next((queue for queue in self._queued.values() if len(queue) > MAX_QUEUED_BATCHES), None)

    def append(
        self, topic: str, partition: int, records: Iterable[tuple[bytes, bytes | None]]
    ) -> list[asyncio.Future[None]]:
        """Queue `records` behind the partition's earlier ones; the delivery futures of the batches
        they went into (a refused batch: all its records refused).

        A record above the producer's `producer_max_request_size` raises
        `MessageSizeTooLargeError`, as `send` refuses it; so does any append
        once a batch could not be handed over (the write is half done).
        """
        if self._failed is not None:
            raise self._failed
        tp = (topic, partition)
        queue = self._queued.setdefault(tp, deque())
        batch = queue[-1] if queue else self._open(queue, topic, partition)
        touched = [batch.delivered]
        max_bytes = int(self.app.conf.producer_max_request_size)
        surely_fits = max_bytes - RECORD_OVERHEAD_BYTES
        timestamp = int(time.time() * 1000)
        for key, value in records:
            if len(key) + (len(value) if value else 0) > surely_fits:
                check_size(topic, key, value, max_bytes)
            if batch.builder.append(timestamp=timestamp, key=key, value=value) is None:
                batch = self._open(queue, topic, partition)  # aiokafka closed the full one
                touched.append(batch.delivered)
                batch.builder.append(timestamp=timestamp, key=key, value=value)
        handing_over = self._handing_over.get(tp)
        if handing_over is None or handing_over.done():
            self._handing_over[tp] = asyncio.ensure_future(self._hand_over(topic, partition, queue))
        return touched

    def _open(self, queue: deque[_QueuedBatch], topic: str, partition: int) -> _QueuedBatch:
        """A new empty batch at the end of `queue`, as big as the producer's batches at most."""
        batch = _QueuedBatch(self.app.producer._ensure_producer().create_batch(), f"{topic}[{partition}]")
        queue.append(batch)
        return batch

    async def _hand_over(self, topic: str, partition: int, queue: deque[_QueuedBatch]) -> None:
        """Hand the partition's queued batches to the producer, oldest first, until none is left.

        `send_batch` returns once the batch is in the accumulator, with no
        other task run since the wait for the drain ended: nothing appends
        to a batch after it was handed over (it is closed, and out of the queue).

        A producer that stops settles only the batches in its accumulator when
        the stop began; a hand-over waiting then would wait for ever (a drain,
        or metadata from a closed client), and a batch added after would never
        be sent nor failed. So the producer's sender ending cancels the
        hand-over, and every batch not handed over before the stop fails.

        A batch waits in the queue for round trips: `may_hand_over` (the stall
        guard) is asked before each, as before a write takes its records; a
        worker expelled meanwhile hands over nothing more, and its batches fail.
        """
        task = asyncio.current_task()
        stopped: asyncio.Future[Any] | None = None

        def cancel(_: object) -> None:
            if task is not None:
                task.cancel()

        try:
            producer = self.app.producer._ensure_producer()
            stopped = producer._sender.sender_task
            stopped.add_done_callback(cancel)
            while queue:
                batch = queue[0]
                if not await self.may_hand_over():
                    raise RecordBatchFailed(f"{topic}[{partition}]: not handed over: {HELD_BACK}")
                sent = await producer.send_batch(batch.builder, topic, partition=partition)
                if producer._closed:  # added after the stop's flush looked: never flushed nor failed
                    raise ProducerClosed(f"{topic}[{partition}]: the producer stopped during the hand-over")
                queue.popleft()
                batch.builder.close()
                sent.add_done_callback(batch.settle)
        except BaseException as exc:  # the write is half done: this batch and those after it are lost
            if isinstance(exc, asyncio.CancelledError) and stopped is not None and stopped.done():
                exc = ProducerClosed(f"{topic}[{partition}]: the producer stopped before the hand-over")
            elif isinstance(exc, Exception) and not isinstance(exc, RecordBatchFailed | ProducerClosed):
                exc = _named(RecordBatchFailed(f"{topic}[{partition}]: not handed over: {exc!r}"), exc)
            if self.stop_on_failure:
                self._failed = exc
            for lost in queue:
                lost.delivered.set_exception(exc)
            queue.clear()
            if not isinstance(exc, Exception):
                raise
        finally:
            if stopped is not None:
                stopped.remove_done_callback(cancel)


class _QueuedBatch:
    """A batch of one partition, open for records until handed over; done when delivered."""

    __slots__ = ("builder", "delivered", "where")

    def __init__(self, builder: BatchBuilder, where: str) -> None:
        self.builder = builder
        self.where = where
        self.delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, sent: asyncio.Future[Any]) -> None:
        """Done as the producer's delivery future of the batch is (its outcome taken: none is left unread).

        A failure names the partition and how many records went with it: the
        broker's own error (`MessageSizeTooLargeError()`) names neither.
        """
        failure = None if sent.cancelled() else sent.exception()
        if self.delivered.done():
            return
        if sent.cancelled():
            self.delivered.cancel()
        elif failure is not None:
            refused = f"{self.where}: a batch of {self.builder.record_count()} records refused: {failure!r}"
            self.delivered.set_exception(_named(RecordBatchFailed(refused), failure))
        else:
            self.delivered.set_result(None)


def _named(failure: RecordBatchFailed, cause: BaseException) -> RecordBatchFailed:
    """`failure` (which names the changelog partition) with `cause` (which does not) as its cause."""
    failure.__cause__ = cause
    return failure


def check_size(topic: str, key: bytes, value: bytes | None, max_bytes: int) -> None:
    """Refuse a record above the producer's max request size, as its `send` does."""
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])
    if size > max_bytes:
        raise MessageSizeTooLargeError(
            f"a {topic} record of {size} bytes is above the producer's {max_bytes}"
        )


class RecordBatchFailed(RuntimeError):
    """A record batch was not handed over, or the broker refused it; names its topic and partition."""
