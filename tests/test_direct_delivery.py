"""A fetched message put straight into stage 1's channel (`stream/fetching.py:DirectDelivery`), no broker.

The worker's end-to-end tests (`test_e2e_exactly_once.py`, `test_e2e_backlog_batches.py`, the
rebalance ones) run it; these pin that the event is the one Faust's conductor would have put, and
that every case where the conductor would wait or do more is left to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import pytest
from aiokafka.structs import TopicPartition
from burnguard.stream.fetching import DirectDelivery, takes_raw_bytes
from faust.types import TP
from faust.types.tuples import ConsumerMessage

SPANS = TP("otlp_spans", 0)
RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def _message(offset: int, key: bytes | None = b"tenant", value: bytes | None = b"spans") -> ConsumerMessage:
    headers = [("h", b"1")]
    return ConsumerMessage(SPANS.topic, SPANS.partition, offset, 1.0, 0, headers, key, value, None, tp=SPANS)


def _run(check: Callable[[Any, list[Any]], Awaitable[None]], buffer_size: int = 100, **topic: Any) -> None:
    """`check(app, channels)` on an app whose conductor has `SPANS` assigned to the channels of
    one topic iterator per options given in `topic["channels"]` (default: one raw-bytes one)."""

    async def run() -> None:
        app = faust.App(
            "direct-delivery",
            broker="kafka://127.0.0.1:1",
            store="memory://",
            web_enabled=False,
            stream_buffer_maxsize=buffer_size,
        )
        app.flow_control.resume()
        channels = []
        for options in topic.get("channels", [RAW]):
            channel = app.topic(SPANS.topic, **options).clone(is_iterator=True)
            app.topics.add(channel)
            channels.append(channel)
        await app.topics.on_partitions_assigned({SPANS})
        await check(app, channels)

    asyncio.run(run())


def test_a_raw_bytes_message_becomes_the_event_the_conductor_would_have_put() -> None:
    async def check(app: Any, channels: list[Any]) -> None:
        queue = channels[0].queue
        for key in (b"tenant", None):
            direct, through_conductor = _message(1, key), _message(1, key)
            assert DirectDelivery(app).put(SPANS, direct)
            await app.topics.on_message(through_conductor)
            mine, theirs = queue.get_nowait(), queue.get_nowait()
            assert type(mine) is type(theirs)
            assert (mine.key, mine.value, mine.headers) == (theirs.key, theirs.value, theirs.headers)
            assert mine.message is direct and theirs.message is through_conductor
            assert direct.refcount == through_conductor.refcount == 1  # one ack releases it

    _run(check)


@pytest.mark.parametrize(
    "case", ["lock held", "flow suspended", "producer buffer full", "queue full", "unassigned partition"]
)
def test_where_the_conductor_would_wait_or_look_elsewhere_it_is_left_to_it(case: str) -> None:
    async def check(app: Any, channels: list[Any]) -> None:
        queue, message, tp = channels[0].queue, _message(5), SPANS
        if case == "lock held":
            await app.topics._tp_to_callback_lock.acquire()  # a resubscription rebuilds the handlers
        elif case == "flow suspended":
            app.flow_control.suspend()
        elif case == "producer buffer full":
            buffer = app.producer.buffer
            for _ in range(buffer.max_messages + 1):
                buffer.pending.put_nowait(object())
        elif case == "queue full":
            while not queue.full():
                queue.put_nowait(object())
        else:
            tp = TP(SPANS.topic, 1)
        size = queue.qsize()
        assert not DirectDelivery(app).put(tp, message)
        assert queue.qsize() == size and message.refcount == 0

    _run(check, buffer_size=4)


@pytest.mark.parametrize(
    "channels",
    [
        [RAW, RAW],  # two agents read the partition: the conductor puts one event in each
        [{**RAW, "key_type": str}],  # a decoding channel
        [{"key_type": bytes, "value_type": bytes}],  # the app's default serializer (json)
    ],
    ids=["two channels", "str keys", "default serializer"],
)
def test_a_partition_read_by_more_than_one_raw_bytes_channel_is_left_to_the_conductor(channels: list) -> None:
    async def check(app: Any, made: list[Any]) -> None:
        assert not DirectDelivery(app).put(SPANS, _message(2))
        assert all(channel.queue.empty() for channel in made)

    _run(check, channels=channels)


def test_raw_bytes_is_fausts_own_schema_over_raw_codecs() -> None:
    app = faust.App("raw-bytes", broker="kafka://127.0.0.1:1", store="memory://")
    assert takes_raw_bytes(app.topic("t", **RAW))
    assert not takes_raw_bytes(app.topic("t", **{**RAW, "value_type": str}))
    assert not takes_raw_bytes(app.topic("t", **{**RAW, "value_serializer": "json"}))

    class Loud(faust.Schema):
        pass

    assert not takes_raw_bytes(app.topic("t", schema=Loud(**RAW)))


def test_a_filling_queue_pauses_the_partition_and_an_emptied_one_resumes_it_as_the_conductors_does() -> None:
    async def check(app: Any, channels: list[Any]) -> None:
        calls: list[tuple[str, TP]] = []
        app.consumer.on_buffer_full = lambda tp: calls.append(("full", tp))
        app.consumer.on_buffer_drop = lambda tp: calls.append(("drop", tp))
        queue, direct = channels[0].queue, DirectDelivery(app)
        fetched = TopicPartition(SPANS.topic, SPANS.partition)  # a fetch names it so, as aiokafka does
        put = 0
        while not calls:
            assert direct.put(fetched, _message(put))
            put += 1
        assert calls == [("full", SPANS)] and put == queue.pressure_high_size + 1
        while not queue.empty():
            queue.get_nowait()
        assert calls == [("full", SPANS), ("drop", SPANS)]
        # Faust's consumer asserts its active partitions are its own `TP`s, not aiokafka's
        assert all(type(tp) is TP for _, tp in calls)

    _run(check, buffer_size=10)
