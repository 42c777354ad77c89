"""Budget usage snapshots handed over as record batches: none silently lost, a key's in order.

The snapshot timer queues its records in `RecordBatches` (stream/snapshots.py) and does not
wait for them. A batch that fails (the broker refuses it, the producer cannot take it) has its
windows snapshotted again at the next run from their current totals; an evicted window keeps the
failed record as its last snapshot, unless a later one of it was taken. These tests hold that on
the real broker and on the job's timer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import faust
import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.stream import app as app_module
from burnguard.stream.accounting import window_lengths
from burnguard.stream.app import BudgetJob, SnapshotRun
from burnguard.stream.partitioner import usage_partition
from burnguard.stream.record_batches import RecordBatchFailed
from burnguard.stream.records import DeltaRow
from burnguard.stream.settings import StreamSettings
from burnguard.stream.snapshots import UsageSnapshots, WindowKey
from faust.exceptions import NotReady
from faust.types import TP
from kafka import KafkaConsumer, TopicPartition

from tests.factories import budget, budgets_yaml

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

#: The snapshot topic's `max.message.bytes` in the refusal test: a batch holding a larger record is refused.
REFUSED_ABOVE = 2048


def window(kafka_key: bytes, partition: int = 0) -> WindowKey:
    """What a window's snapshots share; the budget plays no part in the hand-over."""
    return WindowKey(None, kafka_key, partition, b"")  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait until `condition()` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def records_of(bootstrap: str, topic: str, partition: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record of the partition, in offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    try:
        return [(record.key, record.value) for record in consumer]
    finally:
        consumer.close()


async def a_refused_batch(bootstrap: str, topic: str) -> tuple[UsageSnapshots, list[bytes]]:
    """One batch of a small and a too-large snapshot (the topic refuses it whole), then the windows'
    next snapshots, small: (the snapshots, the windows the second step took)."""
    app = faust.App(
        f"snapshot-refused-{time.monotonic_ns()}", broker=f"kafka://{bootstrap}", web_enabled=False
    )
    await app.producer.start()
    try:
        snapshots = UsageSnapshots(app, topic, 1, lambda state_key: True)
        first = [
            snapshots.snapshot("w|a|0", window(b"a"), b'{"spent":1}'),
            snapshots.snapshot("w|b|0", window(b"b"), b"x" * 2 * REFUSED_ABOVE),
        ]
        snapshots.write(first)
        await until(lambda: snapshots.failed == 2)
        retried = snapshots.claim(snapshots.take(10))
        second = [
            snapshots.snapshot(key, window(key.split("|")[1].encode()), b'{"spent":2}') for key in retried
        ]
        snapshots.write(second)
        await app.producer.flush()
        await until(lambda: not snapshots._latest)
        return snapshots, retried
    finally:
        await app.producer.stop()


def test_a_refused_snapshot_batch_is_reported_and_its_windows_snapshotted_again(
    kafka_broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the records' delivery futures were never read: a refused batch was dropped unseen."""
    topic = f"snapshot-refused-{time.monotonic_ns()}"
    kafka_broker.create_topic(topic, partitions=1, config={"max.message.bytes": str(REFUSED_ABOVE)})
    with caplog.at_level(logging.WARNING, logger="burnguard.stream.snapshots"):
        snapshots, retried = asyncio.run(a_refused_batch(kafka_broker.bootstrap, topic))
    assert retried == ["w|a|0", "w|b|0"], "the refused batch's windows are not the next run's first"
    assert snapshots.failed == 2
    assert any("2 budget usage snapshots not delivered" in r.getMessage() for r in caplog.records), (
        caplog.text
    )
    assert records_of(kafka_broker.bootstrap, topic, 0) == [(b"a", b'{"spent":2}'), (b"b", b'{"spent":2}')]


async def runs_of_snapshots(bootstrap: str, topic: str, keys: int, runs: int) -> None:
    """`runs` rounds of a snapshot of every key, back to back, in many small batches per partition."""
    app = faust.App(
        f"snapshot-order-{time.monotonic_ns()}",
        broker=f"kafka://{bootstrap}",
        web_enabled=False,
        producer_max_batch_size=1024,
    )
    await app.producer.start()
    try:
        snapshots = UsageSnapshots(app, topic, 2, lambda state_key: True)
        for run in range(runs):
            batch = []
            for index in range(keys):
                key = f"key-{index}".encode()
                value = json.dumps({"run": run, "pad": "x" * 40}).encode()
                batch.append(snapshots.snapshot(f"w|{index}|0", window(key, index % 2), value))
            snapshots.write(batch)
            await asyncio.sleep(0)
        await until(lambda: not snapshots._latest)
        assert snapshots.failed == 0
    finally:
        await app.producer.stop()


def test_a_keys_snapshots_land_in_its_partition_in_the_order_they_were_taken(kafka_broker: Any) -> None:
    """A later snapshot landing before an earlier one would leave the older value after compaction."""
    topic = f"snapshot-order-{time.monotonic_ns()}"
    kafka_broker.create_topic(topic, partitions=2)
    keys, runs = 60, 6
    asyncio.run(runs_of_snapshots(kafka_broker.bootstrap, topic, keys, runs))
    for partition in (0, 1):
        seen: dict[bytes, list[int]] = {}
        for key, value in records_of(kafka_broker.bootstrap, topic, partition):
            seen.setdefault(key, []).append(json.loads(value)["run"])
        assert len(seen) == keys // 2
        assert all(order == list(range(runs)) for order in seen.values()), f"partition {partition}: {seen}"


class ControlledBatches:
    """Stands in for the snapshots' `RecordBatches`: what was appended, and delivery futures the
    test settles (`deliver`, `refuse`); `refuse_appends` makes `append` raise as a stopping producer."""

    def __init__(self) -> None:
        self.appended: list[tuple[int, list[tuple[bytes, bytes | None]], asyncio.Future[None]]] = []
        self.is_crowded = False
        self.refuse_appends: BaseException | None = None

    def crowded(self) -> bool:
        return self.is_crowded

    def append(self, topic: str, partition: int, records: Any) -> list[asyncio.Future[None]]:
        if self.refuse_appends is not None:
            raise self.refuse_appends
        delivered = asyncio.get_running_loop().create_future()
        self.appended.append((partition, list(records), delivered))
        return [delivered]

    def values(self) -> list[bytes | None]:
        return [value for _, records, _ in self.appended for _, value in records]

    def settle(self, failure: BaseException | None = None) -> None:
        for _, _, delivered in self.appended:
            if not delivered.done():
                delivered.set_result(None) if failure is None else delivered.set_exception(failure)


BUDGETS = budgets_yaml(budget("daily", 5.0, window="day"), budget("rolling", 2.0, window="24h"))


@pytest.fixture
def job(tmp_path: Path) -> BudgetJob:
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"snapshot-delivery-{tmp_path.name}")
    job = BudgetJob(settings, parse_budget_yaml(BUDGETS))
    job.snapshots.batches = ControlledBatches()  # type: ignore[assignment]
    return job


def spend(job: BudgetJob, budget_id: str, key: str, amount: float, offset: int) -> str:
    """One delta of `amount` to the key's current window; its state key."""
    now_ns, spec = time.time_ns(), job._budgets[budget_id].window_spec
    start_ns, bucket_ns = (
        (0, window_lengths(spec)[1]) if budget_id == "rolling" else (spec.start_ns(now_ns), 0)
    )
    row = DeltaRow(budget_id, key, start_ns, amount, 1, now_ns, now_ns, bucket_ns, None)
    job._apply(row, (0, offset), datetime.now(UTC))
    return f"{budget_id}|{key}|{start_ns}"


def spent_in(value: bytes | None) -> float:
    assert value is not None
    return BudgetUsage.from_json(value).spent


async def settled(batches: ControlledBatches, failure: BaseException | None = None) -> None:
    batches.settle(failure)
    for _ in range(3):  # the gathered outcome, then its callback
        await asyncio.sleep(0)


def test_a_failed_snapshot_is_taken_again_from_the_current_totals(job: BudgetJob) -> None:
    """Both windows' batch fails: the next run takes both first (the changed one at its new total),
    then the new window. Records are appended per partition, and a daily window's partition follows
    the date, so each run's records are compared as a set and the order is read from `take`."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    runs: list[list[float]] = []

    async def scenario() -> None:
        acme = spend(job, "daily", "acme", 1.0, 1)
        globex = spend(job, "daily", "globex", 0.25, 2)
        await job._snapshot()
        runs.append(sorted(spent_in(value) for value in batches.values()))
        await settled(batches, RecordBatchFailed("refused"))
        spend(job, "daily", "acme", 0.5, 3)  # changed again before the retry
        initech = spend(job, "daily", "initech", 2.0, 4)
        assert job.snapshots.take(10) == [acme, globex, initech]
        await job._snapshot()
        runs.append(sorted(spent_in(value) for value in batches.values()[2:]))
        await settled(batches)
        await job._snapshot()  # nothing left over

    asyncio.run(scenario())
    assert runs == [[0.25, 1.0], [0.25, 1.5, 2.0]]
    assert len(batches.values()) == 5
    assert job.snapshots.failed == 2
    assert not job.snapshots._latest and not job.snapshots.retrying and not job.snapshots.waiting


def test_an_evicted_windows_failed_snapshot_is_sent_again_as_it_was(job: BudgetJob) -> None:
    """Its totals are gone: the failed record holds its last value, and nothing newer was taken."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        state_key = spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()
        del job.totals.data[state_key]  # evicted while its snapshot is in flight (not waiting: no final)
        job.snapshots.evicting(state_key, lambda: None)
        await settled(batches, RecordBatchFailed("refused"))
        assert set(job.snapshots.finals) == {state_key}
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0, 1.0]
    assert not job.snapshots.finals and not job.snapshots._latest


def test_an_earlier_failure_never_overwrites_a_later_snapshot(job: BudgetJob) -> None:
    """A rolling window's key is reused: its earlier snapshot failing after a later one was taken
    (evicted, back, evicted again) must not send the earlier bytes again."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        state_key = spend(job, "rolling", "acme", 1.0, 1)
        await job._snapshot()  # snapshot 1 (1.0) in flight
        spend(job, "rolling", "acme", 0.5, 2)
        await job._snapshot()  # snapshot 2 (1.5) in flight
        first, second = batches.appended[0][2], batches.appended[1][2]
        second.set_result(None)
        del job.totals.data[state_key]  # evicted (snapshot 2 was its last change: no final)
        job.snapshots.evicting(state_key, lambda: None)
        first.set_exception(RecordBatchFailed("refused late"))
        for _ in range(3):
            await asyncio.sleep(0)
        await job._snapshot()

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0, 1.5]
    assert not job.snapshots.finals and not job.snapshots.retrying


def test_snapshots_the_producer_cannot_take_wait_for_the_next_run(
    job: BudgetJob, caplog: pytest.LogCaptureFixture
) -> None:
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        batches.refuse_appends = NotReady("the producer is stopping")
        with caplog.at_level(logging.INFO):
            await job._snapshot()
        assert not batches.appended
        batches.refuse_appends = None
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0]
    assert "retried at the next run" in caplog.text


def test_the_timer_does_not_wait_for_a_crowded_producer(job: BudgetJob) -> None:
    """With a partition's batches piling up (a slow broker), the run ends and the windows wait,
    an evicted window's last snapshot too."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        state_key = spend(job, "daily", "acme", 1.0, 1)
        evicted = spend(job, "daily", "globex", 0.5, 2)
        job.snapshots.evicting(evicted, partial(job._usage_snapshot, evicted, SnapshotRun(datetime.now(UTC))))
        del job.totals.data[evicted]
        batches.is_crowded = True
        await asyncio.wait_for(job._snapshot(), timeout=1)
        assert not batches.appended and state_key in job.snapshots.retrying
        assert set(job.snapshots.finals) == {evicted}
        assert evicted not in job.snapshots._keys, "an evicted window is still remembered"
        batches.is_crowded = False
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [0.5, 1.0]


class SlowSlices:
    """`time` for the job's module, whose monotonic clock moves only when a slice is written:
    each slice "takes" `slice_s` seconds."""

    def __init__(self, slice_s: float) -> None:
        self.now, self.slice_s = 0.0, slice_s

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_run_ends_at_its_share_of_the_interval_and_the_rest_goes_first_at_the_next(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that would go on past the next run's start leaves its remaining windows first in line."""
    clock = SlowSlices(slice_s=0.3 * job.settings.snapshot_interval.total_seconds())
    monkeypatch.setattr(app_module, "time", clock)
    monkeypatch.setattr(app_module, "SNAPSHOT_SLICE", 1)
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    append = batches.append

    def slow_append(topic: str, partition: int, records: Any) -> list[asyncio.Future[None]]:
        clock.now += clock.slice_s
        return append(topic, partition, records)

    batches.append = slow_append  # type: ignore[method-assign]
    keys = [spend(job, "daily", name, 1.0 + index, index) for index, name in enumerate("abcd")]

    async def scenario() -> None:
        await job._snapshot()
        assert len(batches.values()) == 2, "the run went on past half the interval"
        newer = spend(job, "daily", "e", 9.0, 9)
        assert job.snapshots.take(10) == [*keys[2:], newer]
        clock.slice_s = 0.0  # quick slices: the next run takes them all
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert sorted(spent_in(value) for value in batches.values()) == [1.0, 2.0, 3.0, 4.0, 9.0]


def test_one_run_takes_more_windows_than_the_old_cap_of_20000(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 windows a second at the 10 s interval was fewer than a loaded worker changes."""
    monkeypatch.setattr(app_module, "SNAPSHOT_SLICE", 5000)
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    for index in range(25_000):
        spend(job, "daily", f"key-{index}", 0.01, index)

    asyncio.run(job._snapshot())
    assert len(batches.values()) == 25_000
    assert not job.snapshots.waiting and not job.snapshots.retrying


def test_a_window_whose_partition_moved_away_is_not_sent_again(job: BudgetJob) -> None:
    """Its new owner writes its snapshots now: bytes from this worker could be older than theirs."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        state_key = spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()
        del job.totals.data[state_key]  # revoked: gone from this worker's table, not evicted
        await settled(batches, RecordBatchFailed("refused"))
        await job._snapshot()

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0]
    assert not job.snapshots.finals and not job.snapshots.retrying and not job.snapshots._latest


def test_a_window_evicted_between_the_slices_of_a_run_still_gets_its_last_change_written(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep runs in the timer's pauses: a window taken for a later slice of the run and evicted
    meanwhile was neither waiting (no final snapshot) nor in the table at its slice: its last change
    was never written."""
    monkeypatch.setattr(app_module, "SNAPSHOT_SLICE", 1)
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    append = batches.append

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        evicted = spend(job, "daily", "globex", 0.5, 2)

        def sweep_in_the_pause(topic: str, partition: int, records: Any) -> list[asyncio.Future[None]]:
            if not batches.appended:  # the first slice's write: the sweep runs in the pause after it
                run = SnapshotRun(datetime.now(UTC))
                job.snapshots.evicting(evicted, partial(job._usage_snapshot, evicted, run))
                del job.totals.data[evicted]
            return append(topic, partition, records)

        batches.append = sweep_in_the_pause  # type: ignore[method-assign]
        await job._snapshot()
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert sorted(spent_in(value) for value in batches.values()) == [0.5, 1.0]
    assert not job.snapshots.finals and not job.snapshots._latest


def revoke_every_partition(job: BudgetJob, monkeypatch: pytest.MonkeyPatch) -> Awaitable[None]:
    """`_on_revoked` of every usage partition, its changelog write left out (no producer here)."""

    async def written(flushed: bool = False) -> None:
        job.changes.take_records()

    monkeypatch.setattr(job, "_write_changes", written)
    monkeypatch.setattr(app_module, "membership_lost", lambda consumer: False)
    usage = job.settings.topics.usage
    return job._on_revoked(job.app, {TP(usage, partition) for partition in range(job.settings.partitions)})


def test_a_revoked_partitions_windows_are_snapshotted_at_the_revoke_and_never_after(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faust's memory store keeps a revoked partition's keys: this worker's totals of them stop
    where the new owner's go on. A snapshot from them after the revoke (a retry of a failed one,
    or a change still waiting) can land after the new owner's newer one; before the revoke ends
    (the new owner does not read yet) it is the latest value, and it is settled before the revoke
    ends: queued behind earlier batches it could otherwise land after the new owner's."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()  # 1.0 in flight
        spend(job, "daily", "acme", 0.5, 2)  # 1.5 waiting
        spend(job, "daily", "globex", 0.25, 3)  # 0.25 waiting
        revoke = asyncio.ensure_future(revoke_every_partition(job, monkeypatch))
        await asyncio.sleep(0.05)
        assert sorted(spent_in(value) for value in batches.values()) == [0.25, 1.0, 1.5], (
            "the revoked windows' waiting changes were not handed over at the revoke"
        )
        assert not revoke.done(), "the revoke did not wait for its snapshots to be settled"
        await settled(batches, RecordBatchFailed("refused"))
        await asyncio.wait_for(revoke, timeout=1)
        await job._snapshot()
        await job._snapshot()

    asyncio.run(scenario())
    assert len(batches.values()) == 3, f"sent from a revoked partition's table: {batches.values()}"
    assert not job.snapshots.retrying and not job.snapshots.waiting and not job.snapshots._latest


def test_a_worker_the_stall_guard_holds_back_hands_over_no_snapshot(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Resumed after a stall past its session, the worker is expelled before it knows: its snapshots
    (from totals the new owner has moved past) would land after the new owner's. Its batches queued
    meanwhile are asked too, as the changelog's are."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def expelled() -> bool:
        return False

    monkeypatch.setattr(job.stall_guard, "still_member", expelled)

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()

    asyncio.run(scenario())
    assert not batches.appended, "a snapshot handed over after the stall guard said no"
    settings = StreamSettings(data_dir=tmp_path / "other", app_id=f"snapshot-guard-{tmp_path.name}")
    other = BudgetJob(settings, parse_budget_yaml(BUDGETS))
    assert other.snapshots.batches.may_hand_over == other.stall_guard.still_member


def test_after_a_rebalance_every_window_of_the_assigned_partitions_is_snapshotted_and_no_other(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that gains a partition recovers its windows: one whose last snapshot failed at the
    previous owner (which no longer retries it) was never written. Before, only a (re)start's first
    run snapshotted the table, all of it: standby copies of other workers' partitions (possibly
    behind their owner's) included, and none recovered after that run."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    usage, partitions = job.settings.topics.usage, job.settings.partitions
    owned = spend(job, "daily", "acme", 1.0, 1)
    standby = next(
        state_key
        for offset, key in enumerate(("globex", "initech", "umbrella", "hooli", "stark"), 2)
        if usage_partition((state_key := spend(job, "daily", key, 0.5, offset)).rsplit("|", 1)[0], partitions)
        != usage_partition(owned.rsplit("|", 1)[0], partitions)
    )
    job.snapshots.waiting.clear()  # recovered from the changelog: nothing waits yet
    assigned = {TP(usage, usage_partition(owned.rsplit("|", 1)[0], partitions))}
    monkeypatch.setattr(job.app.consumer, "assignment", lambda: assigned)

    async def scenario() -> None:
        await job.app.on_rebalance_complete.send()
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    values = [spent_in(value) for value in batches.values()]
    assert values == [1.0], f"snapshotted {values}: owned {owned} (1.0), standby copy {standby} (0.5)"


def test_a_failed_snapshot_of_a_window_with_nothing_left_to_snapshot_is_forgotten(job: BudgetJob) -> None:
    """Its budget was removed before the retry: no snapshot is built, and nothing of the window may
    stay behind (a worker whose budgets come and go would keep one entry per such window)."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()
        job._budgets = {budget_id: b for budget_id, b in job._budgets.items() if budget_id != "daily"}
        await settled(batches, RecordBatchFailed("refused"))
        await job._snapshot()

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0]
    assert not job.snapshots._latest and not job.snapshots.retrying, job.snapshots._latest


def test_a_revoke_waits_for_a_revoked_windows_snapshot_already_in_flight(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window did not change since its snapshot was queued, so the revoke writes none of it.
    Before, the revoke waited only for its own snapshots: the queued one was handed over after the
    revoke, and could land after the new owner's (a rolling window's `spent` and `updated_at` move
    with time), or fail with no one here to retry it."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]

    async def scenario() -> None:
        spend(job, "rolling", "acme", 1.0, 1)
        await job._snapshot()  # in flight; nothing waits after it
        revoke = asyncio.ensure_future(revoke_every_partition(job, monkeypatch))
        await asyncio.sleep(0.05)
        assert not revoke.done(), "the revoke ended with a revoked window's snapshot in flight"
        await settled(batches, RecordBatchFailed("refused"))
        await asyncio.wait_for(revoke, timeout=1)

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0]
    assert not job.snapshots.retrying and not job.snapshots._latest  # its new owner snapshots it


@pytest.mark.parametrize("fails", ["during the revoke", "after the new assignment"])
def test_a_snapshot_failed_at_a_revoke_is_taken_again_when_the_worker_keeps_the_partition(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """This worker forgets the revoked window (`disown`) and gets its partition back: the snapshot
    after the rebalance covers the failed one, whether the failure settles while the revoke waits
    or (expelled: the revoke waits for nothing) after the new assignment's recovery."""
    batches: ControlledBatches = job.snapshots.batches  # type: ignore[assignment]
    usage = job.settings.topics.usage
    every = {TP(usage, partition) for partition in range(job.settings.partitions)}
    monkeypatch.setattr(job.app.consumer, "assignment", lambda: every)
    expelled = fails == "after the new assignment"

    async def scenario() -> None:
        spend(job, "daily", "acme", 1.0, 1)
        await job._snapshot()
        revoke = asyncio.ensure_future(revoke_every_partition(job, monkeypatch))
        if expelled:
            monkeypatch.setattr(app_module, "membership_lost", lambda consumer: True)
            job.changes.take_records()  # written before the stall: nothing pending
            await asyncio.wait_for(revoke, timeout=1)
            await job.app.on_rebalance_complete.send()
            await settled(batches, RecordBatchFailed("refused"))
        else:
            await asyncio.sleep(0.05)
            await settled(batches, RecordBatchFailed("refused"))
            await asyncio.wait_for(revoke, timeout=1)
            await job.app.on_rebalance_complete.send()
        await job._snapshot()
        await settled(batches)

    asyncio.run(scenario())
    assert [spent_in(value) for value in batches.values()] == [1.0, 1.0]
    assert not job.snapshots.retrying and not job.snapshots.waiting and not job.snapshots._latest
