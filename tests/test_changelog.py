"""Table changes reach the changelog once per key per write (each batch, or each flush), latest value."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import faust
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream import changelog, record_batches
from burnguard.stream.accounting import WindowTotals
from burnguard.stream.app import BudgetJob
from burnguard.stream.changelog import ChangelogWriteFailed, TableChanges, _encoder, encode
from burnguard.stream.settings import StreamSettings
from faust.serializers import codecs
from faust.types import TP
from kafka import KafkaConsumer, TopicPartition

from tests.factories import budgets_yaml, tenant_cost


@pytest.fixture
def app() -> faust.App:
    return faust.App("changelog-test", store="memory://", web_enabled=False)


def test_each_changed_key_is_written_once_with_its_latest_value(app: faust.App) -> None:
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app)
    changes.partition = 2
    for spent in (1.0, 2.0, 3.5):
        changes.set(totals, "tenant|acme|0", WindowTotals(spent=spent, spans=1))

    assert totals.data["tenant|acme|0"].spent == 3.5  # the store changes at once
    records = changes.take_records()
    assert len(records) == 1
    topic, partition, key, value = records[0]
    assert (topic, partition, json.loads(key)) == ("changelog-test-totals-changelog", 2, "tenant|acme|0")
    assert WindowTotals.from_state(json.loads(value)).spent == 3.5
    assert changes.take_records() == []  # taken once


def test_a_key_goes_to_the_partition_of_the_event_that_changed_it(app: faust.App) -> None:
    states = app.Table("states", default=None, partitions=4)
    changes = TableChanges(app)
    for partition, key in ((0, "a"), (3, "b")):
        changes.partition = partition
        changes.set(states, key, {"action": "warn"})
    written = sorted((record[1], json.loads(record[2])) for record in changes.take_records())
    assert written == [(0, "a"), (3, "b")]


def test_a_deleted_key_becomes_a_tombstone(app: faust.App) -> None:
    states = app.Table("states", default=None, partitions=4)
    changes = TableChanges(app)
    changes.set(states, "a", {"action": "throttle"})
    changes.take_records()
    changes.delete(states, "a")
    changes.delete(states, "never-set")  # nothing to delete: no record
    assert "a" not in states.data
    assert [(json.loads(record[2]), record[3]) for record in changes.take_records()] == [("a", None)]


@pytest.mark.parametrize(
    "value",
    ["tenant|acme|1", "t\u00e9nant|\u6771\u4eac", {"action": "warn", "window_start_ns": 12}, None, 1.5],
)
def test_values_are_encoded_as_faust_decodes_them(value: object) -> None:
    assert codecs.loads("json", encode("json", value)) == codecs.loads("json", codecs.dumps("json", value))


def test_window_totals_are_encoded_through_their_state() -> None:
    totals = WindowTotals()
    totals.add(1, 7, 0.25, 2, 10, 20, 0, [1.0, 0.0, 0.0, 0.0])
    assert WindowTotals.from_state(json.loads(encode("json", totals))).to_state() == totals.to_state()


def test_the_records_are_the_bytes_json_dumps_writes(app: faust.App) -> None:
    """The encoder built once writes the keys `json.dumps` with the same arguments wrote per record,
    byte for byte (compaction goes by them), and values that decode the same (window totals go
    through msgspec: tests/test_changelog_encoding.py)."""
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app)
    rolling = WindowTotals.from_state([0.5, 3, 1, 2, {"0": 9}, [4, [0.25, 0.0, 1e-300]], [7, [1.5]], None])
    values = {"t\u00e9nant|\u6771\u4eac|0": rolling, 'a|"q"|1': {"action": "warn", "window_start_ns": 12}}
    for key, value in values.items():
        changes.set(totals, key, value)
    changes.set(totals, "gone|x|0", 1.5)
    changes.delete(totals, "gone|x|0")

    def dumped(value: object) -> bytes:
        return json.dumps(value, default=lambda o: o.__json__(), separators=(",", ":")).encode()

    records = {(topic, key): value and json.loads(value) for topic, _, key, value in changes.take_records()}
    expected = {
        ("changelog-test-totals-changelog", dumped(k)): json.loads(dumped(v)) for k, v in values.items()
    }
    expected[("changelog-test-totals-changelog", b'"gone|x|0"')] = None
    assert records == expected
    assert _encoder("pickle")({"action": "ok"}) == codecs.dumps("pickle", {"action": "ok"})  # other codecs


class CapturedBatches:
    """Stands in for the producer side: the records each write queued, delivered at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes, bytes | None]] = []

    async def room(self) -> None:
        return None

    def append(self, topic: str, partition: int, records: object) -> list[asyncio.Future[None]]:
        self.sent += [(topic, partition, *record) for record in records]  # type: ignore[attr-defined]
        delivered = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return [delivered]


def test_the_cache_writes_each_key_once_across_batches_and_covers_only_processed_records(
    app: faust.App,
) -> None:
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app, flush_interval_s=3600)
    changes.batches = CapturedBatches()  # type: ignore[assignment]
    tp = TP("burnguard.usage", 1)
    changes.partition = 1
    for offset, spent in enumerate((1.0, 2.0, 3.0)):  # three batches, the same key
        changes.set(totals, "tenant|acme|0", WindowTotals(spent=spent, spans=1))
        changes.processed(tp, offset)
    assert not changes.due()
    assert changes.pending()
    changes.processed(tp, 1)  # a re-reading moves nothing back

    covered = asyncio.run(changes.write())

    assert covered == {tp: 3}
    assert not changes.pending()
    (record,) = changes.batches.sent
    assert record[:2] == ("changelog-test-totals-changelog", 1)
    assert WindowTotals.from_state(json.loads(record[3])).spent == 3.0
    assert asyncio.run(changes.write()) == {tp: 3}  # nothing new: nothing more written
    assert asyncio.run(changes.delivered()) == {tp: 3}
    assert len(changes.batches.sent) == 1
    changes.forget([tp])
    assert asyncio.run(changes.write()) == {}


def test_with_no_flush_interval_every_batch_is_due(app: faust.App) -> None:
    assert TableChanges(app).due()
    assert TableChanges(app, flush_interval_s=0.0).due()


@pytest.mark.parametrize(("interval_s", "tick_s"), [(1.0, 0.25), (10.0, 2.5), (0.1, 0.05), (0.0, 1.0)])
def test_the_flush_timer_ticks_four_times_an_interval_never_faster_than_50_ms(
    interval_s: float, tick_s: float
) -> None:
    """A change due just after a tick waits at most a quarter of the interval more, not a whole one."""
    assert changelog.flush_tick_s(interval_s) == pytest.approx(tick_s)


@pytest.mark.parametrize(("raw", "seconds"), [(None, 1.0), ("0", 0.0), ("250", 0.25), ("10000", 10.0)])
def test_the_flush_interval_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, seconds: float
) -> None:
    if raw is None:
        monkeypatch.delenv("BURNGUARD_CHANGELOG_FLUSH_MS", raising=False)
    else:
        monkeypatch.setenv("BURNGUARD_CHANGELOG_FLUSH_MS", raw)
    assert StreamSettings.from_env().changelog_flush.total_seconds() == seconds


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "10001", "soon"])
def test_a_bad_flush_interval_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("BURNGUARD_CHANGELOG_FLUSH_MS", raw)
    with pytest.raises(ValueError, match="BURNGUARD_CHANGELOG_FLUSH_MS"):
        StreamSettings.from_env()


#: what the refusing changelog topic below accepts in one message (`max.message.bytes`)
REFUSED_ABOVE = 1024


#: The source records' changes: small, one the changelog (or the producer) refuses, small.
THREE_CHANGES = ({"v": 1}, {"v": "x" * 4 * REFUSED_ABOVE}, {"v": 3})
USAGE_TP = TP("burnguard.usage", 0)


@contextlib.asynccontextmanager
async def changes_on_the_broker(
    bootstrap: str, app_id: str, **app_options: object
) -> AsyncIterator[tuple[faust.App, object, TableChanges]]:
    """A Faust app with one table, its record cache and a running producer on the real broker."""
    broker = f"kafka://{bootstrap}"
    app = faust.App(app_id, broker=broker, store="memory://", web_enabled=False, **app_options)
    totals = app.Table("totals", default=None, partitions=1)
    await app.producer.start()
    try:
        yield app, totals, TableChanges(app, flush_interval_s=3600)
    finally:
        await app.producer.stop()


async def outcome_of(attempt: Callable[[], Awaitable[object]]) -> object:
    """What `attempt` returned, or the exception it raised."""
    try:
        return await attempt()
    except Exception as exc:
        return exc


async def covers_around_a_refused_write(bootstrap: str, app_id: str) -> list[object]:
    """What each write returned (a cover, or the exception it raised) around a record the broker refuses.

    The records at offsets 0 and 2 of the source change small keys; the one
    at offset 1 changes a key to a value the changelog topic refuses.
    """
    outcomes: list[object] = []
    async with changes_on_the_broker(bootstrap, app_id) as (app, totals, changes):
        for offset, value in enumerate(THREE_CHANGES):
            changes.set(totals, f"key-{offset}", value)
            changes.processed(USAGE_TP, offset)
            outcomes.append(await outcome_of(changes.write))
            await outcome_of(app.producer.flush)
            outcomes.append(await outcome_of(changes.delivered))
    return outcomes


def test_a_change_the_broker_refuses_is_never_covered_and_stops_the_cache(kafka_broker: object) -> None:
    """A refused changelog record must hold back every later cover: a commit past it loses counts.

    aiokafka's flush, which Faust runs before a commit, does not fail when a
    record was refused; only the record's own delivery future does.
    """
    app_id = f"changelog-refused-{time.monotonic_ns()}"
    kafka_broker.create_topic(  # type: ignore[attr-defined]
        f"{app_id}-totals-changelog", partitions=1, config={"max.message.bytes": str(REFUSED_ABOVE)}
    )
    tp = USAGE_TP
    outcomes = asyncio.run(covers_around_a_refused_write(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    covers = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    assert {tp: 1} in covers, f"the delivered first change was never covered: {outcomes}"
    assert all(cover.get(tp, 0) <= 1 for cover in covers), f"a cover passed the refused change: {outcomes}"
    assert isinstance(outcomes[-1], ChangelogWriteFailed), f"the cache went on after a refusal: {outcomes}"


async def covers_around_a_write_failing_half_way(bootstrap: str, app_id: str) -> list[object]:
    """What each write returned around one whose second record the producer refuses to take.

    The producer refuses a record above its `producer_max_request_size` in
    `send` itself: the first record of that write is sent, the third never.
    """
    options = {"producer_max_request_size": REFUSED_ABOVE}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (app, totals, changes):
        for offset, value in enumerate(THREE_CHANGES):
            changes.set(totals, f"key-{offset}", value)
            changes.processed(USAGE_TP, offset)
        outcomes = [await outcome_of(changes.write) for _ in range(2)]
        changes.set(totals, "key-3", {"v": 4})
        changes.processed(USAGE_TP, 3)
        await app.producer.flush()
        outcomes += [await outcome_of(changes.write), await outcome_of(changes.delivered)]
    return outcomes


def test_a_write_failing_half_way_is_never_covered_and_stops_the_cache(kafka_broker: object) -> None:
    """The records of a write not yet handed over when `send` raised are lost: nothing may cover them."""
    app_id = f"changelog-half-way-{time.monotonic_ns()}"
    outcomes = asyncio.run(covers_around_a_write_failing_half_way(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert isinstance(outcomes[0], Exception), f"the refused record did not fail its write: {outcomes}"
    covers = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    assert all(not cover for cover in covers), f"a cover passed the lost changes: {outcomes}"
    assert all(isinstance(outcome, ChangelogWriteFailed) for outcome in outcomes), outcomes


def test_a_flood_of_distinct_keys_is_written_before_the_interval_ends(app: faust.App) -> None:
    """Pending changes stay bounded: past `MAX_PENDING_KEYS` distinct keys a write is due at once."""
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app, flush_interval_s=3600)
    for index in range(changelog.MAX_PENDING_KEYS - 1):
        changes.set(totals, f"tenant|{index}|0", {"spent": index})
    changes.set(totals, "tenant|0|0", {"spent": -1})  # the same key again: still one pending record
    changes.delete(totals, "never-set")
    assert not changes.due()
    changes.delete(totals, "tenant|1|0")  # a deletion replaces the pending change: no new key
    assert not changes.due()
    changes.set(totals, "tenant|flood|0", {"spent": 0})
    assert changes.due()
    assert len(changes.take_records()) == changelog.MAX_PENDING_KEYS
    assert not changes.due()


def changelog_records(bootstrap: str, topic: str, partition: int) -> list[tuple[bytes, bytes | None]]:
    """(key, value) of every record in one changelog partition, in offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    records: list[tuple[bytes, bytes | None]] = []
    while consumer.position(tp) < end:
        for batch in consumer.poll(timeout_ms=1000).values():
            records += [(record.key, record.value) for record in batch]
    consumer.close()
    return records


async def two_writes_back_to_back(bootstrap: str, app_id: str) -> list[object]:
    """Write a key on partition 1 behind several full batches of partition 0, then again at once.

    The producer's batches are small (`producer_max_batch_size`), so the
    first write's partition-0 records fill several batches, each of which
    waits for the one before it to drain; the second write reaches partition
    1 first. A hand-over per write, going partition by partition, puts the
    newer value on partition 1 first (it did, in a task per write unchained).
    """
    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (_app, totals, changes):
        outcomes: list[object] = []
        for write, value in enumerate(("older", "newer")):
            for partition in (1, 0) if write else (0, 1):  # the newer write reaches partition 1 first
                changes.partition = partition
                for index in range(0 if write or partition else 200):
                    changes.set(totals, f"filler-{index}", {"pad": "x" * 100})
                changes.set(totals, f"shared-{partition}", {"v": value})
            changes.processed(USAGE_TP, write)
            outcomes.append(await outcome_of(changes.write))
        outcomes.append(await outcome_of(changes.delivered))
    return outcomes


def test_a_later_write_never_lands_before_an_earlier_one_on_a_partition(kafka_broker: object) -> None:
    """Back-to-back writes of one key: the changelog holds the older value first, the newer last.

    A recovery keeps the last value it reads: a newer write's batch handed
    over while an older one still waits for a drain would restore the old value.
    """
    app_id = f"changelog-order-{time.monotonic_ns()}"
    topic = f"{app_id}-totals-changelog"
    kafka_broker.create_topic(topic, partitions=2)  # type: ignore[attr-defined]
    outcomes = asyncio.run(two_writes_back_to_back(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert outcomes[-1] == {USAGE_TP: 2}, outcomes
    for partition in (0, 1):
        key = json.dumps(f"shared-{partition}").encode()
        values = [
            json.loads(value)["v"]
            for k, value in changelog_records(kafka_broker.bootstrap, topic, partition)
            if k == key
        ]  # type: ignore[attr-defined]
        assert values == ["older", "newer"], f"partition {partition}: {values}"
    assert len(changelog_records(kafka_broker.bootstrap, topic, 0)) == 202  # type: ignore[attr-defined]


async def covers_around_a_refused_batch(bootstrap: str, app_id: str) -> list[object]:
    """One write of a small and a refused change to one partition (one batch), then a small one."""
    async with changes_on_the_broker(bootstrap, app_id) as (_app, totals, changes):
        for offset, value in enumerate(THREE_CHANGES[:2]):
            changes.set(totals, f"key-{offset}", value)
            changes.processed(USAGE_TP, offset)
        outcomes = [await outcome_of(changes.write), await outcome_of(changes.delivered)]
        changes.set(totals, "key-2", THREE_CHANGES[2])
        changes.processed(USAGE_TP, 2)
        outcomes += [await outcome_of(changes.write), await outcome_of(changes.delivered)]
    return outcomes


def test_a_refused_batch_refuses_all_its_records_and_stops_the_cache(kafka_broker: object) -> None:
    """The broker refuses a batch whole: its small record is not written either, and nothing covers it."""
    app_id = f"changelog-refused-batch-{time.monotonic_ns()}"
    topic = f"{app_id}-totals-changelog"
    kafka_broker.create_topic(topic, partitions=1, config={"max.message.bytes": str(REFUSED_ABOVE)})  # type: ignore[attr-defined]
    outcomes = asyncio.run(covers_around_a_refused_batch(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert all(not outcome for outcome in outcomes if isinstance(outcome, dict)), outcomes
    assert isinstance(outcomes[1], ChangelogWriteFailed), f"the refused write was delivered: {outcomes}"
    assert f"{topic}[0]" in str(outcomes[1]), f"the error does not say which changelog refused: {outcomes[1]}"
    assert "2 records" in str(outcomes[1]), (
        f"the error does not say how many records were lost: {outcomes[1]}"
    )
    assert all(isinstance(outcome, ChangelogWriteFailed) for outcome in outcomes[1:]), outcomes
    assert changelog_records(kafka_broker.bootstrap, topic, 0) == []  # type: ignore[attr-defined]


async def covers_around_a_hand_over_failing_half_way(bootstrap: str, app_id: str) -> list[object]:
    """A write to partitions 0 and 1 of a changelog topic that has partition 0 only, then another.

    Partition 0's batch is handed over; the producer refuses partition 1's
    (`send_batch`: unknown partition), so the write is half done.
    """
    async with changes_on_the_broker(bootstrap, app_id) as (_app, totals, changes):
        for partition in (0, 1):
            changes.partition = partition
            changes.set(totals, f"key-{partition}", {"v": partition})
        changes.processed(USAGE_TP, 0)
        outcomes = [await outcome_of(changes.write), await outcome_of(changes.delivered)]
        changes.partition = 0
        changes.set(totals, "key-2", {"v": 2})
        changes.processed(USAGE_TP, 1)
        outcomes += [await outcome_of(changes.write), await outcome_of(changes.delivered)]
    return outcomes


def test_a_hand_over_failing_half_way_is_never_covered_and_stops_the_cache(kafka_broker: object) -> None:
    """The batches of a write after the one the producer refused are lost: nothing may cover them."""
    app_id = f"changelog-hand-over-{time.monotonic_ns()}"
    kafka_broker.create_topic(f"{app_id}-totals-changelog", partitions=1)  # type: ignore[attr-defined]
    outcomes = asyncio.run(covers_around_a_hand_over_failing_half_way(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert all(not outcome for outcome in outcomes if isinstance(outcome, dict)), outcomes
    assert all(isinstance(outcome, ChangelogWriteFailed) for outcome in outcomes[1:]), outcomes
    assert f"{app_id}-totals-changelog[1]" in str(outcomes[1]), (
        f"the error does not name the partition: {outcomes}"
    )


def returned_at_once(write: Coroutine[Any, Any, dict[TP, int]]) -> bool:
    """Whether `write` ran to its end without waiting for anything (it is closed if it would wait)."""
    try:
        write.send(None)
    except StopIteration:
        return True
    write.close()
    return False


async def writes_while_a_drain_is_pending(bootstrap: str, app_id: str) -> tuple[list[bool], object]:
    """A write of three small batches, then five one-key writes back to back, each after a loop step.

    The first batch goes into the producer's accumulator at once; the next
    one's `send_batch` waits for it to drain, one produce round trip.
    """
    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (_app, totals, changes):
        for index in range(30):
            changes.set(totals, f"filler-{index}", {"pad": "x" * 100})
        changes.processed(USAGE_TP, 0)
        await changes.write()
        at_once = []
        for write in range(1, 6):
            await asyncio.sleep(0)  # the hand-over and the producer's sender go a step further
            changes.set(totals, "shared", {"v": write})
            changes.processed(USAGE_TP, write)
            at_once.append(returned_at_once(changes.write()))
        return at_once, await outcome_of(changes.delivered)


def test_back_to_back_writes_never_wait_for_the_producer_to_drain_a_batch(kafka_broker: object) -> None:
    """The agent writes and goes on: a later write joins the partition's queued batch, in order."""
    app_id = f"changelog-no-wait-{time.monotonic_ns()}"
    topic = f"{app_id}-totals-changelog"
    kafka_broker.create_topic(topic, partitions=1)  # type: ignore[attr-defined]
    at_once, cover = asyncio.run(writes_while_a_drain_is_pending(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert at_once == [True] * 5, f"a write waited: {at_once}"
    assert cover == {USAGE_TP: 6}
    key = json.dumps("shared").encode()
    values = [json.loads(v)["v"] for k, v in changelog_records(kafka_broker.bootstrap, topic, 0) if k == key]  # type: ignore[attr-defined]
    assert values == [1, 2, 3, 4, 5]


async def a_write_behind_too_many_batches(bootstrap: str, app_id: str) -> tuple[bool, object, object]:
    """A write that fills more than `MAX_QUEUED_BATCHES` small batches, then a one-key write."""
    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (_app, totals, changes):
        for index in range(30 * record_batches.MAX_QUEUED_BATCHES):
            changes.set(totals, f"filler-{index}", {"pad": "x" * 100})
        changes.processed(USAGE_TP, 0)
        await changes.write()
        changes.set(totals, "late", {"v": 1})
        changes.processed(USAGE_TP, 1)
        waiting = asyncio.ensure_future(changes.write())
        await asyncio.sleep(0)
        waited = not waiting.done()
        return waited, await outcome_of(lambda: waiting), await outcome_of(changes.delivered)


def test_a_write_waits_while_a_partition_has_too_many_batches_queued(kafka_broker: object) -> None:
    """Pending batches stay bounded: a broker that does not keep up slows the agent down."""
    app_id = f"changelog-bounded-{time.monotonic_ns()}"
    kafka_broker.create_topic(f"{app_id}-totals-changelog", partitions=1)  # type: ignore[attr-defined]
    waited, written, delivered = asyncio.run(a_write_behind_too_many_batches(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert waited, "the write went on with more than MAX_QUEUED_BATCHES batches queued"
    assert isinstance(written, dict) and delivered == {USAGE_TP: 2}, (written, delivered)


async def write_many_small_batches(totals: Any, changes: Any, may_write: Any = None) -> None:
    """One write of enough keys to fill many 2 KiB batches of a partition (more than can be queued)."""
    for index in range(30 * record_batches.MAX_QUEUED_BATCHES):
        changes.set(totals, f"filler-{index}", {"pad": "x" * 100})
    changes.processed(USAGE_TP, 0)
    await (changes.write() if may_write is None else changes.write(may_write))


async def delivery_outcome(changes: Any) -> object:
    """How `delivered` ends within 20 s, or "never settled"."""
    try:
        return await asyncio.wait_for(outcome_of(changes.delivered), timeout=20)
    except TimeoutError:
        return "never settled"


async def delivery_after_the_producer_stops(bootstrap: str, app_id: str) -> object:
    """A write that fills several small batches, the producer stopped at once, then the wait for delivery.

    The first batch is in the producer's accumulator, the others queued behind it
    (`RecordBatches`): the stop comes while the hand-over waits for a drain.
    """
    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (app, totals, changes):
        await write_many_small_batches(totals, changes)
        await asyncio.sleep(0)
        await app.producer.stop()
        return await delivery_outcome(changes)


def test_batches_queued_when_the_producer_stops_are_delivered_or_fail_never_hang(
    kafka_broker: object,
) -> None:
    """A stopping producer must not leave a queued batch's delivery unsettled: the revoke, the stop
    and the commit cap wait for it, and nothing would ever tell that its records were lost."""
    app_id = f"changelog-producer-stop-{time.monotonic_ns()}"
    kafka_broker.create_topic(f"{app_id}-totals-changelog", partitions=1)  # type: ignore[attr-defined]
    outcome = asyncio.run(delivery_after_the_producer_stops(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert outcome == {USAGE_TP: 1} or isinstance(outcome, ChangelogWriteFailed), outcome


class BatchesWithoutRoom(CapturedBatches):
    """Captured batches whose `room` waits until `free` is set: a partition with too many batches queued."""

    def __init__(self) -> None:
        super().__init__()
        self.free = asyncio.Event()

    async def room(self) -> None:
        await self.free.wait()


async def records_written_after_a_stall_during_the_wait_for_room(job: BudgetJob) -> list[object]:
    """A write waits for room; the process stands still meanwhile and the group expels it.

    The stall guard would say so at any check after the stall (`still_member`
    False); what did the write hand over once the room came?
    """
    member = [True]

    async def still_member() -> bool:
        return member[0]

    job.stall_guard.still_member = still_member  # type: ignore[method-assign]
    batches = BatchesWithoutRoom()
    job.changes.batches = batches  # type: ignore[assignment]
    job.changes.set(job.totals, "tenant-cost|acme|0", {"spent": 1.0})
    job.changes.processed(USAGE_TP, 0)
    writing = asyncio.ensure_future(job._write_changes())
    await asyncio.sleep(0.05)
    assert not writing.done(), "the write did not wait for room"
    member[0] = False  # stood still past the session timeout while waiting: expelled
    batches.free.set()
    await outcome_of(lambda: writing)
    return batches.sent


def test_a_write_that_waited_for_room_hands_nothing_over_once_the_worker_was_expelled(tmp_path: Any) -> None:
    """The stall guard's check must come after every wait of a write, just before its records are taken.

    Checked before the wait for room (or for the write lock), a stall during
    that wait goes unseen: the records go into changelogs another worker owns.
    """
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"stall-room-{tmp_path.name}")
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1))))
    sent = asyncio.run(records_written_after_a_stall_during_the_wait_for_room(job))
    assert sent == [], f"records handed over after the stall guard would have held them back: {sent}"
    assert job.changes.pending(), "the held-back change must stay pending (the revoke then stops the worker)"


def padded_to(size: int, key: bytes) -> dict[str, str]:
    """A value whose record with `key` is `size` bytes as aiokafka counts it (a batch of one)."""
    pad = size - DefaultRecordBatchBuilder.estimate_size_in_bytes(key, encode("json", {"v": ""}), [])
    while DefaultRecordBatchBuilder.estimate_size_in_bytes(key, encode("json", {"v": "x" * pad}), []) > size:
        pad -= 1  # the lengths' varints grew
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(key, encode("json", {"v": "x" * pad}), []) == size
    return {"v": "x" * pad}


async def writes_at_the_request_size(bootstrap: str, app_id: str, over: int) -> list[object]:
    """A write of a small record, one of the producer's max request size plus `over` bytes, a small one."""
    options = {"producer_max_request_size": 4 * REFUSED_ABOVE}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (_app, totals, changes):
        big = padded_to(4 * REFUSED_ABOVE + over, encode("json", "key-1"))
        for offset, value in enumerate(({"v": 0}, big, {"v": 2})):
            changes.set(totals, f"key-{offset}", value)
            changes.processed(USAGE_TP, offset)
        return [await outcome_of(changes.write), await outcome_of(changes.delivered)]


@pytest.mark.parametrize("over", [0, 1])
def test_a_record_at_the_producers_max_request_size_is_written_and_one_byte_more_refused_naming_its_topic(
    kafka_broker: object, over: int
) -> None:
    """The write's own size check refuses exactly what the producer's `send` refuses, no more, no less."""
    app_id = f"changelog-request-size-{over}-{time.monotonic_ns()}"
    topic = f"{app_id}-totals-changelog"
    kafka_broker.create_topic(topic, partitions=1)  # type: ignore[attr-defined]
    outcomes = asyncio.run(writes_at_the_request_size(kafka_broker.bootstrap, app_id, over))  # type: ignore[attr-defined]
    if over:
        assert isinstance(outcomes[0], ChangelogWriteFailed) and topic in str(outcomes[0]), outcomes
        assert isinstance(outcomes[1], ChangelogWriteFailed), outcomes
    else:
        assert outcomes == [outcomes[0], {USAGE_TP: 3}], outcomes
        keys = [key for key, _ in changelog_records(kafka_broker.bootstrap, topic, 0)]  # type: ignore[attr-defined]
        assert keys == [encode("json", f"key-{offset}") for offset in range(3)]


async def records_landed_after_the_guard_turned(bootstrap: str, app_id: str) -> object:
    """A write that fills many small batches; right after it returns the stall guard says no.

    As when the process stands still while its batches wait behind a drain,
    and the group expels it: the guard says so once it resumes.
    """
    member = [True]

    async def still_member() -> bool:
        return member[0]

    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (_app, totals, changes):
        await write_many_small_batches(totals, changes, still_member)
        member[0] = False
        return await delivery_outcome(changes)


def test_batches_queued_when_the_worker_was_expelled_are_not_handed_over_and_stop_the_cache(
    kafka_broker: object,
) -> None:
    """A queued batch is handed over only while the stall guard allows writes, like a write's records.

    The queue holds batches for several produce round trips; handed over after
    the worker was expelled, they land after its successor's newer values.
    """
    app_id = f"changelog-expelled-queue-{time.monotonic_ns()}"
    topic = f"{app_id}-totals-changelog"
    kafka_broker.create_topic(topic, partitions=1)  # type: ignore[attr-defined]
    outcome = asyncio.run(records_landed_after_the_guard_turned(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    landed = changelog_records(kafka_broker.bootstrap, topic, 0)  # type: ignore[attr-defined]
    assert landed == [], f"{len(landed)} records handed over after the guard said no (outcome {outcome})"
    assert isinstance(outcome, ChangelogWriteFailed), outcome


async def cover_right_after_a_producer_flush(bootstrap: str, app_id: str) -> tuple[object, int, object]:
    """A write of many small batches, the producer flushed at once (as Faust does before a commit):
    the cover then, the records landed then, the cover once every batch is delivered."""
    options = {"producer_max_batch_size": 2048}
    async with changes_on_the_broker(bootstrap, app_id, **options) as (app, totals, changes):
        for index in range(30 * record_batches.MAX_QUEUED_BATCHES):
            changes.set(totals, f"filler-{index}", {"pad": "x" * 100})
        changes.processed(USAGE_TP, 0)
        await changes.write()
        await app.producer.flush()
        cover = await outcome_of(changes.write)  # nothing new: what the writes delivered so far cover
        landed = len(changelog_records(bootstrap, f"{app_id}-totals-changelog", 0))  # the loop stands still
        return cover, landed, await outcome_of(changes.delivered)


def test_a_producer_flush_misses_queued_batches_and_the_cover_never_counts_them(kafka_broker: object) -> None:
    """Faust's flush before a commit waits only for the producer's accumulator, not for the batches
    queued behind it: the commit is safe only because the cover counts deliveries, not flushes."""
    app_id = f"changelog-flush-{time.monotonic_ns()}"
    kafka_broker.create_topic(f"{app_id}-totals-changelog", partitions=1)  # type: ignore[attr-defined]
    cover, landed, delivered = asyncio.run(cover_right_after_a_producer_flush(kafka_broker.bootstrap, app_id))  # type: ignore[attr-defined]
    assert landed < 30 * record_batches.MAX_QUEUED_BATCHES, (
        "the flush waited for every queued batch after all"
    )
    assert cover == {}, f"covered after a flush while {landed} of the write's records had landed: {cover}"
    assert delivered == {USAGE_TP: 1}
