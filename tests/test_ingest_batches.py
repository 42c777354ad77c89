"""Stage 1's micro-batches without a broker: what one `_ingest_batch` hands to the producer.

The end-to-end tests (`test_e2e_*`) run the same code on a real broker; this one checks the
bookkeeping of a batch mixing partitions, a copy, a malformed message and a hostile span.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import burnguard.stream.app as app_module
import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream.app import BATCH_ROWS, GC_YOUNG_OBJECTS, BudgetJob, tune_gc
from burnguard.stream.deadletters import OMITTED_HEADER, SOURCE_HEADER
from burnguard.stream.records import MicroBatch, sub_batches
from burnguard.stream.settings import StreamSettings
from burnguard.stream.takeover import in_order_reads
from faust.types import TP
from kafka.errors import KafkaTimeoutError

from tests.factories import budgets_yaml, tenant_cost
from tests.fixtures.consumer_events import Event, Message
from tests.test_e2e_hostile_spans import good, message


@pytest.fixture
def job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, groups_impl: str
) -> tuple[BudgetJob, list[tuple[Any, ...]]]:
    """A job not started whose sends are captured; its groups `GroupRows` or the native ones."""
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"ingest-{tmp_path.name}")
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1.0e6))))
    job.recent.primed.update({0, 1})  # no broker to read back from
    job.dead_letters.stale = False
    sent: list[tuple[Any, ...]] = []

    async def send() -> None:
        sent.extend(job.usage_records._pending)
        job.usage_records._pending = []

    monkeypatch.setattr(job.usage_records, "send", send)
    return job, sent


def test_a_micro_batch_sends_each_message_once_as_its_own_sub_batch(
    job: tuple[BudgetJob, list[tuple[Any, ...]]],
) -> None:
    job, sent = job
    now = time.time()
    payload = message([good("acme")])
    events = [
        Event(Message(0, 0, timestamp=now), payload),
        Event(Message(0, 1, timestamp=now), payload),  # a producer retry: the same bytes again
        Event(Message(1, 0, timestamp=now), b"\x0a\xff not protobuf"),
        Event(
            Message(1, 1, timestamp=now), message([good("acme"), {**good("acme"), attr.COST_USD: math.nan}])
        ),
    ]
    asyncio.run(job._ingest_batch(events))
    usage = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    parked = [dict(headers) for topic, *_, headers in sent if topic == job.settings.topics.deadletter]
    assert [[b.source for b in sub_batches(record)] for record in usage] == [[(0, 0), (1, 1)]]
    amounts = [row[3] for record in usage for b in sub_batches(record) for row in b.deltas]
    assert amounts == [good("acme")[attr.COST_USD]] * 2  # the NaN span alone was left out
    assert sorted(h[SOURCE_HEADER] for h in parked) == [b"otlp_spans/1/0", b"otlp_spans/1/1"]
    assert (job.duplicates, job.rejected, job.deadlettered) == (1, {"not_finite": 1}, 2)

    sent.clear()
    asyncio.run(job._ingest_batch(events[1:]))  # a replay cut elsewhere: no second dead letter
    usage = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    assert [[b.source for b in sub_batches(record)] for record in usage] == [[(1, 1)]]
    assert not [record for record in sent if record[0] == job.settings.topics.deadletter]
    assert (job.duplicates, job.rejected, job.deadlettered) == (1, {"not_finite": 1}, 2)


def test_a_message_too_large_to_copy_is_parked_without_its_value_and_named(
    job: tuple[BudgetJob, list[tuple[Any, ...]]],
) -> None:
    job, sent = job
    limit = job.app.conf.producer_max_request_size
    huge = b"\x0a\xff" + b"x" * limit  # not protobuf, and larger than the producer takes
    asyncio.run(job._ingest_batch([Event(Message(0, 0, timestamp=time.time()), huge)]))
    [(_, _, _, value, headers)] = [record for record in sent if record[0] == job.settings.topics.deadletter]
    assert value == b""
    assert dict(headers)[OMITTED_HEADER] == str(len(huge)).encode()
    assert dict(headers)[SOURCE_HEADER] == b"otlp_spans/0/0"


def test_dead_letters_of_a_batch_whose_send_failed_are_parked_on_the_re_reading(
    job: tuple[BudgetJob, list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    job, sent = job
    events = [Event(Message(0, 0, timestamp=time.time()), b"\x0a\xff not protobuf")]

    async def broker_gone() -> None:
        job.usage_records._pending = []
        raise KafkaTimeoutError("broker gone")

    working_send = job.usage_records.send
    monkeypatch.setattr(job.usage_records, "send", broker_gone)
    with pytest.raises(KafkaTimeoutError):
        asyncio.run(job._ingest_batch(events))
    monkeypatch.setattr(job.usage_records, "send", working_send)
    asyncio.run(job._ingest_batch(events))  # not acked, so read again
    parked = [dict(headers) for topic, *_, headers in sent if topic == job.settings.topics.deadletter]
    assert [h[SOURCE_HEADER] for h in parked] == [b"otlp_spans/0/0"]


@pytest.mark.parametrize("one_slice", [True, False])
def test_the_lateness_cut_off_is_read_once_per_slice_of_work(
    job: tuple[BudgetJob, list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch, one_slice: bool
) -> None:
    """`_ingest_events` reads the clock for the cut-off at a slice's start and after each await, not
    per message: within a slice every message is judged at that reading (here a clock that jumps
    three days at its second reading would have made the later messages' spans too late); with a
    slice per message, each message reads it anew, as every message did before."""
    job, _ = job
    readings: list[datetime] = []
    start = datetime.now(UTC)

    def clock() -> datetime:
        readings.append(start if not readings else start + timedelta(days=3))
        return readings[-1]

    monkeypatch.setattr(app_module, "_now", clock)
    monkeypatch.setattr(app_module, "INGEST_SLICE_S", 3600.0 if one_slice else -1.0)
    now = time.time()
    events = [
        Event(Message(offset % 2, offset // 2, timestamp=now), message([good(f"t{offset}")]))
        for offset in range(4)
    ]
    asyncio.run(job._ingest_batch(events))
    assert len(readings) == (1 if one_slice else 1 + len(events))
    assert job.stats.spans == len(events)
    assert job.stats.too_late == (0 if one_slice else len(events) - 1)  # the first message read `start`
    alone = Event(Message(0, len(events), timestamp=now), message([good("alone")]))
    job._ingest_one(alone, MicroBatch(BATCH_ROWS), {})  # a message ingested alone reads the clock itself
    assert len(readings) == (2 if one_slice else 2 + len(events))
    assert job.stats.too_late == (1 if one_slice else len(events))


def test_the_worker_scans_young_objects_less_often_and_keeps_the_older_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_OBJECTS, 11, 12)
        assert GC_YOUNG_OBJECTS > 700 and gc.isenabled()  # cycles are still collected
    finally:
        gc.set_threshold(*before)


class _Primer:
    """Records each `prime` call (partition -> first offset); fails while `failing`."""

    def __init__(self) -> None:
        self.calls: list[dict[int, int]] = []
        self.failing = False

    def prime(self, firsts: dict[int, tuple[int, int]]) -> dict[int, int]:
        self.calls.append({partition: offset for partition, (offset, _) in firsts.items()})
        if self.failing:
            raise KafkaTimeoutError("broker gone")
        return dict.fromkeys(firsts, 0)


def _after_a_rebalance(job: BudgetJob, expected: dict[int, int]) -> _Primer:
    """Nothing primed, the dead letters stale; `otlp_spans` read in order from `expected`."""
    primer = _Primer()
    job.primer = primer  # type: ignore[assignment]
    job.recent.primed.clear()
    reads = in_order_reads(job.app.consumer)
    reads.topics.add(job.settings.topics.spans)
    reads.expected.update({TP(job.settings.topics.spans, p): offset for p, offset in expected.items()})
    return primer


def test_a_micro_batch_primes_its_partitions_due_next_in_one_read_with_the_dead_letters_read_back(
    job: tuple[BudgetJob, list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a rebalance the first message's partition is primed together with every other partition
    whose first message in the micro-batch is the one it is read from next; a partition whose first
    message is not (partition 2: read again from 3) is primed at its own first admitted message."""
    job, _ = job
    primer = _after_a_rebalance(job, {0: 5, 1: 7, 2: 3})
    job.dead_letters.stale = True
    caught_up: list[bool] = []

    def catch_up() -> int:
        caught_up.append(True)
        job.dead_letters.stale = False
        return 0

    monkeypatch.setattr(job.dead_letters, "catch_up", catch_up)
    now = time.time()
    payload = message([good("acme")])
    events = [
        Event(Message(0, 5, timestamp=now), payload),
        Event(Message(1, 7, timestamp=now), payload),
        Event(Message(2, 4, timestamp=now), payload),  # past 3: sought back, not admitted
        Event(Message(0, 6, timestamp=now), payload),
    ]
    asyncio.run(job._ingest_batch(events))
    assert primer.calls == [{0: 5, 1: 7}]
    assert caught_up == [True]
    assert job.recent.primed == {0, 1}
    asyncio.run(job._ingest_batch([Event(Message(2, 3, timestamp=now), payload)]))
    assert primer.calls == [{0: 5, 1: 7}, {2: 3}]
    assert caught_up == [True]  # once after the rebalance


def test_a_failed_priming_leaves_the_other_partitions_to_their_own_first_message(
    job: tuple[BudgetJob, list[tuple[Any, ...]]],
) -> None:
    """As when each was primed alone: the failing message's partition counts as primed (a copy across
    the gap may count twice), the others are tried again when their first message comes."""
    job, sent = job
    primer = _after_a_rebalance(job, {0: 0, 1: 0})
    primer.failing = True
    now = time.time()
    payload = message([good("acme")])
    events = [Event(Message(0, 0, timestamp=now), payload), Event(Message(1, 0, timestamp=now), payload)]
    asyncio.run(job._ingest_batch(events))
    assert primer.calls == [{0: 0, 1: 0}, {1: 0}]
    assert job.recent.primed == {0, 1}
    usage = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    assert sorted(b.source for record in usage for b in sub_batches(record)) == [(0, 0), (1, 0)]
