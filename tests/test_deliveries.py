"""Stage 1's micro-batches are delivered in order and their refusals read again (`stream/deliveries.py`).

The futures stand for aiokafka's delivery futures; the worker with a real broker refusing a record
is `tests/test_e2e_failed_send.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from burnguard.stream.deliveries import MicroBatchDeliveries, SentMicroBatch
from faust.types import TP
from kafka.errors import MessageSizeTooLargeError

SPANS_0, SPANS_1 = TP("otlp_spans", 0), TP("otlp_spans", 1)


class Outcomes:
    """What the deliveries reported: commit caps raised, micro-batches refused."""

    def __init__(self) -> None:
        self.caps: list[dict[TP, int]] = []
        self.refused: list[SentMicroBatch] = []
        self.deliveries = MicroBatchDeliveries(self.caps.append, self.refused.append)


def futures(count: int) -> list[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(count)]


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_delivered_micro_batch_raises_the_cap_without_anyone_waiting() -> None:
    async def run() -> Outcomes:
        outcomes = Outcomes()
        sent = futures(2)
        outcomes.deliveries.track(SentMicroBatch(sent, {SPANS_0: 10}, {SPANS_0: 15}))
        await turns()
        assert outcomes.caps == []  # not before every record is delivered
        sent[0].set_result(None)
        await turns()
        assert outcomes.caps == []
        sent[1].set_result(None)
        await turns()
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes.caps == [{SPANS_0: 15}]
    assert outcomes.refused == []


def test_a_micro_batch_without_records_raises_the_cap_at_once() -> None:
    async def run() -> Outcomes:
        outcomes = Outcomes()
        outcomes.deliveries.track(SentMicroBatch([], {SPANS_1: 3}, {SPANS_1: 7}))
        return outcomes

    assert asyncio.run(run()).caps == [{SPANS_1: 7}]


def test_the_next_micro_batch_waits_for_the_one_in_flight() -> None:
    async def run() -> list[str]:
        outcomes, seen = Outcomes(), []
        sent = futures(1)
        outcomes.deliveries.track(SentMicroBatch(sent, {SPANS_0: 0}, {SPANS_0: 5}))

        async def next_micro_batch() -> None:
            assert await outcomes.deliveries.previous_delivered(0)
            seen.append(f"sent after the cap {outcomes.caps}")

        waiting = asyncio.ensure_future(next_micro_batch())
        await turns()
        seen.append("still waiting" if not waiting.done() else "did not wait")
        sent[0].set_result(None)
        await waiting
        return seen

    assert asyncio.run(run()) == ["still waiting", f"sent after the cap {[{SPANS_0: 5}]}"]


def test_a_refused_micro_batch_is_read_again_once_and_its_successor_is_not_sent() -> None:
    """One record of three refused: no cap; `on_refused` once, with the micro-batch's first offsets and
    only the dead letters that did not land; a micro-batch begun before the refusal may not go, one
    begun after may."""

    async def run() -> tuple[Outcomes, bool, bool]:
        outcomes = Outcomes()
        sent = futures(3)
        parked = [(("otlp_spans", 0, 11, -1), 1), (("otlp_spans", 1, 4, 2), 2)]
        outcomes.deliveries.track(SentMicroBatch(sent, {SPANS_0: 10, SPANS_1: 4}, {SPANS_0: 20}, parked))
        began_at = outcomes.deliveries.refusals
        sent[0].set_result(None)
        sent[1].set_result(None)
        sent[2].set_exception(MessageSizeTooLargeError())
        may_go = await outcomes.deliveries.previous_delivered(began_at)
        await turns()  # the done callback finds it handled
        begun_later = await outcomes.deliveries.previous_delivered(outcomes.deliveries.refusals)
        return outcomes, may_go, begun_later

    outcomes, may_go, begun_later = asyncio.run(run())
    assert outcomes.caps == []
    assert len(outcomes.refused) == 1
    assert outcomes.refused[0].first == {SPANS_0: 10, SPANS_1: 4}
    assert outcomes.refused[0].unparked() == [("otlp_spans", 1, 4, 2)]
    assert (may_go, begun_later) == (False, True)
    assert outcomes.deliveries.refused_records == 1
