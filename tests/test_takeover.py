"""A seek back (the rewind after a rebalance, the watchdog's) loses no record, whatever the fetcher holds.

These run Faust's own fetcher loop (`Consumer._drain_messages`, faust-streaming
0.15.3) over an in-memory partition: only the two transport calls it makes
to aiokafka (`_getmany`, `_seek`) are replaced. The partition is left as the
stall of faust-streaming#629 leaves it: the fetcher is past records the
agents never got. The seek back to the commit is asked for while the fetcher
still holds a batch fetched before it, as happened under CPU load in
`tests/test_e2e_exactly_once.py`: run at once, the seek's read offset was
overwritten by that batch, the records it was for were dropped as already
read, and Faust's next commit went past them.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord
from burnguard.stream.changelog import TableChanges
from burnguard.stream.takeover import (
    FetcherStopped,
    between_fetches,
    in_order_reads,
    membership_lost,
    seek_back,
)
from faust.types import TP

TOPIC = "otlp_spans"
TP0 = TP(TOPIC, 0)
LOG_END = 10
#: where the stall left the fetcher: records below it were never delivered
STALLED_AT = 6
BATCH = 4


def record(offset: int) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", b"v", None, 1, 1, ())


class Partition:
    """One partition of `LOG_END` records and the fetch position on it, as aiokafka would keep it."""

    def __init__(self, position: int) -> None:
        self.position = position

    async def getmany(self, active_partitions: Any, timeout: float) -> dict[TP, list[ConsumerRecord]]:
        start = self.position
        if start >= LOG_END:
            await asyncio.sleep(0.005)
            return {}
        self.position = end = min(start + BATCH, LOG_END)
        return {TP0: [record(offset) for offset in range(start, end)]}

    async def seek(self, partition: TP, offset: int) -> None:
        self.position = offset

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return dict.fromkeys(partitions, 0)


def stalled_consumer(committed: int | None, partition: Partition) -> Any:
    """Faust's consumer over `partition`, the fetcher past records never delivered (#629)."""
    app = faust.App("test-takeover", broker="kafka://127.0.0.1:1", web_enabled=False)
    consumer = app.consumer
    app.topics._acking_topics.add(TOPIC)
    consumer._getmany = partition.getmany
    consumer._seek = partition.seek
    consumer.highwater = lambda tp: LOG_END
    consumer._active_partitions = {TP0}
    consumer.assignment = lambda: {TP0}
    consumer.earliest_offsets = partition.earliest_offsets
    if committed is not None:
        consumer._committed_offset[TP0] = committed
        consumer._read_offset[TP0] = partition.position - 1  # marked read, never delivered
    return consumer


async def drain(consumer: Any, agents: Any, done: Any) -> None:
    """Run Faust's fetcher loop with `agents` as its callback until `done()`."""
    consumer.callback = agents
    fetcher = SimpleNamespace(_stopped=asyncio.Event())
    task = asyncio.ensure_future(consumer._drain_messages(fetcher))
    for _ in range(400):
        await asyncio.sleep(0.005)
        if done():
            break
    fetcher._stopped.set()
    await asyncio.wait_for(task, 5)


async def drain_with_a_rewind_to(committed: int | None) -> tuple[list[int], int | None]:
    """Offsets the agents got, and the offset Faust would commit, after a rewind while a batch is held."""
    consumer = stalled_consumer(committed, Partition(position=STALLED_AT))
    target = committed or 0
    between_fetches(consumer)  # installed before the fetcher starts, as the sensors do
    delivered: list[int] = []
    rewinds: list[asyncio.Future[None]] = []

    async def agents(message: Any) -> None:
        delivered.append(message.offset)
        consumer.ack(message)
        if not rewinds:  # the rewind starts while the fetcher holds the rest of its first batch
            rewinds.append(asyncio.ensure_future(seek_back(consumer, {TP0: target})))
            for _ in range(5):
                await asyncio.sleep(0)

    def done() -> bool:
        return bool(rewinds) and rewinds[0].done() and set(range(target, LOG_END)) <= set(delivered)

    await drain(consumer, agents, done)
    await rewinds[0]
    return delivered, consumer._new_offset(TP0)


@pytest.mark.parametrize("committed", [None, 3], ids=["no-commit-yet", "committed"])
def test_a_rewind_while_the_fetcher_holds_records_delivers_every_record_before_the_commit(
    committed: int | None,
) -> None:
    delivered, commit = asyncio.run(drain_with_a_rewind_to(committed))
    target = committed or 0
    assert delivered[0] == STALLED_AT, "the scenario did not start stalled"
    missing = sorted(set(range(target, LOG_END)) - set(delivered))
    assert not missing, f"records {missing} were never delivered (delivered in order: {delivered})"
    assert commit == LOG_END
    assert delivered.index(target) > delivered.index(STALLED_AT), "the rewind ran before the stalled batch"


def commit(consumer: Any) -> int | None:
    """What Faust would commit now (it records the commit as its own does)."""
    offset = consumer._new_offset(TP0)
    if offset is not None and offset > (consumer._committed_offset.get(TP0) or 0):
        consumer._committed_offset[TP0] = offset
    return offset


async def agents_reading_in_order(committed: int) -> tuple[list[int], list[int | None]]:
    """Offsets the agents processed and Faust's commits, when the stall hands them later records first."""
    consumer = stalled_consumer(committed, Partition(position=STALLED_AT))
    reads = in_order_reads(consumer)
    reads.topics.add(TOPIC)
    reads.expected[TP0] = committed  # as the rewind after recovery leaves it
    processed: list[int] = []
    commits: list[int | None] = []

    async def agents(message: Any) -> None:
        if reads.admit(message):
            processed.append(message.offset)
        consumer.ack(message)
        commits.append(commit(consumer))
        await asyncio.sleep(0)

    await drain(consumer, agents, lambda: LOG_END - 1 in processed and not reads._seeking)
    return processed, commits


def test_an_agent_processes_a_partition_in_order_from_the_commit_whatever_faust_hands_it() -> None:
    committed = 3
    processed, commits = asyncio.run(agents_reading_in_order(committed))
    assert processed[: LOG_END - committed] == list(range(committed, LOG_END)), processed
    assert all(offset < LOG_END for offset in processed[LOG_END - committed :]), "only re-readings after"
    assert max(commit or 0 for commit in commits[: processed.index(committed) + 1]) <= committed, (
        "Faust committed records the agents had not processed"
    )
    assert consumer_commit_reached(commits) == LOG_END


def consumer_commit_reached(commits: list[int | None]) -> int:
    return max(commit or 0 for commit in commits)


#: after which processed offsets stage 2's record cache is written, in the test below
WRITES_AFTER = (2, 6)


async def agents_with_a_record_cache() -> tuple[list[tuple[int | None, int | None]], int | None, int | None]:
    """(Faust's commit, what the last write covered) after each record, and the commit after the last write.

    The agents process and ack every record, as stage 2 does, but write
    their table changes only after `WRITES_AFTER` (the record cache).
    """
    consumer = stalled_consumer(None, Partition(position=0))
    reads = in_order_reads(consumer)
    reads.topics.add(TOPIC)
    reads.written_topics.add(TOPIC)
    reads.expected[TP0] = 0
    changes = TableChanges(consumer.app, flush_interval_s=3600)
    seen: list[tuple[int | None, int | None]] = []

    async def write() -> None:
        reads.written.update(await changes.write())

    async def agents(message: Any) -> None:
        if reads.admit(message):
            changes.processed(message.tp, message.offset)
            if message.offset in WRITES_AFTER:
                await write()
        consumer.ack(message)
        seen.append((commit(consumer), reads.written.get(TP0)))
        await asyncio.sleep(0)

    await drain(consumer, agents, lambda: len(seen) == LOG_END)
    before_the_write = commit(consumer)
    await write()
    return seen, before_the_write, commit(consumer)


def test_stage_2_commits_wait_for_its_table_changes_to_be_written_and_then_catch_up() -> None:
    seen, before_the_write, after_the_write = asyncio.run(agents_with_a_record_cache())
    committed = [offset for offset, _ in seen if offset is not None]
    assert committed, "nothing was committed"
    for offset, written in seen:
        assert offset is None or (written is not None and offset <= written), (
            f"Faust committed {offset} with the changes written only below {written}: {seen}"
        )
    assert max(committed) == WRITES_AFTER[-1] + 1, seen
    assert before_the_write is None, "committed past the last write"
    assert after_the_write == LOG_END, "the acks kept back were lost: the commit never catches up"


class SeekingConsumer:
    """A consumer that records its seeks; retention has deleted the log below `log_start`."""

    def __init__(self, log_start: int) -> None:
        self.log_start = log_start
        self.seeks: list[tuple[TP, int]] = []

    async def getmany(self, timeout: float) -> Any:
        yield TP0, 0

    def _new_offset(self, tp: TP) -> int | None:
        return None

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return dict.fromkeys(partitions, self.log_start)

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


@pytest.mark.parametrize(("log_start", "sought"), [(0, 4), (6, 6)], ids=["kept", "deleted-by-retention"])
def test_a_record_past_the_expected_offset_is_set_aside_and_the_partition_sought_back(
    log_start: int, sought: int
) -> None:
    async def scenario() -> None:
        consumer = SeekingConsumer(log_start)
        reads = in_order_reads(consumer)
        reads.topics.add(TOPIC)
        reads.expected[TP0] = 4
        assert not reads.admit(SimpleNamespace(tp=TP0, offset=7))
        assert not reads.admit(SimpleNamespace(tp=TP0, offset=8)), "one seek back at a time"
        await asyncio.sleep(0)
        assert consumer.seeks == [], "sought outside the fetcher loop"
        await reads.fetches.run_pending()
        await asyncio.sleep(0)
        assert consumer.seeks == [(TP0, sought)]
        assert reads.expected[TP0] == sought
        assert reads.admit(SimpleNamespace(tp=TP0, offset=3)), "a re-reading below the expected offset"

    asyncio.run(scenario())


def test_a_partition_without_an_expected_offset_is_rewound_first_and_never_committed() -> None:
    consumer = SimpleNamespace(getmany=None, _new_offset=lambda tp: 42)
    reads = in_order_reads(consumer)
    reads.topics.add(TOPIC)
    seeks: list[int | None] = []
    reads._seek_later = lambda tp, offset: seeks.append(offset)  # type: ignore[method-assign]
    assert not reads.admit(SimpleNamespace(tp=TP0, offset=0))
    assert seeks == [None]  # to its commit
    assert consumer._new_offset(TP0) is None
    reads.expected[TP0] = 40
    assert consumer._new_offset(TP0) == 40
    assert consumer._new_offset(TP("burnguard.budgets", 0)) == 42, "other topics are not capped"


class FakeConsumer:
    """A consumer whose fetcher loop is driven by the test: `getmany` yields the given batches."""

    def __init__(self) -> None:
        self.fetched = 0

    async def getmany(self, timeout: float) -> Any:
        self.fetched += 1
        yield TP0, self.fetched


def test_a_seek_waits_for_the_next_fetch_and_returns_what_the_action_returns() -> None:
    async def scenario() -> None:
        consumer = FakeConsumer()
        hook = between_fetches(consumer)
        assert between_fetches(consumer) is hook
        asked = asyncio.ensure_future(hook.run(lambda: asyncio.sleep(0, result=consumer.fetched)))
        await asyncio.sleep(0.01)
        assert not asked.done()
        assert [item async for item in consumer.getmany(timeout=1)] == [(TP0, 1)]
        assert await asked == 0  # ran before the fetch it preceded

    asyncio.run(scenario())


def test_a_failed_seek_fails_its_caller_alone_and_an_abandoned_one_never_runs() -> None:
    async def scenario() -> None:
        consumer = FakeConsumer()
        hook = between_fetches(consumer)
        ran: list[str] = []

        async def action(name: str) -> str:
            ran.append(name)
            if name == "bad":
                raise RuntimeError("partition revoked")
            return name

        abandoned = asyncio.ensure_future(hook.run(lambda: action("abandoned")))
        bad = asyncio.ensure_future(hook.run(lambda: action("bad")))
        good = asyncio.ensure_future(hook.run(lambda: action("good")))
        await asyncio.sleep(0)
        abandoned.cancel()  # the watchdog's timeout
        await hook.run_pending()
        assert ran == ["bad", "good"]
        with pytest.raises(RuntimeError, match="partition revoked"):
            await bad
        assert await good == "good"

    asyncio.run(scenario())


def test_seeks_left_when_the_fetcher_stops_fail_instead_of_waiting_for_ever() -> None:
    async def scenario() -> None:
        hook = between_fetches(FakeConsumer())

        async def stopped() -> None:
            raise asyncio.CancelledError

        first = asyncio.ensure_future(hook.run(stopped))
        second = asyncio.ensure_future(hook.run(lambda: asyncio.sleep(0)))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await hook.run_pending()
        for waiting in (first, second):
            with pytest.raises(FetcherStopped):
                await waiting

    asyncio.run(scenario())


SESSION_TIMEOUT_MS = 6000


async def generations_lost_at_revoke(bootstrap: str, topic: str, group: str, stall_s: float) -> list[bool]:
    """`membership_lost` at each revoke of a real consumer whose event loop stalls for `stall_s`.

    A stall longer than the session timeout gets the member expelled by the
    broker (a zombie until its next heartbeat tells it); a second member
    joining makes an ordinary rebalance either way.
    """
    seen: list[bool] = []

    class Listener(ConsumerRebalanceListener):
        def __init__(self) -> None:
            self.consumer: Any = None

        async def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                seen.append(
                    membership_lost(
                        SimpleNamespace(_thread=SimpleNamespace(_ensure_consumer=lambda: self.consumer))
                    )
                )

        async def on_partitions_assigned(self, assigned: Any) -> None:
            pass

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=500,
            enable_auto_commit=False,
        )

    first, listener = consumer(), Listener()
    listener.consumer = first
    first.subscribe([topic], listener=listener)
    await first.start()
    second = consumer()
    try:
        await first.getmany(timeout_ms=2000)
        while not first.assignment():
            await first.getmany(timeout_ms=500)
        time.sleep(stall_s)  # the whole loop stalls: no heartbeat
        second.subscribe([topic])
        await second.start()
        for _ in range(40):
            await asyncio.gather(first.getmany(timeout_ms=250), second.getmany(timeout_ms=250))
            if seen and first.assignment() and second.assignment():
                break
    finally:
        await first.stop()
        await second.stop()
    return seen


@pytest.mark.parametrize(("stall_s", "lost"), [(0.0, False), (SESSION_TIMEOUT_MS / 1000 + 4, True)])
def test_a_worker_expelled_from_its_group_knows_at_the_revoke_that_its_partitions_are_lost(
    kafka_broker: Any, stall_s: float, lost: bool
) -> None:
    """A revoke after the broker expelled the member comes when another may own the partitions already."""
    topic = f"takeover.lost.{time.monotonic_ns()}"
    kafka_broker.create_topic(topic, partitions=2)
    seen = asyncio.run(generations_lost_at_revoke(kafka_broker.bootstrap, topic, f"g-{topic}", stall_s))
    assert seen and seen[0] is lost, seen


def test_a_consumer_not_started_yet_has_no_membership_to_lose() -> None:
    """The stall guard may ask before the consumer runs (a slow start, an in-process job): no error."""
    app = faust.App(f"not-started-{time.monotonic_ns()}", broker="kafka://127.0.0.1:1")
    assert membership_lost(app.consumer) is False
