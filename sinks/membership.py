"""The sink's Kafka group membership: a kafka-python consumer kept in its group, and the workarounds.

This is the transport side of the sink (`consumer.py` holds the batch, insert and
commit policy), kept apart because it is written against kafka-python 3.0.12's
behaviour, not Kafka's protocol:

- While a join is due or under way the member stays in `consumer.poll`, back to
  back and up to `rebalance_poll_s` at a time. kafka-python 3.0.12 runs the
  JoinGroup/SyncGroup round trip on its IO thread but applies the result only
  inside a poll: one that ends while the caller is elsewhere (an insert that takes
  seconds to fail during an outage) is thrown away by the next poll, which sends a
  new JoinGroup. From the group leader that starts another rebalance, which waits
  for every other member to join again, up to their rebalance timeout (minutes);
  meanwhile the member holds no assignment and the moved partitions are not read.
  Seen as a rebalance that never finished while ClickHouse was down.
- When kafka-python leaves the member REBALANCING with nothing under way (the
  leader rejoined because the topic metadata changed, and the poll that started it
  timed out), it never asks again: a member found in that state is asked to rejoin.
- As a last resort, a consumer that has not been a stable group member for longer
  than any healthy rebalance can take (the rebalance timeout, `max_poll_interval_ms`,
  plus the session timeout) raises `ConsumerStuck`; the caller decides what to drop
  and `restart` replaces it with a new consumer, which reads on from the commits.
- Partition moves are recorded by a rebalance listener and handed to the caller
  after each poll (`on_rebalance`), on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from burnguard.contracts.topics import KafkaSettings
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import MemberState

log = logging.getLogger(__name__)

_STRANDED_AFTER_S = 1.0
_CLOSE_TIMEOUT_MS = 10_000

#: Called after every poll with (partitions gone since the last call, whether an assignment completed).
RebalanceHandler = Callable[[set[TopicPartition], bool], None]


class Assignments(ConsumerRebalanceListener):
    """Logs partition moves and tells the sink's thread which partitions it no longer owns.

    kafka-python 3 runs listeners on its IO thread, where a blocking call (an insert,
    a commit) is not allowed, so this only records; the sink acts after its next poll.

    A partition is gone when it was revoked or lost and the assignment that follows
    does not contain it. With the default eager protocol every rebalance revokes
    everything and then assigns the full new set, so a partition that is given
    straight back stays owned (kafka-python 3 keeps its position), while one that
    spends a generation elsewhere is gone (its state is dropped and it is read again
    from the last commit). With the cooperative protocol only the partitions that
    move are revoked, and they are never in the next (incremental) assignment.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: set[TopicPartition] = set()
        self._gone: set[TopicPartition] = set()
        self._assigned = False

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("revoked %s", names(revoked) or "nothing")
        with self._lock:
            self._revoked.update(revoked)

    def on_partitions_lost(self, lost: Sequence[TopicPartition]) -> None:
        log.warning("lost %s (this sink was dropped from the group)", names(lost) or "nothing")
        with self._lock:
            self._gone.update(lost)
            self._revoked.difference_update(lost)

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", names(assigned) or "nothing")
        with self._lock:
            self._gone.update(self._revoked.difference(assigned))
            self._revoked.clear()
            self._assigned = True

    def take(self) -> tuple[set[TopicPartition], bool]:
        """(partitions gone since the last call, whether an assignment completed meanwhile)."""
        with self._lock:
            gone, self._gone = self._gone, set()
            assigned, self._assigned = self._assigned, False
        return gone, assigned


def names(partitions: Sequence[TopicPartition] | set[TopicPartition]) -> str:
    """`topic[p], ...` for logs, sorted."""
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


def _stranded(consumer: KafkaConsumer) -> bool:
    """Whether kafka-python 3.0.12 left the member out of the group with nothing under way.

    When the leader rejoins because the topic metadata changed and the poll that
    started it times out just as the JoinGroup/SyncGroup round trip ends, the result
    is never applied: the member stays REBALANCING with its join finished and
    `need_rejoin()` false, so no poll ever joins again (no heartbeats either: the
    broker evicts it after the session timeout). `request_rejoin()` gets it out: the
    next poll sends a JoinGroup. kafka-python has no public call for this (Java's
    `enforceRebalance`), hence the private attributes, read defensively: on another
    version this says False and the watchdog (`stuck_rebalance_s`) still applies.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    need_rejoin = getattr(coordinator, "need_rejoin", None)
    if need_rejoin is None or not all(hasattr(coordinator, a) for a in ("_join_task", "request_rejoin")):
        return False
    task = coordinator._join_task
    return (task is None or task.is_done) and not need_rejoin()


def _join_due(consumer: KafkaConsumer) -> bool:
    """Whether a JoinGroup/SyncGroup round trip is under way or will be started by the next poll.

    kafka-python 3.0.12 keeps the round trip in `_join_task` and applies its result only
    in a poll that is waiting for it, and `need_rejoin()` says a poll will start one.
    Neither is public, hence the defensive reads: on another version this says False
    and the sink falls back on the member state alone.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_join_task", None)
    if task is not None and not getattr(task, "is_done", True):
        return True
    need_rejoin = getattr(coordinator, "need_rejoin", None)
    return bool(need_rejoin()) if callable(need_rejoin) else False


def never() -> bool:
    """A `give_up` that never gives up."""
    return False


class ConsumerStuck(Exception):
    """The consumer has not been a stable group member for longer than a rebalance can take."""


class GroupMember:
    """One consumer of `topics` in `group_id`, polled so that kafka-python's joins finish.

    `consumer` is the current KafkaConsumer (replaced by `restart`); the caller uses
    it directly for what is not membership (pause, seek, commit).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        *,
        max_poll_records: int,
        rebalance_poll_s: float,
        stuck_rebalance_s: float | None,
        consumer_options: Mapping[str, Any],
        on_rebalance: RebalanceHandler,
    ) -> None:
        """`rebalance_poll_s`: how long one poll may wait while the group rebalances.
        `stuck_rebalance_s`: after how long without a stable group membership `poll`
        raises `ConsumerStuck`; by default the consumer's `max_poll_interval_ms` plus
        its `session_timeout_ms` plus `rebalance_poll_s`, more than a healthy
        rebalance can take.
        """
        self.kafka = kafka
        self.topics = list(topics)
        self.group_id = group_id
        self.max_poll_records = max_poll_records
        self.rebalance_poll_s = rebalance_poll_s
        self.stuck_rebalance_s = stuck_rebalance_s
        self.consumer_options = dict(consumer_options)
        self._on_rebalance = on_rebalance
        self._assignments = Assignments()
        self._unstable_since: float | None = None
        self._stranded_since: float | None = None
        self.consumer: KafkaConsumer | None = None

    def _new_consumer(self) -> KafkaConsumer:
        options: dict[str, Any] = {
            **self.kafka.kafka_python_config(),
            "group_id": self.group_id,
            "client_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.max_poll_records,
            **self.consumer_options,
        }
        return KafkaConsumer(**options)

    def start(self) -> KafkaConsumer:
        """Create the consumer and subscribe it; it joins the group in its first polls."""
        consumer = self._new_consumer()
        try:
            # Know the partitions before joining: otherwise the first JoinGroup assigns
            # nothing and a second rebalance follows at once.
            for topic in self.topics:
                consumer.partitions_for_topic(topic)
            self._assignments = Assignments()
            consumer.subscribe(self.topics, listener=self._assignments)
        except BaseException:
            consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
            raise
        self._unstable_since = None
        self.consumer = consumer
        return consumer

    def restart(self) -> KafkaConsumer:
        """Close a consumer stuck outside the group and start a new one (it reads on from the commits)."""
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
            except Exception as exc:  # the stuck consumer may fail to close cleanly: it is dropped anyway
                log.warning("closing the stuck consumer failed: %s: %s", type(exc).__name__, exc)
        return self.start()

    def close(self) -> None:
        """Leave the group without committing (the sink commits explicitly)."""
        if self.consumer is not None:
            self.consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)

    def poll(
        self,
        timeout_s: float,
        until: float | None = None,
        give_up: Callable[[], bool] = never,
    ) -> dict[TopicPartition, list[Any]]:
        """Poll; while the member is joining the group, poll again until it is in, `until` or `give_up()`.

        kafka-python 3.0.12 throws away a JoinGroup/SyncGroup round trip that ends
        while no poll waits for it (see the module docstring), so the sink must not
        leave `consumer.poll` between the start and the end of a join, and above all
        must not spend seconds on an insert attempt there.
        """
        consumer = self._current()
        while True:
            records = self._poll_once(consumer, timeout_s, until)
            past_until = until is not None and time.monotonic() >= until
            if records or past_until or give_up() or self._settled(consumer):
                return records

    def _current(self) -> KafkaConsumer:
        if self.consumer is None:
            raise RuntimeError("GroupMember.start() was not called")
        return self.consumer

    def _poll_once(
        self, consumer: KafkaConsumer, timeout_s: float, until: float | None
    ) -> dict[TopicPartition, list[Any]]:
        """One `consumer.poll`, then report rebalances and check that the group is not stuck.

        While the member is not settled the poll waits up to `rebalance_poll_s` (but not
        past `until`), so that a join usually starts and ends inside one poll: each
        poll that times out during a join leaves a short gap in which its result could
        be thrown away.
        """
        if not self._settled(consumer):
            timeout_s = max(timeout_s, self.rebalance_poll_s)
        if until is not None:
            timeout_s = min(timeout_s, until - time.monotonic())
        timeout_ms = max(int(timeout_s * 1000), 1)
        records = consumer.poll(timeout_ms=timeout_ms, max_records=self.max_poll_records)
        self._on_rebalance(*self._assignments.take())
        self._check_membership(consumer)
        return records

    @staticmethod
    def _stable(consumer: KafkaConsumer) -> bool:
        return consumer.group_metadata().state == MemberState.STABLE

    @classmethod
    def _settled(cls, consumer: KafkaConsumer) -> bool:
        """Stable with no join under way or due: the sink may leave `consumer.poll` for a while."""
        return cls._stable(consumer) and not _join_due(consumer)

    def _stuck_after_s(self, consumer: KafkaConsumer) -> float:
        if self.stuck_rebalance_s is not None:
            return self.stuck_rebalance_s
        config = consumer.config
        return (config["max_poll_interval_ms"] + config["session_timeout_ms"]) / 1000 + self.rebalance_poll_s

    def _check_membership(self, consumer: KafkaConsumer) -> None:
        """Get a stranded member back into the group; raise `ConsumerStuck` at the limit."""
        if self._stable(consumer):
            self._unstable_since = self._stranded_since = None
            return
        now = time.monotonic()
        if self._unstable_since is None:
            self._unstable_since = now
        limit = self._stuck_after_s(consumer)
        if now - self._unstable_since > limit:
            state = consumer.group_metadata().state
            raise ConsumerStuck(
                f"the consumer has been {state} in group {self.group_id} for over {limit:.0f} s"
            )
        if not _stranded(consumer):
            self._stranded_since = None
        elif self._stranded_since is None:
            self._stranded_since = now
        elif now - self._stranded_since >= _STRANDED_AFTER_S:
            self._stranded_since = None
            log.warning(
                "the consumer was left %s in group %s with no join under way: asking it to rejoin",
                consumer.group_metadata().state,
                self.group_id,
            )
            consumer._coordinator.request_rejoin()
