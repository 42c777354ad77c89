"""Stage 1's micro-batches taken from its agent's channel in bulk, not event by event through Faust's stream.

Faust's `Stream.take_events` fills its buffer through the stream's per-event iterator, run by a
background task (`_passive_drainer`): one `sleep(0)`, i.e. one turn of the event loop, per event,
processors and sensors per event, and three or four short-lived tasks (`Event.wait`) per batch
for its timeout and its "buffer consumed" handshake. With small OTLP messages (10-20 spans) that
was a third of the event loop's task steps (BENCHMARKS.md, "The worker's per-event machinery").

`take_batches` reads the same queue the conductor fills (the agent's channel, a Faust topic
iterator) with `get_nowait` while it holds events, and does per event what Faust's stream
iterator does that the job relies on:

- an event of an older consumer generation, or taken while flow control is suspended (a
  rebalance is under way), is dropped unprocessed and unacked, as Faust skips it; its partition
  is read again from the commit after the rebalance;
- every other event is tracked as unacked (`Consumer._unacked_messages`, the set a rebalance's
  `wait_empty` waits on) with the `on_message_in` sensors before the batch is handed over, and
  acked as `Stream.ack` acks it (`ack_all`) after the batch's body returned or raised, as
  `take_events` acks it.

What it leaves out: the stream's processors and `on_merge` (the agents declare none), the
`on_stream_event_in` sensors (Faust's monitor's per-event latency figures; `on_stream_event_out`
still runs at the ack) and the task-local `current_event` (nothing here reads it). Faust keeps the
agents, their supervision and restarts, the tables, recovery and rebalancing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from faust.types import EventT

#: While a batch is not full and its window not over, the queue is looked at again this often:
#: the conductor's fetch delivery (`stream/fetching.py`) fills it a fetch at a time.
POLL_S = 0.002
#: A batch's room in bytes when no cap is given: never filled.
_NO_BYTE_CAP = float("inf")


async def take_batches(
    stream: Any,
    max_events: int,
    within_s: float,
    behind: Callable[[], bool] | None = None,
    behind_within_s: float = 0.0,
    max_bytes: int | None = None,
) -> AsyncIterator[list[Any]]:
    """Lists of at most `max_events` events: as many as the queue holds, waiting for more until the
    end of the `within_s` window the batch's first event came in (windows run from the previous
    batch, as `take_events`' timer does); each batch's events acked after its body.

    With `max_bytes` a batch also ends once its messages' values hold that many bytes (the one that
    reaches it included: a batch holds less than `max_bytes` plus one message). Stage 1's work and
    the rows it combines follow the spans a batch holds, and a message's bytes follow its spans: a
    count of messages alone made a micro-batch of small messages a tenth of one of big ones.

    While `behind()` says Kafka holds more of the stream's messages than were handed over (a
    backlog), a batch not full waits on for them up to `behind_within_s` after it was begun: the
    consumer fetches them one round trip after the fetch before was handed over, which on a busy
    event loop is more than a window, so without it a backlog's micro-batch is one fetch.
    """
    channel = stream.channel
    if not getattr(channel, "is_iterator", False):
        raise RuntimeError("take_batches needs the agent's stream over a topic iterator")
    started_here = await stream.maybe_start()
    taking = _Taking(stream, channel, behind, behind_within_s)
    try:
        while not stream.should_stop:
            events = await taking.batch(max_events, within_s, max_bytes)
            if not events:
                continue
            try:
                yield events
            finally:
                ack_all(stream, events)
    finally:
        stream._channel_stop_iteration(channel)
        if started_here:
            await stream.stop()
            stream.service_reset()


def ack_all(stream: Any, events: list[Any]) -> None:
    """`Stream.ack` for each event, in one call: its body is synchronous, and awaiting it per event
    made a coroutine per message (Faust's `Stream.ack`, whose docstring says so of its copy too)."""
    on_stream_event_out = stream._on_stream_event_out
    on_message_out = stream._on_message_out
    for event in events:
        last_stream_to_ack = event.ack()
        message = event.message
        tp, offset = message.tp, message.offset
        on_stream_event_out(tp, offset, stream, event)
        if last_stream_to_ack:
            on_message_out(tp, offset, message)


class _Taking:
    """The channel's queue, read in bulk: the first event of a batch waited for as Faust's stream
    waits (`Channel.__anext__`), the rest taken while the queue holds some or the window lasts."""

    def __init__(
        self, stream: Any, channel: Any, behind: Callable[[], bool] | None, behind_within_s: float
    ) -> None:
        self.stream = stream
        self.behind = behind
        self.behind_within_s = behind_within_s if behind is not None else 0.0
        self.app = stream.app
        self.queue = channel.queue
        self.next_event = channel.__anext__
        self.acking_topics = self.app.topics.acking_topics
        self.unacked = self.app.consumer._unacked_messages
        self.on_message_in = stream._on_message_in

    async def batch(self, max_events: int, within_s: float, max_bytes: int | None = None) -> list[Any]:
        """The next batch's events, tracked: the first waited for without bound, then the rest, until
        `max_events` of them or (with `max_bytes`) that many bytes of their messages' values."""
        events: list[Any] = []
        began = time.monotonic()
        room = max_bytes if max_bytes is not None else _NO_BYTE_CAP
        room -= self._take(await self.next_event(), events)
        # the end of the window the first event came in: `take_events`' timer restarts every
        # `within_s` while nothing comes, so a quiet stream's message waits half a window on average
        deadline = began + within_s * (1 + int((time.monotonic() - began) / within_s))
        behind_deadline = began + self.behind_within_s
        queue = self.queue
        while len(events) < max_events and room > 0:
            if not queue.empty():  # an error thrown into the channel is raised by `get_nowait`
                room -= self._take(queue.get_nowait(), events)
                continue
            now = time.monotonic()
            if now >= deadline and not (now < behind_deadline and self._more_coming()):
                break
            await asyncio.sleep(POLL_S)
        return events

    def _more_coming(self) -> bool:
        """Whether the stream's partitions hold messages not handed over yet, and none is being
        rebalanced (then the batch's events hold the rebalance up until they are acked)."""
        return self.behind is not None and self.app.flow_control.is_active() and self.behind()

    def _take(self, value: Any, events: list[Any]) -> int:
        """Track `value`'s message and add it, unless Faust's stream would skip it; the bytes of its
        value that joined the batch (none for a skipped one)."""
        if not isinstance(value, EventT):
            raise TypeError(f"take_batches reads events, not {type(value).__name__}")
        message = value.message
        app = self.app
        if not app.flow_control.is_active() or message.generation_id != app.consumer_generation_id:
            return 0  # read again from the commit after the rebalance
        if message.topic in self.acking_topics and not message.tracked:
            message.tracked = True
            self.unacked.add(message)
            self.on_message_in(message.tp, message.offset, message)
        events.append(value)
        return message.serialized_value_size
