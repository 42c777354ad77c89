"""Stage 1's micro-batch taking in process: Faust's `take_events` against `take_batches`, CPU per message.

No broker: a Faust app's stream over a topic iterator, its channel queue filled with consumer
messages' events as the conductor fills it, then emptied in batches of `--batch` by one taker and
the other, alternating, each batch acked. Measures the per-message machinery of taking alone
(nothing is decoded): what `stream/event_batches.py` replaced.

    .venv/bin/python bench/stream_take.py [--messages 200000] [--batch 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import faust
from burnguard.stream.event_batches import take_batches
from faust.events import Event
from faust.types.tuples import ConsumerMessage

TOPIC = "bench-take"


def _app(messages: int) -> Any:
    app = faust.App(
        "bench-take",
        broker="kafka://127.0.0.1:1",
        store="memory://",
        web_enabled=False,
        stream_buffer_maxsize=messages + 1,  # every message queued before the clock starts
    )
    app.flow_control.resume()
    return app


async def _run(taker: Callable[[Any], AsyncIterator[list[Any]]], messages: int) -> float:
    """CPU seconds to take and ack `messages` events in batches."""
    app = _app(messages)
    stream = app.stream(app.topic(TOPIC, key_type=bytes, value_type=bytes, value_serializer="raw"))
    queue = stream.channel.queue
    generation = app.consumer_generation_id
    for offset in range(messages):
        message = ConsumerMessage(TOPIC, 0, offset, 0.0, 0, None, b"k", b"v", None, generation_id=generation)
        queue.put_nowait(Event(app, b"k", b"v", None, message))
    taken = 0
    began = time.process_time()
    async for events in taker(stream):
        taken += len(events)
        if taken >= messages:
            break
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    takers = {
        "take_events": lambda stream: stream.take_events(args.batch, within=0.02),
        "take_batches": lambda stream: take_batches(stream, args.batch, 0.02),
    }
    for round_ in range(args.rounds):
        for name, taker in takers.items():
            cpu = asyncio.run(_run(taker, args.messages))
            print(
                f"round {round_ + 1} {name}: {cpu / args.messages * 1e6:.2f} µs CPU per message "
                f"({args.messages} messages, batches of {args.batch}); load {os.getloadavg()[0]:.2f}"
            )


if __name__ == "__main__":
    main()
