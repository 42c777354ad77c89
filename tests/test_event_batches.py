"""Stage 1's micro-batches from its channel's queue (`stream/event_batches.py`), without a broker.

The end-to-end tests (`test_e2e_exactly_once.py`, `test_e2e_failed_send.py`, the rebalance and
backlog ones) run it in the worker; these pin what it keeps of Faust's stream: batch sizes and
order, the window, the rebalance skip, tracking before the body and acks after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
from burnguard.stream import event_batches
from burnguard.stream.event_batches import take_batches
from faust.events import Event
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from mode.utils.queues import FlowControlEvent, ThrowableQueue

TOPIC = "otlp_spans"


class _FlowControl:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


class _Consumer:
    """Faust's consumer as an acked message reaches it (`Event.ack` -> `Message.ack` -> here)."""

    def __init__(self) -> None:
        self._unacked_messages: set[Any] = set()
        self.acked: list[int] = []

    def ack(self, message: Any) -> bool:
        self.acked.append(message.offset)
        self._unacked_messages.discard(message)
        return True


class _App:
    def __init__(self) -> None:
        self.flow_control = _FlowControl()
        self.consumer_generation_id = 3
        self.topics = type("Topics", (), {"acking_topics": {TOPIC}})()
        self.consumer = _Consumer()


class _Channel:
    is_iterator = True

    def __init__(self) -> None:
        self.queue: ThrowableQueue = ThrowableQueue(flow_control=FlowControlEvent(initially_suspended=False))

    async def __anext__(self) -> Any:
        return await self.queue.get()


class _Stream:
    """What `take_batches` uses of a Faust stream; its acks (as the consumer gets them) and sensor
    calls recorded."""

    def __init__(self) -> None:
        self.app = _App()
        self.channel = _Channel()
        self.should_stop = False
        self.sensed: list[int] = []
        #: `on_stream_event_out` and `on_message_out` sensor calls, as `Stream.ack` makes them
        self.sensed_out: list[tuple[str, int]] = []
        self.stopped = False

    @property
    def acked(self) -> list[int]:
        return self.app.consumer.acked

    async def maybe_start(self) -> bool:
        return True

    def _on_stream_event_out(self, tp: TP, offset: int, stream: Any, event: Any) -> None:
        assert stream is self and event.message.offset == offset
        self.sensed_out.append(("event", offset))

    def _on_message_out(self, tp: TP, offset: int, message: Any) -> None:
        self.sensed_out.append(("message", offset))

    def _on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        self.sensed.append(offset)

    def _channel_stop_iteration(self, channel: Any) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    def service_reset(self) -> None:
        pass


def _event(stream: _Stream, offset: int, generation: int = 3, value: bytes = b"v") -> Event:
    message = ConsumerMessage(TOPIC, 0, offset, 0.0, 0, None, b"k", value, None, generation_id=generation)
    return Event(stream.app, b"k", value, None, message)


def _fill(stream: _Stream, offsets: range, generation: int = 3, value: bytes = b"v") -> None:
    for offset in offsets:
        stream.channel.queue.put_nowait(_event(stream, offset, generation, value))


async def _batches(
    stream: _Stream,
    n: int,
    max_events: int,
    within_s: float,
    body: Callable[[list], None],
    max_bytes: int | None = None,
) -> None:
    taken = 0
    async with aclosing(take_batches(stream, max_events, within_s, max_bytes=max_bytes)) as batches:
        async for events in batches:
            body(events)
            taken += 1
            if taken == n:
                break


def _offsets(events: list[Any]) -> list[int]:
    return [event.message.offset for event in events]


def test_an_ack_is_what_fausts_stream_ack_does_both_sensors_told_once_the_last_reference_goes() -> None:
    stream = _Stream()
    _fill(stream, range(3))
    for index, event in enumerate(stream.channel.queue._queue):
        event.message.incref(2 if index == 1 else 1)  # as the conductor: offset 1 for two channels
    asyncio.run(_batches(stream, 1, 10, 0.02, lambda events: None))
    assert stream.acked == [0, 2]  # offset 1 waits for its other reference
    assert stream.sensed_out == [("event", 0), ("message", 0), ("event", 1), ("event", 2), ("message", 2)]


def test_a_full_queue_gives_full_batches_in_order_each_acked_after_its_body() -> None:
    stream = _Stream()
    _fill(stream, range(7))
    seen: list[tuple[list[int], list[int], int]] = []

    def body(events: list[Any]) -> None:
        unacked = sorted(message.offset for message in stream.app.consumer._unacked_messages)
        seen.append((_offsets(events), list(stream.acked), len(unacked)))

    asyncio.run(asyncio.wait_for(_batches(stream, 3, 3, 0.05, body), 10))
    # tracked (unacked) while the body runs; the previous batch acked before the next is taken
    assert seen == [([0, 1, 2], [], 3), ([3, 4, 5], [0, 1, 2], 3), ([6], [0, 1, 2, 3, 4, 5], 1)]
    assert stream.acked == list(range(7))
    assert stream.sensed == list(range(7))
    assert stream.stopped


def test_a_batch_ends_once_its_values_reach_the_byte_cap_with_the_message_that_reaches_it() -> None:
    """Small messages make batches of as many bytes (hence spans) as big ones, not of as many messages."""
    stream = _Stream()
    _fill(stream, range(0, 2), value=b"x" * 100)
    _fill(stream, range(2, 4), generation=2, value=b"x" * 100)  # skipped: takes no room
    _fill(stream, range(4, 9), value=b"x" * 100)
    _fill(stream, range(9, 10), value=b"x" * 1000)
    batches: list[list[int]] = []
    asyncio.run(
        asyncio.wait_for(_batches(stream, 3, 100, 0.02, lambda e: batches.append(_offsets(e)), 250), 10)
    )
    assert batches == [[0, 1, 4], [5, 6, 7], [8, 9]]  # 300, 300, then 1,100 bytes: one past the cap
    assert stream.acked == [0, 1, 4, 5, 6, 7, 8, 9]


def test_without_a_byte_cap_the_message_cap_alone_ends_a_batch() -> None:
    stream = _Stream()
    _fill(stream, range(5), value=b"x" * 1000)
    batches: list[list[int]] = []
    asyncio.run(asyncio.wait_for(_batches(stream, 2, 3, 0.02, lambda e: batches.append(_offsets(e))), 10))
    assert batches == [[0, 1, 2], [3, 4]]


def test_a_batch_not_full_goes_once_its_window_is_over_with_what_arrived_within_it() -> None:
    stream = _Stream()

    async def run() -> tuple[list[int], float]:
        async def late() -> None:
            await asyncio.sleep(0.01)
            _fill(stream, range(1, 3))  # within the 300 ms window (wide: a loaded machine): in the batch
            await asyncio.sleep(0.5)
            _fill(stream, range(3, 4))  # after it: the next batch

        _fill(stream, range(0, 1))
        producer = asyncio.ensure_future(late())
        began = time.monotonic()
        batches: list[list[int]] = []
        await _batches(stream, 2, 100, 0.3, lambda events: batches.append(_offsets(events)))
        await producer
        return batches, time.monotonic() - began

    batches, took = asyncio.run(asyncio.wait_for(run(), 10))
    assert batches == [[0, 1, 2], [3]]
    assert took >= 0.5


def test_a_first_event_on_a_quiet_stream_waits_for_the_end_of_its_window_not_a_whole_one() -> None:
    """As `take_events`' timer: windows run from the previous batch, so enforcement at low load
    waits half a window on average, not a whole one after each message."""
    stream = _Stream()

    async def run() -> float:
        async def late() -> float:
            await asyncio.sleep(0.6)  # in the second 0.4 s window, 0.2 s before its end
            _fill(stream, range(1))
            return time.monotonic()

        producer = asyncio.ensure_future(late())
        got: list[float] = []
        await _batches(stream, 1, 100, 0.4, lambda events: got.append(time.monotonic()))
        return got[0] - await producer

    waited = asyncio.run(asyncio.wait_for(run(), 10))
    assert waited < 0.35  # ~0.2; a window from the first event would wait 0.4


def test_an_error_thrown_into_the_channel_reaches_the_agent_and_the_taken_events_are_acked() -> None:
    stream = _Stream()

    async def run() -> None:
        _fill(stream, range(2))
        stream.channel.queue._throw(RuntimeError("from the channel"))
        async for _ in take_batches(stream, 10, 0.05):
            pass

    with pytest.raises(RuntimeError, match="from the channel"):
        asyncio.run(run())
    assert stream.stopped


def test_events_of_an_older_generation_or_during_a_rebalance_are_dropped_untracked_and_unacked() -> None:
    stream = _Stream()
    _fill(stream, range(0, 2), generation=2)  # fetched before the rebalance
    _fill(stream, range(2, 4))
    batches: list[list[int]] = []
    asyncio.run(asyncio.wait_for(_batches(stream, 1, 10, 0.02, lambda e: batches.append(_offsets(e))), 10))
    assert batches == [[2, 3]]
    assert stream.sensed == [2, 3]
    assert stream.acked == [2, 3]

    stream = _Stream()
    stream.app.flow_control.active = False  # suspended: a rebalance is under way
    _fill(stream, range(0, 2))
    taken: list[list[int]] = []

    async def suspended() -> None:
        task = asyncio.ensure_future(_batches(stream, 1, 10, 0.02, lambda events: taken.append(events)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(suspended())
    assert taken == [] and stream.acked == [] and stream.sensed == []
    assert not stream.app.consumer._unacked_messages


def test_a_body_that_raises_has_its_batch_acked_as_take_events_acks_it() -> None:
    stream = _Stream()
    _fill(stream, range(3))

    def body(events: list[Any]) -> None:
        raise ValueError("the agent failed")

    with pytest.raises(ValueError, match="the agent failed"):
        asyncio.run(_batches(stream, 1, 10, 0.02, body))
    assert stream.acked == [0, 1, 2]
    assert stream.stopped


def test_a_stop_while_waiting_for_a_first_event_takes_nothing() -> None:
    """A stop cancels the agent while it waits: its get goes with it, the next event stays queued."""
    stream = _Stream()

    async def run() -> None:
        task = asyncio.ensure_future(_batches(stream, 1, 10, 0.02, lambda events: None))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _fill(stream, range(1))
        await asyncio.sleep(0)

    asyncio.run(run())
    assert stream.channel.queue.qsize() == 1  # the cancelled get took nothing
    assert event_batches.POLL_S < 0.02


def _behind_run(
    stream: _Stream, behind: Callable[[], bool], within_s: float, behind_within_s: float, late_at: float
) -> tuple[list[list[int]], float]:
    """One batch: offset 0 queued, offset 1 put in at `late_at`; its offsets and when it went."""

    async def run() -> tuple[list[list[int]], float]:
        async def late() -> None:
            await asyncio.sleep(late_at)
            _fill(stream, range(1, 2))

        _fill(stream, range(1))
        producer = asyncio.ensure_future(late())
        began = time.monotonic()
        batches: list[list[int]] = []

        async def take() -> None:
            async with aclosing(take_batches(stream, 100, within_s, behind, behind_within_s)) as taken:
                async for events in taken:
                    batches.append(_offsets(events))
                    return

        await take()
        took = time.monotonic() - began
        await producer
        return batches, took

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_a_batch_under_the_cap_waits_past_its_window_for_a_fetch_kafka_holds() -> None:
    """A backlog's next fetch comes a round trip after the one before: the batch waits for it."""
    stream = _Stream()
    batches, took = _behind_run(stream, lambda: True, 0.02, 0.5, late_at=0.15)
    assert batches == [[0, 1]]
    assert took >= 0.45  # still behind: it waited to the end of its longer window, not the cap
    assert stream.acked == [0, 1]


def test_a_batch_waits_no_longer_once_kafka_holds_nothing_more() -> None:
    stream = _Stream()
    behind = iter([True, True, False])
    batches, took = _behind_run(stream, lambda: next(behind, False), 0.02, 0.5, late_at=0.3)
    assert batches == [[0]]
    assert took < 0.2


def test_a_batch_is_not_held_past_its_window_while_a_rebalance_suspends_the_flow() -> None:
    """Its events hold the rebalance up until they are acked."""
    stream = _Stream()

    def behind() -> bool:
        stream.app.flow_control.active = False  # suspended after the first event was taken
        return True

    batches, took = _behind_run(stream, behind, 0.02, 0.5, late_at=0.3)
    assert batches == [[0]]
    assert took < 0.2
