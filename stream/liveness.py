"""Liveness watchdog: a worker that holds partitions with lag but works none of it off heals, or exits.

Why it exists: a worker can hold partitions, report `Ready`, keep fetching and
yet process nothing. The one cause seen here (faust-streaming 0.15.3, aiokafka
0.14; the stall of faust-streaming#629) is records fetched while a takeover
restores its tables: Faust marks them read though the agents never got them,
and its seek back to the committed offsets skips partitions with no commit.
State dumps of four stalled workers all showed aiokafka's position at the high
watermark on every partition, fetches still going out, nothing in flight,
nothing committed. `stream/takeover.py` now rewinds every partition after each
rebalance, which removes that cause; this watchdog stays as the safety net for
a stall of any other cause, which would otherwise go unnoticed until someone
looked at the consumer lag.

Every few seconds this timer asks Kafka itself (not the worker, whose own view
is what went wrong) for the consumer group's committed offset and the log end
offset of each partition this worker is assigned on the topics the agents read.
A partition with lag whose committed offset has not moved for `stall_timeout`
is stalled. The watchdog logs the partitions and their lag, then:

1. seeks them back to the committed offset (the log start when there is none),
   so the skipped records are fetched again;
2. if they still make no progress within another `stall_timeout`, exits the
   process with `EXIT_STALLED`, so the supervisor starts a fresh worker and the
   group moves the partitions.

Neither step counts a span twice: records before the committed offset are not
replayed, and the totals live in changelog-backed tables whose
per-source-offset marks recognise replayed deltas (see `accounting.WindowTotals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import faust
from burnguard.contracts.topics import KafkaSettings
from burnguard.stream.settings import StreamSettings
from burnguard.stream.takeover import SeeksBetweenFetches, seek_back
from faust.types import TP
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec

logger = logging.getLogger(__name__)

#: How often the lag is read at most (a third of the stall timeout when that is shorter).
CHECK_INTERVAL_S = 5.0
#: Exit status of a worker that stopped itself because its partitions stalled (EX_SOFTWARE).
EXIT_STALLED = 70
#: Exit status of a worker whose stop overran `stop_timeout` and was cut short (EX_TEMPFAIL).
EXIT_STOP_OVERRAN = 75


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """Where the consumer group stands on one partition, as Kafka reports it."""

    committed: int
    end: int

    @property
    def behind(self) -> int:
        return max(self.end - self.committed, 0)


class GroupLagReader:
    """Committed offsets of the job's consumer group and log end offsets, read from the broker.

    A client of its own (blocking kafka-python, run in a thread), so the
    check does not depend on the Faust consumer thread it is checking.
    """

    def __init__(self, kafka: KafkaSettings, group: str) -> None:
        self._kafka = kafka
        self._group = group
        self._admin: KafkaAdminClient | None = None

    def read(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, PartitionLag]:
        """Committed and end offset of each partition; 0 committed where the group has none yet."""
        partitions = list(partitions)
        if not partitions:
            return {}
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **self._kafka.kafka_python_config(), client_id="burnguard-liveness"
            )
        try:
            ends = self._admin.list_partition_offsets(dict.fromkeys(partitions, OffsetSpec.LATEST))
            committed = self._admin.list_group_offsets(self._group).get(self._group, {})
        except Exception:
            self._reconnect_next_time()
            raise
        lags = {}
        for tp in partitions:
            meta = committed.get(tp)
            start = meta.offset if meta is not None and meta.offset >= 0 else 0
            lags[tp] = PartitionLag(committed=start, end=ends[tp].offset)
        return lags

    def _reconnect_next_time(self) -> None:
        """Drop the client after a failure: one that saw the broker restart kept failing (NodeNotReady)."""
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()


class StallTracker:
    """Since when each partition has had lag without its committed offset moving.

    Pure bookkeeping (no Kafka, no Faust), so the rule is easy to test: a
    partition is stalled once it has been behind for `timeout_s` with the same
    committed offset. Catching up, or any commit, restarts its clock.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._since: dict[TopicPartition, tuple[int, float]] = {}

    def forget(self) -> None:
        """Start every clock afresh at the next reading."""
        self._since.clear()

    def observe(
        self, lags: Mapping[TopicPartition, PartitionLag], now: float
    ) -> dict[TopicPartition, PartitionLag]:
        """Record one reading; return the partitions stalled as of `now`."""
        since: dict[TopicPartition, tuple[int, float]] = {}
        for tp, lag in lags.items():
            if lag.behind:
                previous = self._since.get(tp)
                same = previous is not None and previous[0] == lag.committed
                since[tp] = (lag.committed, previous[1] if same else now)
        self._since = since
        return {tp: lags[tp] for tp, (_, start) in since.items() if now - start >= self.timeout_s}


def describe(stalled: Mapping[TopicPartition, PartitionLag]) -> str:
    """`topic[partition] committed/end (lag N)` for each stalled partition, for the log."""
    return ", ".join(
        f"{tp.topic}[{tp.partition}] {lag.committed}/{lag.end} (lag {lag.behind})"
        for tp, lag in sorted(stalled.items())
    )


def exit_now(status: int) -> NoReturn:
    """Leave at once, as a SIGKILL would: a graceful stop could wait on the very thing that hangs.

    Safe for the totals: anything processed but not committed is replayed by
    the next owner and recognised by the per-key marks.
    """
    logging.shutdown()
    sys.stderr.flush()
    os._exit(status)


class LivenessWatchdog:
    """The Faust timer that finds stalled partitions of this worker and heals them (see module doc)."""

    def __init__(
        self,
        app: Any,
        topics: Iterable[str],
        reader: GroupLagReader,
        stall_timeout_s: float,
        exit_process: Callable[[int], NoReturn] = exit_now,
        clock: Callable[[], float] = time.monotonic,
        heal_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.heal_timeout_s = heal_timeout_s
        self.topics = frozenset(topics)
        self.reader = reader
        self.tracker = StallTracker(stall_timeout_s)
        self._exit = exit_process
        self._clock = clock
        #: when the last remedy was applied, while the stall it was for lasts
        self._healed_at: float | None = None

    async def check(self) -> None:
        """One round: read the lag, and heal or exit if partitions are stalled.

        Time spent rebalancing or restoring tables does not count: a large
        changelog can take longer than the timeout to read, and the stall this
        is for starts after recovery has completed.
        """
        if self.app.rebalancing or self.app.in_recovery:
            self.tracker.forget()
            self._healed_at = None
            return
        partitions = self._assigned()
        try:
            lags = await asyncio.wait_for(asyncio.to_thread(self.reader.read, partitions), timeout=30)
        except Exception as exc:  # a failed reading must not stop the timer; the next one retries
            logger.warning(
                "liveness: could not read the consumer group's lag (%s: %s)", type(exc).__name__, exc
            )
            return
        now = self._clock()
        stalled = self.tracker.observe(lags, now)
        if not stalled:
            self._healed_at = None
        elif self._healed_at is None:
            logger.warning(
                "liveness: no progress for %.0fs on partitions with lag: %s; seeking them back to the "
                "committed offsets",
                self.tracker.timeout_s,
                describe(stalled),
            )
            self._healed_at = now
            try:
                await self.heal(stalled)
            except Exception:  # the exit that follows if the stall lasts must not depend on the seek
                logger.exception("liveness: the seek failed")
        elif now - self._healed_at >= self.tracker.timeout_s:
            logger.error(
                "liveness: still no progress %.0fs after the seek: %s; exiting with status %d so the "
                "supervisor restarts the worker and the group moves its partitions",
                now - self._healed_at,
                describe(stalled),
                EXIT_STALLED,
            )
            self._exit(EXIT_STALLED)

    async def heal(self, stalled: Mapping[TopicPartition, PartitionLag]) -> None:
        """Seek each stalled partition back to the group's committed offset (log start when none).

        The stalled state this is for: aiokafka's position is already at the
        log end, yet the records before it never reached the agents (see the
        module doc). Faust's own seek after recovery leaves a partition
        without a committed offset where the fetcher got to, so only an
        explicit seek fetches those records again. The seek runs between two
        fetches (`takeover.seek_back`): run from this timer while the fetcher
        held records, it lost the records it was for (`stream/takeover.py`).
        If the fetcher never gets to it, the timeout ends the wait, and the
        exit follows when the stall lasts.
        """
        offsets = {TP(tp.topic, tp.partition): lag.committed for tp, lag in stalled.items()}
        await asyncio.wait_for(seek_back(self.app.consumer, offsets), timeout=self.heal_timeout_s)

    def _assigned(self) -> list[TopicPartition]:
        """This worker's partitions of the topics the agents read (none while not yet assigned)."""
        try:
            assignment = self.app.consumer.assignment()
        except Exception:  # the consumer is not started yet
            return []
        return sorted(TopicPartition(tp.topic, tp.partition) for tp in assignment if tp.topic in self.topics)


def install_liveness_watchdog(app: Any, settings: StreamSettings) -> LivenessWatchdog:
    """Run the watchdog as a timer of `app`, on the topics its agents read (OTLP spans and usage)."""
    stall_timeout_s = settings.stall_timeout.total_seconds()
    watchdog = LivenessWatchdog(
        app,
        topics=[settings.topics.spans, settings.topics.usage],
        reader=GroupLagReader(settings.kafka, group=settings.app_id),
        stall_timeout_s=stall_timeout_s,
    )
    app.timer(min(CHECK_INTERVAL_S, stall_timeout_s / 3), name="liveness")(watchdog.check)
    app.sensors.add(SeeksBetweenFetches())  # the seek's hook, also when the rewind is taken out
    return watchdog


class BoundedStopWorker(faust.Worker):
    """A Faust worker whose stop (SIGTERM, or after a crash) ends within `stop_timeout_s`.

    Faust's stop first waits, with no bound, until every message handed to an agent is
    acked (`Consumer.wait_empty`, which logs `wait_empty: Waiting for tasks` each 10 s). An
    agent that will never ack its events (stuck on an await, or a crashed actor whose
    `take_events` buffer outlived it) holds the stop until the supervisor's SIGKILL, ~30 s
    later, with nothing said. Past the bound this worker logs it and exits at once
    (`EXIT_STOP_OVERRAN`), which is as safe as that SIGKILL (`exit_now`) and comes sooner.
    """

    def __init__(self, app: Any, *, stop_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        self._deadline: threading.Timer | None = None
        self._owns_process = False

    def _repr_name(self) -> str:
        return "Worker"  # its log lines' label: `[^Worker]: Ready` is waited for (`devstack.WORKER_READY`)

    def execute_from_commandline(self) -> NoReturn:
        """Run as the process: the stop's deadline then also bounds the exit after it (atexit
        handlers, threads the interpreter joins), as the supervisor's SIGKILL would."""
        self._owns_process = True
        super().execute_from_commandline()

    async def stop(self) -> None:
        """Stop within the bound; a worker run inside another program disarms it once stopped, so
        the program goes on (a process of its own keeps it armed until it exits)."""
        self.arm_stop_deadline()
        await super().stop()
        if not self._owns_process and self._deadline is not None:
            self._deadline.cancel()

    def arm_stop_deadline(self) -> None:
        """Start the stop's clock once; a thread, so a blocked event loop cannot hold it back."""
        if self._deadline is None:
            self._deadline = threading.Timer(self.stop_timeout_s, self._overran)
            self._deadline.daemon = True
            self._deadline.start()

    def _overran(self) -> None:
        logger.error(
            "the stop did not finish within %.0fs (an agent's events never acked?); exiting with "
            "status %d as a SIGKILL would: the next owner reads again from the last commit",
            self.stop_timeout_s,
            EXIT_STOP_OVERRAN,
        )
        exit_now(EXIT_STOP_OVERRAN)
