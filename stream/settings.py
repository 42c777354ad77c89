"""Stream job settings, from BURNGUARD_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from burnguard.contracts.env_numbers import env_flag, env_number
from burnguard.contracts.signal_checkpoints import MAX_AGE_BEHIND
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.stream.event_loop import EVENT_LOOPS

#: Most seconds between signal checkpoints: well under the age at which guards stop using one.
_MOST_CHECKPOINT_S = MAX_AGE_BEHIND.total_seconds() / 4
#: A refresh round publishes a throttle again once its copy at the guards expires within this many
#: refresh intervals (`renew_within`): a round that skips it leaves at least three, so the next
#: renews it with two or more left, and should that round's tick be lost or late, the one after
#: still renews it with an interval to spare. A TTL under this many intervals is refused.
RENEW_WITHIN_REFRESHES = 3


@dataclass
class StreamSettings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings.from_env)
    topics: Topics = field(default_factory=Topics.from_env)
    budgets_file: Path | None = None
    app_id: str = "burnguard-stream"
    partitions: int = 4
    #: Non-ok signals are re-published this often, so late subscribers and TTLs work.
    refresh_interval: timedelta = timedelta(seconds=30)
    #: A signal not refreshed within this time is stale for subscribers.
    signal_ttl: timedelta = timedelta(seconds=120)
    #: Running totals of changed budget windows are published this often.
    snapshot_interval: timedelta = timedelta(seconds=10)
    data_dir: Path = Path(".burnguard/stream")
    #: How often consumed offsets are committed. A worker that dies replays at most this much
    #: (the replayed deltas are recognised and not counted twice).
    commit_interval: timedelta = timedelta(seconds=2.8)
    #: How long after its window closed a late span still counts in it.
    allowed_lateness: timedelta = timedelta(hours=1)
    #: How long a session may be idle (no span) before its session windows and context growth are
    #: forgotten (`stream/eviction.py`); a session that resumes later counts from zero.
    session_idle: timedelta = timedelta(hours=1)
    #: How often each usage partition is asked to forget what nothing can count in any more.
    evict_interval: timedelta = timedelta(seconds=60)
    #: How often the tables' changelog segments roll, so the broker's cleaner can compact away
    #: what eviction tombstoned (Kafka compacts closed segments only; its default is 7 days).
    changelog_segment: timedelta = timedelta(hours=1)
    #: How long the cleaner keeps a changelog tombstone after compacting (Kafka's default: 1 day).
    changelog_tombstone_retention: timedelta = timedelta(days=1)
    #: How long a silent worker keeps its partitions before the group moves them.
    session_timeout: timedelta = timedelta(seconds=30)
    #: How long the producer waits to fill a batch: every signal waits this long (twice: the
    #: usage record, then the signal), and shorter waits mean more, smaller produce requests.
    producer_linger: timedelta = timedelta(milliseconds=2)
    #: How long stage 2 gathers usage records before accounting them together: every signal waits
    #: up to this long (the changelog is written per `changelog_flush`, at most once per batch).
    #: 10 ms, not 20: half of enforcement latency's account hop (BENCHMARKS.md, session 33).
    account_batch_window: timedelta = timedelta(milliseconds=10)
    #: How long stage 2's table changes may stay pending before they are written, each changed key
    #: once with its latest value (0: after every batch). Commits wait for the write, so a worker
    #: that dies re-reads up to this much more; signals and snapshots do not wait for it. At most
    #: 10 s: a partition whose commit stands still for `stall_timeout` is healed as stalled.
    changelog_flush: timedelta = timedelta(seconds=1)
    #: How long a partition of this worker may have lag without its committed offset moving before
    #: the liveness watchdog heals it (then, after as long again, exits). Well above the few
    #: seconds a takeover's table recovery takes here, so a slow recovery is not a stall.
    stall_timeout: timedelta = timedelta(seconds=30)
    #: How long a stop (SIGTERM, or after a crash) may take before the worker exits at once, as a
    #: SIGKILL would (`liveness.BoundedStopWorker`): below the usual 30 s grace before the SIGKILL.
    stop_timeout: timedelta = timedelta(seconds=20)
    #: How long (broker time) an `otlp_spans` message is remembered by its digest, so a copy
    #: written again by a retrying producer is not counted twice (`stream/duplicates.py`).
    duplicate_window: timedelta = timedelta(seconds=120)
    #: How long the broker may hold a fetch that has no data yet (Faust hard-codes 1.5 s). aiokafka
    #: sends one fetch at a time per broker, so while a fetch for idle partitions waits, a busy
    #: partition is not fetched: this bounds that stall (`stream/fetching.py`). It is the wait
    #: while a partition's records are buffered; with none buffered a fetch waits
    #: `fetching.IDLE_FETCH_WAIT_MS` (500 ms, or this if longer): idle, two empty fetches a second.
    fetch_max_wait: timedelta = timedelta(milliseconds=20)
    #: At most this many bytes per partition per fetch (Faust's `consumer_max_fetch_size`); the
    #: consumer buffers at most one fetch per assigned partition, so memory <= this x partitions.
    fetch_partition_bytes: int = 1 << 20
    #: The same for `otlp_spans` partitions: a fetch of four such partitions is more than a
    #: micro-batch's `ingest_batch_bytes` (`stream/fetching.py:size_fetches`): at 4 MiB each holds
    #: whole messages a little under it, so four made less than 16 MiB and every micro-batch waited
    #: for a second fetch. Memory <= this x its assigned partitions + the above.
    fetch_spans_partition_bytes: int = 5 << 20
    #: Stage 1's micro-batch ends once its messages' values hold this many bytes (or at
    #: `INGEST_BATCH_MESSAGES`): ~30,000 spans at ~520 bytes a span, whatever the spans per message,
    #: so small messages combine over as many spans as big ones (`event_batches.take_batches`).
    #: Memory: a micro-batch's values are this plus one message at most.
    ingest_batch_bytes: int = 16 << 20
    #: How often each worker writes the signal checkpoints guards start from (0: never).
    signal_checkpoint_interval: timedelta = timedelta(seconds=30)
    #: Stage 1 sums a micro-batch's messages' rows per key (`records.GroupRows`), each message's
    #: contribution kept as a step, so stage 2 decides exactly as for per-message rows. Off: each
    #: message's rows alone, the only shape a worker older than the steps reads (a rolling upgrade).
    combine_messages: bool = True
    #: The worker's asyncio event loops (`stream/event_loop.py`): `uvloop`, or `asyncio`'s own.
    event_loop: str = "uvloop"

    def __post_init__(self) -> None:
        """A TTL under `RENEW_WITHIN_REFRESHES` intervals is refused, not left to lapse: its
        restrictions could not be renewed with an interval to spare when one round is lost.
        An event loop not in `EVENT_LOOPS` is refused with the variable's name."""
        if self.event_loop not in EVENT_LOOPS:
            loops = ", ".join(EVENT_LOOPS)
            raise ValueError(f"BURNGUARD_EVENT_LOOP must be one of {loops}, not {self.event_loop!r}")
        if self.renew_within > self.signal_ttl:
            refresh, ttl = self.refresh_interval.total_seconds(), self.signal_ttl.total_seconds()
            raise ValueError(
                f"BURNGUARD_SIGNAL_REFRESH_S ({refresh:g} s) must be at most 1/{RENEW_WITHIN_REFRESHES} of "
                f"BURNGUARD_SIGNAL_TTL_S ({ttl:g} s): a restriction is renewed before it expires even when "
                "one refresh round is lost"
            )

    @property
    def renew_within(self) -> timedelta:
        """A throttle whose copy at the guards expires within this is published again at a refresh round."""
        return self.refresh_interval * RENEW_WITHIN_REFRESHES

    @classmethod
    def from_env(cls) -> StreamSettings:
        env = os.environ
        budgets = env.get("BURNGUARD_BUDGETS_FILE")
        return cls(
            budgets_file=Path(budgets) if budgets else None,
            app_id=env.get("BURNGUARD_STREAM_APP_ID", cls.app_id),
            combine_messages=env_flag("BURNGUARD_COMBINE_MESSAGES", cls.combine_messages),
            event_loop=env.get("BURNGUARD_EVENT_LOOP", cls.event_loop).strip().lower(),
            partitions=env_number("BURNGUARD_STREAM_PARTITIONS", cls.partitions, int),
            refresh_interval=timedelta(seconds=env_number("BURNGUARD_SIGNAL_REFRESH_S", 30)),
            signal_ttl=timedelta(seconds=env_number("BURNGUARD_SIGNAL_TTL_S", 120)),
            snapshot_interval=timedelta(seconds=env_number("BURNGUARD_SNAPSHOT_INTERVAL_S", 10)),
            data_dir=Path(env.get("BURNGUARD_STATE_DIR", ".burnguard")) / "stream",
            commit_interval=timedelta(seconds=env_number("BURNGUARD_COMMIT_INTERVAL_S", 2.8)),
            session_timeout=timedelta(seconds=env_number("BURNGUARD_SESSION_TIMEOUT_S", 30)),
            allowed_lateness=timedelta(
                seconds=env_number("BURNGUARD_ALLOWED_LATENESS_S", 3600, zero_ok=True)
            ),
            session_idle=timedelta(seconds=env_number("BURNGUARD_SESSION_IDLE_S", 3600)),
            evict_interval=timedelta(seconds=env_number("BURNGUARD_EVICT_INTERVAL_S", 60)),
            changelog_segment=timedelta(seconds=env_number("BURNGUARD_CHANGELOG_SEGMENT_S", 3600)),
            changelog_tombstone_retention=timedelta(
                seconds=env_number("BURNGUARD_CHANGELOG_TOMBSTONE_S", 86400, zero_ok=True)
            ),
            producer_linger=timedelta(
                milliseconds=env_number("BURNGUARD_PRODUCER_LINGER_MS", 2, zero_ok=True)
            ),
            account_batch_window=timedelta(milliseconds=env_number("BURNGUARD_ACCOUNT_BATCH_MS", 10)),
            changelog_flush=timedelta(
                milliseconds=env_number("BURNGUARD_CHANGELOG_FLUSH_MS", 1000.0, float, 10_000, zero_ok=True)
            ),
            stall_timeout=timedelta(seconds=env_number("BURNGUARD_STALL_TIMEOUT_S", 30)),
            stop_timeout=timedelta(seconds=env_number("BURNGUARD_STOP_TIMEOUT_S", 20.0, float)),
            duplicate_window=timedelta(seconds=env_number("BURNGUARD_DUPLICATE_WINDOW_S", 120, zero_ok=True)),
            fetch_max_wait=timedelta(milliseconds=env_number("BURNGUARD_FETCH_MAX_WAIT_MS", 20, float, 1500)),
            fetch_partition_bytes=env_number(
                "BURNGUARD_FETCH_PARTITION_BYTES", cls.fetch_partition_bytes, int
            ),
            fetch_spans_partition_bytes=env_number(
                "BURNGUARD_FETCH_SPANS_PARTITION_BYTES", cls.fetch_spans_partition_bytes, int
            ),
            ingest_batch_bytes=env_number("BURNGUARD_INGEST_BATCH_BYTES", cls.ingest_batch_bytes, int),
            signal_checkpoint_interval=timedelta(
                # guards stop using a checkpoint with records after it once MAX_AGE_BEHIND old
                seconds=env_number(
                    "BURNGUARD_SIGNAL_CHECKPOINT_S", 30.0, float, _MOST_CHECKPOINT_S, zero_ok=True
                )
            ),
        )
