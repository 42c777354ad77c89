"""Stalls after a takeover: the rewind after recovery undoes the known one, the watchdog the rest.

The worker in the end-to-end tests is `tests.support.stalled_worker`: it leaves the
span partitions as the real stall does (position at the log end, nothing
delivered, nothing committed), either during table recovery, as the stall of
faust-streaming#629 happens. The rewind after recovery
(`burnguard.stream.takeover`) must undo it; with the rewind taken out, the
liveness watchdog must. Without the remedy under test, the worker never counts
the spans sent before it started.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import NoReturn

import faust
import pytest
from burnguard.stream import liveness
from burnguard.stream.liveness import (
    EXIT_STALLED,
    EXIT_STOP_OVERRAN,
    BoundedStopWorker,
    LivenessWatchdog,
    PartitionLag,
    StallTracker,
    describe,
)
from faust.types import TP as FaustTP
from kafka import TopicPartition

from tests.fixtures.pipeline import Pipeline
from tests.test_e2e_exactly_once import BUDGETS, SpanSource, wait_for_exact_totals

TP0 = TopicPartition("otlp_spans", 0)
TP1 = TopicPartition("otlp_spans", 1)
STALL_TIMEOUT_S = 6


def test_a_partition_is_stalled_once_behind_with_the_same_commit_for_the_timeout() -> None:
    tracker = StallTracker(timeout_s=10)
    assert tracker.observe({TP0: PartitionLag(5, 9)}, now=0) == {}
    assert tracker.observe({TP0: PartitionLag(5, 12)}, now=9) == {}
    assert tracker.observe({TP0: PartitionLag(5, 12)}, now=10) == {TP0: PartitionLag(5, 12)}


def test_a_commit_or_catching_up_restarts_the_clock() -> None:
    tracker = StallTracker(timeout_s=10)
    tracker.observe({TP0: PartitionLag(5, 9), TP1: PartitionLag(0, 3)}, now=0)
    tracker.observe({TP0: PartitionLag(6, 9), TP1: PartitionLag(3, 3)}, now=8)  # progress, caught up
    assert tracker.observe({TP0: PartitionLag(6, 9), TP1: PartitionLag(3, 4)}, now=12) == {}
    assert set(tracker.observe({TP0: PartitionLag(6, 9), TP1: PartitionLag(3, 4)}, now=22)) == {TP0, TP1}


def test_an_idle_partition_without_lag_is_never_stalled() -> None:
    tracker = StallTracker(timeout_s=1)
    for now in range(5):
        assert tracker.observe({TP0: PartitionLag(7, 7)}, now=now) == {}


def test_forgetting_restarts_every_clock() -> None:
    tracker = StallTracker(timeout_s=10)
    tracker.observe({TP0: PartitionLag(5, 9)}, now=0)
    tracker.forget()  # a rebalance, or table recovery, in between
    assert tracker.observe({TP0: PartitionLag(5, 9)}, now=12) == {}
    assert tracker.observe({TP0: PartitionLag(5, 9)}, now=22) == {TP0: PartitionLag(5, 9)}


def test_the_log_names_each_partition_with_its_lag() -> None:
    assert describe({TP1: PartitionLag(2, 10), TP0: PartitionLag(4, 4)}) == (
        "otlp_spans[0] 4/4 (lag 0), otlp_spans[1] 2/10 (lag 8)"
    )


class Exited(Exception):
    """What the test's exit does instead of leaving the process."""


class FixedLag:
    """A lag reader that reports the same committed and end offset for every partition."""

    def __init__(self, committed: int, end: int) -> None:
        self.lag = PartitionLag(committed, end)

    def read(self, partitions: list[TopicPartition]) -> dict[TopicPartition, PartitionLag]:
        return dict.fromkeys(partitions, self.lag)


def exit_for_test(status: int) -> NoReturn:
    raise Exited(status)


def _stopped_worker_exits(monkeypatch: pytest.MonkeyPatch, as_the_process: bool) -> list[int]:
    """Stop a `BoundedStopWorker` (bound 0.3 s) cleanly: the exit statuses its deadline asked for by 0.6 s."""
    exits: list[int] = []
    monkeypatch.setattr(liveness, "exit_now", exits.append)
    monkeypatch.setattr(
        faust.Worker, "execute_from_commandline", lambda self: self.loop.run_until_complete(self.stop())
    )
    app = faust.App("bounded-stop-test", broker="kafka://127.0.0.1:9", store="memory://")
    worker = BoundedStopWorker(app, stop_timeout_s=0.3, loglevel="error", quiet=True)
    if as_the_process:
        worker.execute_from_commandline()
    else:
        worker.loop.run_until_complete(worker.stop())
    time.sleep(0.6)
    return exits


def test_a_worker_stopped_inside_another_program_lets_it_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its stop finished within the bound: the deadline is disarmed, the program is not ended 75."""
    assert _stopped_worker_exits(monkeypatch, as_the_process=False) == []


def test_a_worker_run_as_the_process_keeps_its_exit_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the stop the process still has to exit (atexit handlers, joined threads): still bounded."""
    assert _stopped_worker_exits(monkeypatch, as_the_process=True) == [EXIT_STOP_OVERRAN]


def test_a_seek_back_that_never_gets_its_turn_still_ends_in_exit_70(caplog: pytest.LogCaptureFixture) -> None:
    """The seek waits for the fetcher loop (`stream/takeover.py`); a loop that never fetches again
    must not leave the stall silent."""
    consumer = SimpleNamespace(getmany=None, assignment=lambda: {FaustTP("otlp_spans", 0)})
    app = SimpleNamespace(rebalancing=False, in_recovery=False, consumer=consumer)
    now = [0.0]
    watchdog = LivenessWatchdog(
        app,
        topics=["otlp_spans"],
        reader=FixedLag(committed=3, end=9),  # type: ignore[arg-type]
        stall_timeout_s=10,
        exit_process=exit_for_test,
        clock=lambda: now[0],
        heal_timeout_s=0.05,
    )

    async def rounds() -> None:
        for now[0] in (0, 5, 10, 15):
            await watchdog.check()
        assert "seeking them back" in caplog.text
        assert "the seek failed" in caplog.text
        now[0] = 20
        await watchdog.check()

    with pytest.raises(Exited) as exited:
        asyncio.run(asyncio.wait_for(rounds(), timeout=10))
    assert exited.value.args == (EXIT_STALLED,)


@pytest.fixture
def stall_prone(pipeline: Pipeline) -> Pipeline:
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="1", BURNGUARD_STALL_TIMEOUT_S=str(STALL_TIMEOUT_S))
    return pipeline


@pytest.mark.slow
def test_a_stall_during_recovery_is_undone_by_the_rewind(stall_prone: Pipeline) -> None:
    pipeline = stall_prone
    pipeline.env["BURNGUARD_STALL_TIMEOUT_S"] = "3600"  # the watchdog cannot be what helps
    source = SpanSource(pipeline, batches=20, seed=7)
    source.send(20)
    pipeline.start_worker(module="tests.support.stalled_worker")
    assert "test hook: skipped to the end" in pipeline.log("worker")
    wait_for_exact_totals(pipeline, source, timeout_s=40)
    assert "rewound to the committed offsets" in pipeline.log("worker")


@pytest.mark.slow
def test_a_stalled_worker_seeks_back_and_counts_every_span(stall_prone: Pipeline) -> None:
    pipeline = stall_prone
    pipeline.env["STALL_NO_REWIND"] = "1"
    source = SpanSource(pipeline, batches=40, seed=3)
    source.send(40)
    pipeline.start_worker(module="tests.support.stalled_worker")
    wait_for_exact_totals(pipeline, source, timeout_s=40)
    log = pipeline.log("worker")
    assert "test hook: skipped to the end" in log
    assert f"liveness: no progress for {STALL_TIMEOUT_S}s on partitions with lag" in log
    assert f"{pipeline.topics.spans}[" in log, "the warning does not name the stalled partitions"


@pytest.mark.slow
def test_a_worker_the_seek_cannot_heal_exits_for_its_supervisor(stall_prone: Pipeline) -> None:
    pipeline = stall_prone
    pipeline.env.update(STALL_NO_REWIND="1", STALL_UNHEALABLE="1")
    SpanSource(pipeline, batches=10, seed=5).send(10)
    worker = pipeline.start_worker(module="tests.support.stalled_worker")
    started = time.monotonic()
    assert worker.wait(timeout=4 * STALL_TIMEOUT_S + 20) == EXIT_STALLED
    assert time.monotonic() - started >= 2 * STALL_TIMEOUT_S, "exited before the seek had its chance"
    assert f"exiting with status {EXIT_STALLED}" in pipeline.log("worker")
