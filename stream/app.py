"""The Faust job: OTLP batches in, budget signals out.

Two stages, joined by the internal `burnguard.usage` topic:

1. `ingest` reads whole `ExportTraceServiceRequest` messages from
   `otlp_spans` (one Kafka message, many spans), decodes and prices them, and
   sums them into one usage delta per (budget, key, window). It takes the
   messages in micro-batches and sends the deltas of a micro-batch as one
   `batches` record per usage partition (the partition of `budget|key`), each
   message's deltas a sub-batch with its own source offset (or, with
   `BURNGUARD_COMBINE_MESSAGES`, on by default, a source partition's messages'
   deltas summed per key, each message's part kept as a step: `GroupRows`),
   not one record per delta or message: Kafka records
   and awaits, not arithmetic, were what the worker spent its time on.
   Undecodable messages go to the dead-letter topic with the reason in a header, and so does each
   span that breaks a rule of `contracts/span_checks.py`, alone (the sink
   skips those spans and only counts them). A span's event time is trusted
   within a skew of its record's broker timestamp, else it counts at that
   timestamp; a call to a model without a price is charged by the budget
   file's `unpriced:` rule and a `warn` names the model.
2. `account` reads the batches, so all state of one budget key lives in one
   partition and so on one worker. It keeps the window totals in a
   changelog-backed table and publishes a signal whenever the decided action
   for a key changes.

A timer re-publishes restrictive signals before they expire and notices
windows that rolled over; it sends a `tick` through the usage topic, because
table state may only change inside the partition's own stream. The same
tick retires an `ok` once it has expired: a tombstone replaces it on the
compacted signals topic, so the topic keeps no `ok` for every key that was
ever restricted (readers treat a tombstone as "no restriction"). Another timer
sends each partition a `sweep` the same way, so it forgets closed windows, idle
sessions and emptied rolling keys (`stream/eviction.py`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import faust
from aiokafka.errors import ProducerClosed
from burnguard.contracts.budget_feed import BudgetFeed, initial_config
from burnguard.contracts.budgets import Budget, BudgetConfig, load_budget_file
from burnguard.contracts.logs import env_log_level, quiet_library_logs
from burnguard.contracts.otlp import DecodedSpans, MalformedSpans, RejectedSpan, decode_spans, native_failures
from burnguard.contracts.pricing import UNPRICED_CHARGED, PriceBook
from burnguard.contracts.signals import Signal, signal_key
from burnguard.contracts.snapshots import usage_stamp
from burnguard.contracts.span_checks import SpanLimits, correct_clocks
from burnguard.contracts.topics import (
    CHECKPOINTS_TOPIC_CONFIG,
    SIGNALS_TOPIC_CONFIG,
    SPANS_TOPIC_CONFIG,
    TopicSpec,
    ensure_topics,
)
from burnguard.contracts.usage import SpanUsage
from burnguard.stream import fetching
from burnguard.stream.accounting import (
    MIX_FIELDS,
    NS_PER_MINUTE,
    BatchStats,
    ContextGrowth,
    Ring,
    UsageDelta,
    WindowTotals,
    context_observations,
    native_sum_failures,
    partition_key_of,
    usage_rows,
    usage_rows_detached,
)
from burnguard.stream.changelog import (
    MAX_BATCH_BYTES,
    ChangelogWriteFailed,
    PendingRecords,
    TableChanges,
    flush_tick_s,
    plain_store,
)
from burnguard.stream.deadletters import REASON_HEADER, DeadLetterLog, Parked, dead_letter_headers, fitted
from burnguard.stream.deliveries import MicroBatchDeliveries, SentMicroBatch
from burnguard.stream.duplicates import Primer, RecentBatches, digest
from burnguard.stream.event_batches import take_batches
from burnguard.stream.event_loop import loop_kind, use_event_loop
from burnguard.stream.eviction import (
    Lifetimes,
    horizon_key,
    is_window_key,
    last_event_ns,
)
from burnguard.stream.liveness import BoundedStopWorker, install_liveness_watchdog
from burnguard.stream.partitioner import native_part, producer_partitioner, usage_partition
from burnguard.stream.policy import (
    CALENDAR_SETTLED,
    ROLLING_SETTLED,
    changed_signal,
    decide_action,
    decide_context,
    decide_new_window,
    settles_alike,
    settling_steps,
    window_bounds,
    window_spent,
)
from burnguard.stream.record_batches import HELD_BACK
from burnguard.stream.records import (
    BATCH,
    BATCHES,
    DELTA_ROW_FIELDS,
    DELTA_ROW_FIELDS_WITH_STEPS,
    GROUPS,
    RECORD_VERSION_SINGLE,
    REMOVALS,
    SWEEP,
    TICKS,
    USAGE_RECORDS_CODEC,
    BatchRecord,
    ContextRow,
    DeltaRow,
    MicroBatch,
    RemovalRow,
    RowGroup,
    SweepRecord,
    TickRow,
    decoded,
    group_sub_batches,
    keys_record,
    native_groups_in_use,
    native_record,
    new_group_rows,
    record_version,
    removal_rows,
    step_row,
    sub_batches,
    tick_rows,
)
from burnguard.stream.settings import StreamSettings
from burnguard.stream.signal_checkpoints import PublishedSignals, SignalCheckpointWriter
from burnguard.stream.signal_records import SignalRecords
from burnguard.stream.snapshots import Snapshot, UsageSnapshots, WindowParts, usage_value_writer, window_parts
from burnguard.stream.takeover import (
    InOrderReads,
    PartitionsLost,
    RewindAfterRecovery,
    StallGuard,
    in_order_reads,
    membership_lost,
)
from faust.exceptions import NotReady
from kafka.errors import KafkaError

logger = logging.getLogger(__name__)
DEADLETTER_REASON_HEADER = REASON_HEADER
#: aiokafka's timestamp type of a record stamped by the broker
LOG_APPEND_TIME = 1
#: Message digests remembered per source partition at most (see `stream/duplicates.py`).
DUPLICATE_DIGESTS = 20_000
#: Models whose `unpriced` warn this process remembers (when it last published each).
UNPRICED_REMEMBERED = 10_000
_NS = 1_000_000_000
#: In a `signal-states` value: when the `ok` published for the key expires and may be tombstoned.
RETIRE_AT_NS = "retire_at_ns"
#: In `_refresh_wanted`'s window starts: a rolling window's (its spend slides out with the clock).
_ROLLING = -1
#: Deltas per batch record at most, so a huge OTLP message never makes a record beyond Kafka's limit.
BATCH_ROWS = 1000
#: Snapshots sent in one go (~2-3 ms of work, as 100 were when each cost ~30 us) before the timer
#: pauses for `SNAPSHOT_PAUSE_S`, so the agents get at least half the event loop. A bare `sleep(0)`
#: was not enough: the agents need many loop turns per message, and got one per slice (probes
#: waited 3 s for their signal). Each slice's records make a record batch per partition.
SNAPSHOT_SLICE = 250
SNAPSHOT_PAUSE_S = 0.01
#: Snapshots per timer run at most (the windows in line when it starts, so a run never chases the
#: changes made while it runs); the rest wait for the next run, first in line.
SNAPSHOT_MAX_PER_RUN = 200_000
#: A run takes slices for at most this share of the snapshot interval, then leaves the rest for the
#: next run. Before, a run ended after 20,000 windows: 2,000 a second at the 10 s interval, fewer
#: than a worker at ~50,000 spans/s changes, so under load the snapshots fell further behind for as
#: long as it lasted (47 s after a 1,000,000-span burst over 139,000 windows).
SNAPSHOT_RUN_SHARE = 0.5
#: Dead-lettered messages remembered, so a re-read one is not parked again (a few hundred kB).
DEAD_LETTERED_REMEMBERED = 10_000
#: OTLP messages stage 1 takes into one micro-batch at most (its bytes are capped too:
#: `StreamSettings.ingest_batch_bytes`, the cap that ends a backlog's micro-batches of more than
#: ~4 spans a message), and how long it waits to fill one when caught up (a span waits up to that
#: long before it counts: 10 ms, not 20, for enforcement latency): its records (one `batches`
#: record per usage partition) and acks are per micro-batch, not per message.
INGEST_BATCH_MESSAGES = 4000
INGEST_BATCH_WINDOW_S = 0.01
#: With a backlog in Kafka a micro-batch waits this long at most for its next fetches (`take_batches`).
INGEST_BEHIND_WINDOW_S = 0.2
#: Stage 1 lets the event loop run after this much work inside a micro-batch (heartbeats, stage 2).
INGEST_SLICE_S = 0.01
#: Usage records accounted together at most: their changes reach the changelog once per key.
ACCOUNT_BATCH_RECORDS = 500
#: Net new container objects (lists, dicts, ...) before the worker's cyclic GC scans the young ones:
#: CPython's default is 700, which under load ran a collection every few messages (`tune_gc`).
GC_YOUNG_OBJECTS = 50_000


async def _yield_to_the_loop() -> None:
    """Let the consumer's heartbeats and fetches run between two slices of an agent's work.

    An agent whose stream has events buffered gets the next one without
    suspending, so a backlog of OTLP batches (tens of ms of Python each) can
    hold the event loop for seconds. A worker log of a failed
    `test_rebalance_between_two_workers...` run showed the loop silent for
    13 s, past the 8 s session timeout: the member was expelled while alive.
    """
    await asyncio.sleep(0)


def _now() -> datetime:
    return datetime.now(UTC)


def _coordinates(event: Any) -> str:
    message = event.message
    return f"{message.topic}[{message.partition}]@{message.offset}"


def _span_label(span: int) -> str:
    return f" span {span}" if span >= 0 else ""


def _as_bytes(value: Any) -> bytes | None:
    """Any event key or value as bytes for the dead-letter topic: JSON, or its repr when JSON fails."""
    if value is None or isinstance(value, bytes):
        return value
    if native_record(value):  # parked as the record it decodes to, as every usage record was
        value = decoded(value.payload)
    if isinstance(value, str):
        return value.encode()
    try:
        return json.dumps(value).encode()
    except (TypeError, ValueError):
        return repr(value).encode()


class _AfterRebalance(faust.Sensor):
    """After a rebalance, another worker may have parked or read what this one is about to re-read:
    read the dead-letter topic again before the next check, and prime each partition's digests."""

    def __init__(self, job: BudgetJob) -> None:
        super().__init__()
        self.job = job

    def on_rebalance_start(self, app: Any) -> dict:
        self.job.dead_letters.stale = True
        self.job.recent.primed.clear()
        return super().on_rebalance_start(app)


def _faust_credentials(settings: StreamSettings) -> Any:
    kafka = settings.kafka
    kafka.check()
    if not kafka.sasl_mechanism:
        return faust.SSLCredentials(kafka.ssl_context()) if kafka.uses_ssl else None
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password,
        mechanism=kafka.sasl_mechanism,
        ssl_context=kafka.ssl_context(),
    )


def load_config(settings: StreamSettings) -> BudgetConfig:
    return load_budget_file(settings.budgets_file) if settings.budgets_file else BudgetConfig()


class BudgetJob:
    """The Faust app with its topics, tables and agents, built from settings."""

    def __init__(self, settings: StreamSettings, config: BudgetConfig) -> None:
        self.settings = settings
        self.config = config
        self.prices = PriceBook.for_config(config)
        self.limits = SpanLimits.from_env()
        self.stats = BatchStats()
        self.deadlettered = 0
        #: spans rejected by `span_checks`, by reason kind; spans moved to their record's time
        self.rejected: dict[str, int] = {}
        self.clock_corrected = 0
        self.agent_errors = 0  # records or keys whose accounting failed (logged, contained)
        self._counters_logged: tuple[Any, ...] = ()
        self._create_time_warned = False
        #: model -> (when its `unpriced` warn was last published, USD charged by the rule so far)
        self._unpriced: dict[str, tuple[datetime, float]] = {}
        #: what the dead-letter topic already holds, read back from it
        self.dead_letters = DeadLetterLog(
            settings.kafka, settings.topics.deadletter, DEAD_LETTERED_REMEMBERED
        )
        #: stage 1's dead letters queued with the micro-batch (each with its record's index),
        #: marked parked before they are sent
        self._parked_unsent: list[tuple[Parked, int]] = []
        window_ns = int(settings.duplicate_window.total_seconds() * _NS)
        self.recent = RecentBatches(window_ns, DUPLICATE_DIGESTS)
        self.primer = Primer(settings.kafka, settings.topics.spans, self.recent)
        self.duplicates = 0  # otlp_spans messages skipped as copies of an earlier one
        #: per source partition, the highest offset ingested: below it, a re-reading (not counted again)
        self._read_up_to: dict[int, int] = {}
        self.replayed_deltas = 0
        self.feed: BudgetFeed | None = None
        self.checkpoints: SignalCheckpointWriter | None = None
        #: the signals published, for the checkpoint writer's read-back (None: no writer reads them)
        self.published = PublishedSignals() if settings.signal_checkpoint_interval else None
        self._replays_logged = 0
        #: action -> [signals published since the last summary, the latest one's key] (`_log_signals`)
        self._signals_unlogged: dict[str, list[Any]] = {}
        self._budgets = {budget.id: budget for budget in config.budgets}
        self.lifetimes = Lifetimes.of(settings.allowed_lateness, settings.session_idle)
        #: the allowed lateness in ns: how far behind its record's time a span's clock is trusted
        self._lateness_ns = int(settings.allowed_lateness.total_seconds() * _NS)
        #: the latest trusted event time stage 1 decoded: a sweep's clock when ahead of the wall's
        self._latest_event_ns = 0
        #: entries forgotten by sweeps, per table; deltas refused because their window was forgotten
        self.evicted: dict[str, int] = {}
        self.late_after_eviction = 0
        self._sizes_logged: dict[str, int] = {}
        #: `budget|key` -> when the throttle this worker last published for the key expires at the
        #: guards (`_renewal_due`). In memory only: a refresh writes no changelog record. Empty after
        #: a start or a rebalance, so a round renews every throttle once; dropped with the key's state.
        self._throttles_expire: dict[str, datetime] = {}
        #: `signal_records.given_up` at the last refresh round: a throttle may be among the new ones
        self._given_up_seen = 0
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            settings.app_id,
            broker=[f"kafka://{server}" for server in settings.kafka.bootstrap.split(",")],
            broker_credentials=_faust_credentials(settings),
            store="memory://",
            datadir=str(settings.data_dir),
            topic_partitions=settings.partitions,
            topic_replication_factor=1,
            web_enabled=False,
            stream_recovery_delay=0.5,
            producer_linger=settings.producer_linger.total_seconds(),
            producer_max_batch_size=MAX_BATCH_BYTES,
            producer_partitioner=producer_partitioner,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=settings.commit_interval.total_seconds(),
            broker_session_timeout=settings.session_timeout.total_seconds(),
            broker_heartbeat_interval=min(3.0, settings.session_timeout.total_seconds() / 4),
            consumer_max_fetch_size=settings.fetch_partition_bytes,
        )
        fetching.install(
            self.app,
            max(1, round(settings.fetch_max_wait.total_seconds() * 1000)),
            {settings.topics.spans: settings.fetch_spans_partition_bytes},
        )
        self.changes = TableChanges(self.app, settings.changelog_flush.total_seconds())
        self._releasing: asyncio.Future[None] | None = None
        self.stall_guard = StallGuard(self.app)
        #: the windows waiting for a budget usage snapshot, and the snapshots' record batches
        self.snapshots = UsageSnapshots(
            self.app, settings.topics.budget_usage, settings.partitions, self._window_held
        )
        #: their queued batches wait for round trips: a worker expelled meanwhile hands none over
        self.snapshots.batches.may_hand_over = self.stall_guard.still_member
        self.usage_records = PendingRecords(self.app)
        #: their delivery, in order: it raises `otlp_spans`' commit cap, a refusal reads them again
        self.deliveries = MicroBatchDeliveries(self._let_spans_commit, self._read_refused_again)
        #: signals, into the producer's open batch of their partition (delivery checked per batch)
        self.signal_records = SignalRecords(self.app, settings.topics.signals)
        self._declare_topics()
        self._declare_tables()
        self._declare_agents()
        topics = settings.topics
        read_in_order = [topics.spans, topics.usage]  # each commit capped at what it delivered
        self.rewind = RewindAfterRecovery(self.app, read_in_order, read_in_order)
        self.app.sensors.add(self.rewind)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_rebalance_complete.connect(self._on_rebalance_complete)
        self.app.on_before_shutdown.connect(self._on_shutdown)
        self.app.sensors.add(_AfterRebalance(self))

    def _declare_topics(self) -> None:
        topics, app = self.settings.topics, self.app
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        self.spans_topic = app.topic(topics.spans, **raw)
        self.usage_topic = app.topic(
            topics.usage,
            key_type=str,
            value_serializer=USAGE_RECORDS_CODEC,  # Faust's JSON, decoded by msgspec
            partitions=self.settings.partitions,
            internal=True,
        )
        # Output topics are created before the worker starts (`output_topics`), not by Faust.
        self.deadletter_topic = app.topic(topics.deadletter, **raw)

    def _declare_tables(self) -> None:
        settings = self.settings
        table = {
            "default": None,
            "partitions": settings.partitions,
            # applied when Faust creates a changelog topic; an existing topic keeps its configs
            "extra_topic_configs": {
                "segment.ms": str(int(settings.changelog_segment.total_seconds() * 1000)),
                "delete.retention.ms": str(
                    int(settings.changelog_tombstone_retention.total_seconds() * 1000)
                ),
            },
        }
        #: `budget|key|window_start_ns` -> `WindowTotals.to_state()`; `~evicted-through|p` -> clock
        self.totals = self.app.Table("window-totals", **table)
        #: `guard|session` -> `ContextGrowth.to_state()`: prompt growth per session
        self.contexts = self.app.Table("context-growth", **table)
        #: `budget|key` (or `guard|session`) -> {"action": ..., "window_start_ns": ...}: last published
        #: (an `ok` also has `retire_at_ns`: when it expires and a tombstone replaces it)
        self.states = self.app.Table("signal-states", **table)

    def _declare_agents(self) -> None:
        self.app.agent(self.spans_topic, name="ingest")(self._ingest)
        self.app.agent(self.usage_topic, name="account")(self._account)
        self.app.timer(self.settings.refresh_interval.total_seconds(), name="refresh")(self._refresh)
        self.app.timer(self.settings.snapshot_interval.total_seconds(), name="snapshot")(self._snapshot)
        self.app.timer(1.0, name="reload-budgets")(self._reload_budgets)
        self.app.task(self._say_event_loop)
        self.app.timer(self.settings.evict_interval.total_seconds(), name="evict")(self._sweep)
        # an idle stream's pending changes are written too; the ticks show whether the process stood still
        flush_s = min(flush_tick_s(self.changes.flush_interval_s), self.stall_guard.period_s)
        self.app.timer(flush_s, name="changelog-flush")(self._flush_changes)

    async def _say_event_loop(self) -> None:
        logger.info("event loop: %s", loop_kind(asyncio.get_running_loop()))

    # --- stage 1 -------------------------------------------------------------------
    async def _ingest(self, stream: Any) -> None:
        """Micro-batches of OTLP messages; each batch's records go to the producer before it is acked.

        `take_batches` (`stream/event_batches.py`, Faust's `take_events` without its per-event
        stream) acks a batch after this loop body returns; Faust flushes the
        producer before committing (`stream/changelog.py`), so the records handed over
        in `_ingest_batch` are in Kafka before any of the batch's offsets is committed.
        """
        topics = frozenset(self.spans_topic.topics)
        behind = partial(self.app.consumer.behind, topics)
        async for events in take_batches(
            stream,
            INGEST_BATCH_MESSAGES,
            INGEST_BATCH_WINDOW_S,
            behind,
            INGEST_BEHIND_WINDOW_S,
            self.settings.ingest_batch_bytes,
        ):
            await self._ingest_batch(events)

    async def _ingest_batch(self, events: list[Any]) -> None:
        """Decode every message, then send one `batches` record per usage partition (and dead letters).

        The only awaits per message are rare ones: priming a partition's digests at its first
        message after a rebalance, reading the dead-letter topic back after one. The loop is
        yielded every `INGEST_SLICE_S` of work, so heartbeats and stage 2 are not starved.
        """
        batch = MicroBatch(BATCH_ROWS)
        groups: dict[int, RowGroup] = {}
        reads = in_order_reads(self.app.consumer)
        began_at = self.deliveries.refusals
        first: dict[Any, int] = {}  # per partition, the lowest offset admitted: read again if the send fails
        await self._ingest_events(events, batch, groups, reads, first)
        self._close_groups(groups, batch, reads, first)
        covers = {tp: reads.expected[tp] for tp in first if tp in reads.expected}
        if not await self.deliveries.previous_delivered(began_at):
            logger.warning("a micro-batch before this one was refused: this one is read again with it")
            self._drop_micro_batch(reads, first)
            return
        # its rows would count once (per-message steps), but its dead letters a successor parks too
        if not await self.stall_guard.still_member():
            self._drop_micro_batch(reads, {})  # read again after the rebalance
            raise PartitionsLost("expelled while it stood still: its micro-batch is not sent")
        topic = self.settings.topics.usage
        for partition, kind, record in batch.encoded_records():
            self.usage_records.add(topic, partition, kind.encode(), record)
        parked, self._parked_unsent = self._parked_unsent, []
        try:
            futures = await self.usage_records.send()
        except Exception:  # the batch is read again before anything after it: its dead letters with it
            self.dead_letters.discard([source for source, _ in parked])
            reads.read_again(first)
            raise
        self.deliveries.track(SentMicroBatch(futures or [], first, covers, parked))
        await _yield_to_the_loop()

    async def _ingest_events(
        self,
        events: list[Any],
        batch: MicroBatch,
        groups: dict[int, RowGroup],
        reads: InOrderReads,
        first: dict[Any, int],
    ) -> None:
        """Each admitted message into `batch` and `groups`, in slices of `INGEST_SLICE_S` of work.

        The lateness cut-off (`_closed_before_ns`: the wall clock minus the allowed lateness) is
        read once per slice, at its start and again after every await, not once per message
        (a `datetime.now()` and its arithmetic, ~0.6 µs of a small message's ~105). Between two
        reads nothing else runs on the loop, so a message's cut-off is the clock of at most one
        slice's work before its own reading: `INGEST_SLICE_S` plus one message's work (a slice
        ends at the first message past it). It is never later than a per-message reading, so no
        span that counted before is dropped as too late; a span whose window closed within that
        moment counts instead of being dropped, as it would have had the worker read the message
        those milliseconds sooner. (`test_ingest_batches.py` pins one reading per slice.)
        """
        sliced = time.perf_counter()
        closed_before_ns = self._closed_before_ns()
        config = self.config
        for event in events:
            message = event.message
            if not reads.admit(message):  # see stream/takeover.py
                continue
            tp, offset = message.tp, message.offset
            lowest = first.get(tp)
            if lowest is None or offset < lowest:
                first[tp] = offset
            if message.partition not in self.recent.primed or self.dead_letters.stale:
                await self._read_back(event, events, reads)
                closed_before_ns = self._closed_before_ns()
            if self.config is not config:  # budgets reloaded while it yielded: a key's bucket size may differ
                config = self.config
                self._close_groups(groups, batch, reads, first)
            try:
                self._ingest_one(event, batch, groups, closed_before_ns)
            except Exception as exc:  # nothing in one message may stop the partition
                self.agent_errors += 1
                logger.exception("could not ingest %s", _coordinates(event))
                self._park_failed_later(event, f"ingest failed: {type(exc).__name__}: {exc}")
            if time.perf_counter() - sliced > INGEST_SLICE_S:
                await _yield_to_the_loop()
                sliced = time.perf_counter()
                closed_before_ns = self._closed_before_ns()

    def _drop_micro_batch(self, reads: InOrderReads, first: dict[Any, int]) -> None:
        """Forget the micro-batch's records unsent and read its partitions again from `first`."""
        queued, self._parked_unsent = self._parked_unsent, []
        self.usage_records.drop()
        self.dead_letters.discard([source for source, _ in queued])
        reads.read_again(first)

    def _let_spans_commit(self, covers: dict[Any, int]) -> None:
        """Let Faust commit `otlp_spans` up to a delivered micro-batch's `covers`. Its partitions were
        assigned when it was read; a revoke waits for it to settle (`_on_revoked`) before it forgets them."""
        in_order_reads(self.app.consumer).written.update(covers)

    def _read_refused_again(self, sent: SentMicroBatch) -> None:
        """A micro-batch the broker refused (some of its records): read again, its lost dead letters too."""
        self.dead_letters.discard(sent.unparked())
        in_order_reads(self.app.consumer).read_again(sent.first)

    async def _park_failed(self, event: Any, reason: str) -> None:
        """Dead-letter a record whose processing failed; if even that fails, log it and go on."""
        try:
            await self._dead_letter(event, reason)
        except Exception:
            logger.exception("could not dead-letter %s (%s)", _coordinates(event), reason)

    def _park_failed_later(self, event: Any, reason: str) -> None:
        """`_park_failed` for stage 1: queued with the micro-batch; if even that fails, logged."""
        try:
            self._dead_letter_later(event, reason)
        except Exception:
            logger.exception("could not dead-letter %s (%s)", _coordinates(event), reason)

    def _ingest_one(
        self, event: Any, batch: MicroBatch, groups: dict[int, RowGroup], closed_before_ns: int | None = None
    ) -> None:
        """One OTLP message: its rows join the micro-batch, its bad spans the pending dead letters.

        With `combine_messages` its rows join its source partition's group (`GroupRows`, sent
        when the micro-batch ends: `_close_group`), else they go as its own sub-batch.
        `closed_before_ns`: the lateness cut-off of its slice of work (`_ingest_events`); None
        (a message ingested alone) reads the clock.
        """
        message = event.message
        first_reading = message.offset > self._read_up_to.get(message.partition, -1)
        if first_reading:
            self._read_up_to[message.partition] = message.offset
        record_ns = int(message.timestamp * _NS)  # the broker's time (LogAppendTime)
        if self._is_a_copy(event, first_reading, record_ns):
            return
        try:
            decoded = decode_spans(event.value, self.limits)
        except MalformedSpans as exc:
            self._dead_letter_later(event, str(exc))
            return
        for rejected in decoded.rejected:
            self._reject(event, rejected)
        usages = decoded.usages
        latest_ns = self._trust_clock(event, decoded, first_reading, record_ns)
        if latest_ns > self._latest_event_ns:
            self._latest_event_ns = latest_ns
        accounted = self._message_rows(event, usages, first_reading, closed_before_ns)
        if accounted is None:
            return
        rows, observations = accounted
        source = (message.partition, message.offset)
        if not self.settings.combine_messages:
            for partition, sub_batch in list(self._batch_records(rows, observations, source)):
                batch.add(partition, sub_batch)  # all or none of the message (the list is built first)
            return
        contexts = list(self._batch_records([], observations, source)) if observations else []
        group = groups.get(message.partition)
        if group is None:
            group = groups[message.partition] = new_group_rows()
        group.add(message.offset, rows)
        for partition, sub_batch in contexts:
            batch.add(partition, sub_batch)

    def _close_groups(
        self, groups: dict[int, RowGroup], batch: MicroBatch, reads: InOrderReads, first: dict[Any, int]
    ) -> None:
        """Every open group's rows into `batch`; if that raises, the micro-batch is read again.

        Its messages' rows exist only in the groups: ending the agent here would let Faust ack
        the micro-batch unsent (lost, as a failed send was). Nothing is sent; the partitions are
        sought back to the micro-batch's first offsets (`InOrderReads.read_again`), the agent
        restarts and reads it again before anything after it.
        """
        try:
            for partition, group in groups.items():
                self._close_group(partition, group, batch)
        except Exception:
            logger.exception("could not combine the micro-batch's rows: it is read again")
            self._drop_micro_batch(reads, first)
            raise
        groups.clear()

    def _close_group(self, partition: int, group: RowGroup, batch: MicroBatch) -> None:
        """A source partition's group of messages: its combined rows, sub-batches of the group's last source.

        Context observations went per message, with each message's source (`_ingest_one`): stage 2
        decides a context guard after each sub-batch, so combined a growing session would warn at
        the group's last call instead of the call that crossed. A native group writes its
        sub-batches itself (`records.group_sub_batches`: the same sub-batches, as their JSON);
        `GroupRows`, and a group it cannot vouch for, make them here from its rows.
        """
        written = group_sub_batches(group, partition, self.settings.partitions, BATCH_ROWS)
        if written is not None:
            for usage_partition_of_rows, sub_batch, size, combined in written:
                batch.add_encoded(usage_partition_of_rows, sub_batch, size, combined)
            return
        source = (partition, group.last_offset)
        chunk: list[list[Any]] = []
        weight = 0
        for row, row_weight in group.rows():
            if chunk and weight + row_weight > BATCH_ROWS:
                self._add_combined(chunk, source, batch)
                chunk, weight = [], 0
            chunk.append(row)
            weight += row_weight
        if chunk:
            self._add_combined(chunk, source, batch)

    def _add_combined(self, rows: list[list[Any]], source: tuple[int, int], batch: MicroBatch) -> None:
        """A group's rows (`BATCH_ROWS` at most, steps counted) as sub-batches, weighed with their steps."""
        for partition, sub_batch in self._batch_records(rows, [], source):
            batch.add(partition, sub_batch, *_steps_in(sub_batch.deltas))

    def _closed_before_ns(self) -> int:
        return int((_now() - self.settings.allowed_lateness).timestamp() * _NS)

    def _message_rows(
        self, event: Any, usages: list[SpanUsage], first_reading: bool, closed_before_ns: int | None
    ) -> tuple[Any, list[list[Any]]] | None:
        """One message's delta rows and context observations; None if its accounting failed (parked).

        Its rows are `usage_rows`' lists, or with combining and a native group (`records.new_group_rows`)
        perhaps the native loop's `MessageRows`, which only that group reads. `closed_before_ns`:
        the lateness cut-off of the slice of work it is in (`_ingest_events`); None reads the clock.
        """
        if closed_before_ns is None:
            closed_before_ns = self._closed_before_ns()
        # a native group takes the native loop's own rows: no Python list per (message, key) row
        summed = (
            usage_rows_detached if self.settings.combine_messages and native_groups_in_use() else usage_rows
        )
        too_late, unpriced = self.stats.too_late, self.stats.unpriced
        try:
            stats = self.stats if first_reading else None  # a re-reading is counted once, before
            rows = summed(usages, self.config, self.prices, stats, closed_before_ns)
        except Exception as exc:  # a span that breaks accounting must not stop the partition
            logger.exception(
                "could not account the batch at %s", (event.message.partition, event.message.offset)
            )
            self._dead_letter_later(event, f"accounting failed: {type(exc).__name__}: {exc}")
            return None
        if self.stats.too_late > too_late:
            logger.warning(
                "%d span budget counts at %s arrived after their window closed (allowed lateness %s)",
                self.stats.too_late - too_late,
                (event.message.partition, event.message.offset),
                self.settings.allowed_lateness,
            )
        if self.stats.unpriced > unpriced:
            self._warn_unpriced(usages)
        return rows, context_observations(usages, self.config)

    async def _read_back(self, event: Any, events: list[Any], reads: InOrderReads) -> None:
        """Before a message read after a rebalance: prime its partition's digests (with the micro-batch's
        other partitions that are due, `_due_for_priming`) and read the dead-letter topic back, at once.

        Each is a blocking read in a thread, a round trip or more to the broker: one after the other,
        and each partition primed at its own first message, they left the event loop with nothing to
        do at the start of every catch-up (BENCHMARKS.md, "Where the main thread waits").
        """
        reads_back = [self._catch_up_dead_letters()]  # nothing to do unless stale
        if event.message.partition not in self.recent.primed:
            reads_back.append(self._prime(event, self._due_for_priming(event, events, reads)))
        await asyncio.gather(*reads_back)

    def _due_for_priming(self, event: Any, events: list[Any], reads: InOrderReads) -> dict[int, Any]:
        """Per partition to prime now, its first message: `event`'s, and each other unprimed
        partition's first one in the micro-batch if it is the one that partition is read from next
        (`InOrderReads.expected`: it will be admitted as it is); any other waits for its own turn."""
        firsts = {event.message.partition: event}
        for other in events:
            partition = other.message.partition
            if partition not in firsts and partition not in self.recent.primed:
                firsts[partition] = other
        return {
            partition: first
            for partition, first in firsts.items()
            if first is event or reads.expected.get(first.message.tp) == first.message.offset
        }

    async def _prime(self, event: Any, firsts: dict[int, Any]) -> None:
        """Digest the messages before each partition's first one after a rebalance (`stream/duplicates.py`).

        Should the read fail, `event`'s partition counts as primed (a copy across the gap may count
        twice), the others are tried again at their own first message, as each was alone."""
        wanted = {
            partition: (first.message.offset, int(first.message.timestamp * _NS))
            for partition, first in firsts.items()
        }
        try:
            primed = await asyncio.to_thread(self.primer.prime, wanted)
        except Exception as exc:  # Kafka trouble: a copy across the gap may count twice
            logger.warning("could not read back before %s: %r", _coordinates(event), exc)
            self.recent.primed.add(event.message.partition)
            return
        for partition, count in primed.items():
            logger.info("%d messages before %s digested", count, _coordinates(firsts[partition]))
        self.recent.primed.update(primed)

    def _is_a_copy(self, event: Any, first_reading: bool, record_ns: int) -> bool:
        """Whether the message repeats the bytes of an earlier one of its partition (a producer retry).

        The partition's digests are primed before (`_prime`). `record_ns`: the message's record time.
        """
        message = event.message
        partition = message.partition
        if not event.value or not isinstance(event.value, bytes):
            return False  # an empty message is dead-lettered, not compared
        earlier = self.recent.earlier_copy(partition, digest(event.value), message.offset, record_ns)
        if earlier is None:
            return False
        if first_reading:
            self.duplicates += 1
            where = _coordinates(event)
            logger.warning("%s repeats offset %d byte for byte: not counted again", where, earlier)
        return True

    def _reject(self, event: Any, rejected: RejectedSpan) -> None:
        """Park a span that broke a rule alone, with its reason; count it (once, not per re-reading)."""
        if self._dead_letter_later(event, rejected.reason, rejected.request, rejected.index, rejected.kind):
            self.rejected[rejected.kind] = self.rejected.get(rejected.kind, 0) + 1

    def _trust_clock(self, event: Any, decoded: DecodedSpans, first_reading: bool, record_ns: int) -> int:
        """Spans stamped outside the skew around the record's broker time (`record_ns`) count at that time.

        Returns the latest event time of the message's spans after that (0 if none).
        """
        message = event.message
        if message.timestamp_type != LOG_APPEND_TIME and not self._create_time_warned:
            self._create_time_warned = True
            logger.warning(
                "%s carries producer timestamps (CreateTime): event times are bounded by the sender's "
                "clock; create the topic with message.timestamp.type=LogAppendTime",
                message.topic,
            )
        ahead, behind = self.limits.clock_ahead_ns, self._lateness_ns
        moved, latest_ns = correct_clocks(decoded.usages, record_ns, ahead, behind)
        if moved and first_reading:
            self.clock_corrected += moved
            logger.warning(
                "%d spans at %s stamped outside [-%s, +%ds] of the record time: counted at the record time",
                moved,
                _coordinates(event),
                self.settings.allowed_lateness,
                ahead // _NS,
            )
        return latest_ns

    def _warn_unpriced(self, usages: list[SpanUsage]) -> None:
        """A `warn` naming each model charged by the `unpriced:` rule (again after a refresh interval).

        Sent with stage 1's micro-batch records.
        """
        now = _now()
        charged: dict[str, float] = {}
        for usage in usages:
            if UNPRICED_CHARGED in usage.extra:
                model = usage.model or "(no model)"
                charged[model] = charged.get(model, 0.0) + (usage.cost_usd or 0.0)
        for model, usd in charged.items():
            last, total = self._unpriced.pop(model, (None, 0.0))
            total += usd
            due = last is None or now - last >= self.settings.refresh_interval
            self._unpriced[model] = (now if due else last, total)
            if len(self._unpriced) > UNPRICED_REMEMBERED:
                del self._unpriced[next(iter(self._unpriced))]
            if due:
                signal = self._unpriced_signal(model, total, now)
                logger.info("signal %s -> %s (%s)", signal.kafka_key, signal.action, signal.reason)
                self.usage_records.add(
                    self.settings.topics.signals, None, signal.kafka_key.encode(), signal.to_json()
                )

    def _unpriced_signal(self, model: str, charged_usd: float, now: datetime) -> Signal:
        charge = self.prices.unpriced_charge
        charged_as = charge[0] if charge else "nothing"
        expires = now + self.settings.signal_ttl
        return Signal(
            scope="model",
            key=model,
            budget="unpriced",
            action="warn",
            metric="cost_usd",
            spent=charged_usd,
            limit=0.0,
            ratio=0.0,
            window_start=now,
            window_end=expires,
            issued_at=now,
            expires_at=expires,
            reason=(
                f"model {model!r} has no known price: charged as {charged_as} "
                f"(${charged_usd:.4f} by this worker so far); "
                "add its price under 'prices:' in the budget file"
            ),
        )

    def _batch_records(
        self, deltas: list[list[Any]], observations: list[list[Any]], source: tuple[int, int]
    ) -> Iterable[tuple[int, BatchRecord]]:
        """(usage partition, sub-batch) for one OTLP message's (or group's) rows and context observations.

        Each sub-batch carries its message's own source offset (a group's: its last message's),
        also inside a micro-batch's `batches` record, so the second stage's per-key replay
        check stays valid: a key appears in at most one row per message or group.
        """
        partitions = self.settings.partitions
        rows: dict[int, list[list[Any]]] = {}
        contexts: dict[int, list[list[Any]]] = {}
        for row in deltas:  # tens per message: no `setdefault` list made for every row
            partition = usage_partition(partition_key_of(row[0], row[1]), partitions)
            found = rows.get(partition)
            if found is None:
                rows[partition] = [row]
            else:
                found.append(row)
        for observation in observations:
            partition = usage_partition(f"{observation[0]}|{observation[1]}", partitions)
            contexts.setdefault(partition, []).append(observation)
        for partition in sorted(rows.keys() | contexts.keys()):
            partition_rows = rows.get(partition, [])
            for first in range(0, max(len(partition_rows), 1), BATCH_ROWS):
                batch = BatchRecord(
                    source[0],
                    source[1],
                    partition_rows[first : first + BATCH_ROWS],
                    contexts.get(partition, []) if first == 0 else [],
                )
                yield partition, batch

    async def _send_per_partition(self, kind: str, items: Iterable[tuple[str, list[Any]]]) -> None:
        """Records about many keys (`ticks`, `removals`): one per usage partition, not one per key.

        `items` are (`budget|key`, what stage 2 needs about that key); each goes
        to the partition that holds the key's state. A refresh of 100,000
        restricted keys is then a handful of records, not 100,000.
        """
        grouped: dict[int, list[list[Any]]] = {}
        for partition_key, item in items:
            grouped.setdefault(usage_partition(partition_key, self.settings.partitions), []).append(item)
        for partition, group in sorted(grouped.items()):
            for first in range(0, len(group), BATCH_ROWS):
                record = keys_record(kind, group[first : first + BATCH_ROWS])
                await self.usage_topic.send(key=kind, value=record, partition=partition)

    async def _catch_up_dead_letters(self) -> None:
        """After a rebalance, read what other workers parked meanwhile (`stream/deadletters.py`)."""
        if self.dead_letters.stale:
            try:
                await asyncio.to_thread(self.dead_letters.catch_up)
            except Exception as exc:  # Kafka trouble: park anyway, a copy beats a loss
                logger.warning("could not read back %s: %r", self.settings.topics.deadletter, exc)

    async def _dead_letter(
        self, event: Any, reason: str, value: bytes | None = None, span: int = -1, kind: str = ""
    ) -> bool:
        """Park a message (or, with `span`, one span of it as `value`) with the reason in a header.

        Sent at once (stage 2 and failures); stage 1 queues its dead letters with its
        micro-batch (`_dead_letter_later`). True if it was parked now.
        """
        await self._catch_up_dead_letters()
        parked = self._park(event, reason, value, span, kind)
        if parked is None:
            return False
        _, key, value, headers = parked
        await self.deadletter_topic.send(key=key, value=value, headers=headers)
        return True

    def _dead_letter_later(
        self, event: Any, reason: str, value: bytes | None = None, span: int = -1, kind: str = ""
    ) -> bool:
        """`_dead_letter`, queued with stage 1's micro-batch records (sent before the batch is acked)."""
        parked = self._park(event, reason, value, span, kind)
        if parked is None:
            return False
        source, key, value, headers = parked
        index = self.usage_records.add(self.settings.topics.deadletter, None, key, value, headers)
        self._parked_unsent.append((source, index))
        return True

    def _park(
        self, event: Any, reason: str, value: bytes | None, span: int, kind: str
    ) -> tuple[Parked, bytes | None, bytes | None, list[tuple[str, bytes]]] | None:
        """(source, key, value, headers) of the dead letter, or None if the topic already holds it.

        Once: the rewind after each rebalance (`stream/takeover.py`) and a
        restart after a crash read recent messages again, and what is already
        on the dead-letter topic is not parked twice (`stream/deadletters.py`).
        Any event value is written: a record that is not bytes is written as
        JSON (its repr when JSON cannot hold it).
        """
        message = event.message
        source: Parked = (message.topic, message.partition, message.offset, span)
        if source in self.dead_letters:
            logger.info("%s%s is already on the dead-letter topic", _coordinates(event), _span_label(span))
            return None
        self.dead_letters.add(source)
        self.deadlettered += 1
        logger.warning(
            "dead-lettering %s%s: %s",
            _coordinates(event),
            _span_label(span),
            reason[:500],
        )
        parked = _as_bytes(event.value) if value is None else value
        headers = dead_letter_headers(source, reason, kind)
        parked, headers = fitted(parked, headers, self.app.conf.producer_max_request_size)
        return source, _as_bytes(event.key), parked, headers

    # --- stage 2 -------------------------------------------------------------------
    async def _account(self, stream: Any) -> None:
        """Account usage records in batches; table changes go out once per flush interval.

        Faust acks each batch, but commits only up to what `_write_changes`
        covered (`stream/changelog.py`), so a commit never passes a change
        that is not in the changelog.
        """
        window = self.settings.account_batch_window.total_seconds()
        async for events in stream.take_events(ACCOUNT_BATCH_RECORDS, within=window):
            for event in events:
                if not in_order_reads(self.app.consumer).admit(event.message):  # see stream/takeover.py
                    continue
                self.changes.partition = event.message.partition
                try:
                    await self._account_one(event.value)
                except Exception as exc:  # a bad record must not stop the partition
                    self.agent_errors += 1
                    logger.exception("could not account %s: %.500r", _coordinates(event), event.value)
                    await self._park_failed(event, f"accounting failed: {type(exc).__name__}: {exc}")
                self.changes.processed(event.message.tp, event.message.offset)
                await _yield_to_the_loop()
            if self.changes.due():
                await self._write_changes()

    async def _write_changes(self, flushed: bool = False) -> None:
        """Write the pending table changes, then let Faust commit the records delivered ones cover.

        `flushed`: the caller flushes the producer and waits for the delivery
        here. A change that did not reach its changelog stops the worker
        (`ChangelogWriteFailed`): nothing past the last delivered write is
        committed, and the next owner replays from there.
        """
        try:
            covered = await self.changes.write(self.stall_guard.still_member)  # asked after its waits
            if flushed and covered is not None:
                await self.app.producer.flush()
                covered = await self.changes.delivered()
        except ChangelogWriteFailed as exc:
            logger.error("stopping: %s", exc)
            await self.app.crash(exc)
            raise
        if covered is None:
            logger.warning(
                "not writing the table changes: the group expelled this worker while it stood still"
            )
            return
        self._let_commit(covered)
        if self.changes.undelivered() and (self._releasing is None or self._releasing.done()):
            self._releasing = asyncio.ensure_future(self._let_commit_once_delivered())

    async def _let_commit_once_delivered(self) -> None:
        """Raise the commit cap as soon as the writes handed over are delivered, not at the next write
        (with no flush interval no timer writes, and a quiet stream's last batch would stay uncommitted),
        and with a flush interval commit what they cover (`_commit_written`)."""
        while self.changes.undelivered():  # writes handed over meanwhile are waited for too
            try:
                self._let_commit(await self.changes.delivered())
            except ChangelogWriteFailed as exc:
                logger.error("stopping: %s", exc)
                await self.app.crash(exc)
                return
            if self.changes.flush_interval_s and not self.changes.undelivered():
                await self._commit_written()

    async def _commit_written(self) -> None:
        """Commit now what the delivered changelog writes let commit, as Kafka Streams commits when
        it flushes its record cache.

        Stage 2's records are committable only once their changes are written, once per flush
        interval; the commit timer then came up to a `commit_interval` later: a burst's last
        records stayed uncommitted (re-read by a successor, shown as lag) for up to both intervals
        after the worker had accounted them. One commit per write at most (a write per flush
        interval); during a rebalance the revoke's own write and Faust's commit do it.
        """
        if self.app.rebalancing:
            return
        try:
            await self.app.consumer.commit()
        except Exception as exc:  # the commit timer tries again
            logger.warning("could not commit after the changelog write: %r", exc)

    def _let_commit(self, covered: dict[Any, int]) -> None:
        """Let Faust commit the assigned partitions' records up to `covered` (delivered changes)."""
        reads = in_order_reads(self.app.consumer)
        assigned = self.app.consumer.assignment()
        reads.written.update((tp, offset) for tp, offset in covered.items() if tp in assigned)

    async def _flush_changes(self) -> None:
        """The timer's write, for changes a quiet stream would otherwise leave pending."""
        self.stall_guard.tick()
        if self.changes.due():
            await self._write_changes()

    async def _on_revoked(self, app: Any, revoked: set[Any], **kwargs: Any) -> None:
        """Before the partitions go: write what is pending and flush it, so the next owner recovers it.

        Faust calls this after the agents have finished their events and
        before the worker rejoins the group, so no other worker reads these
        changelog partitions yet. A failure here crashes the worker (Faust),
        which is safe: nothing past the last write was committed.

        Unless the group expelled this worker first (`membership_lost`): then
        another worker may own the partitions and write their changelogs
        already, and a late write of older values would be what a recovery
        reads last. Nothing is written; with changes pending, the stores hold
        what no changelog does, so the worker stops (`PartitionsLost`) and
        its successor recovers from the changelogs and replays.

        The revoked windows' budget usage snapshots go out here too, and none
        after (`_snapshot_leaving`): this worker's totals of them go stale.
        """
        gone = self._windows_of(revoked)
        if revoked and membership_lost(self.app.consumer):
            self.snapshots.disown(gone)
            if self.changes.pending():
                raise PartitionsLost(
                    f"expelled from the group with table changes pending ({len(revoked)} partitions)"
                )
            logger.warning("expelled from the group: partitions lost, nothing pending")
            self.deliveries.abandon()  # the next owner reads from the last commit
        else:
            self._snapshot_leaving(gone)
            await self._write_changes(flushed=True)
            await self.deliveries.settled()  # flushed: its commit cap is final before the partitions go
            # these and the revoked windows' earlier ones settle before the new owner reads
            if settling := self.snapshots.in_flight(gone):
                await asyncio.wait(settling)
            self.snapshots.disown(gone)
            if self.changes.pending():  # the stall guard held the write back: expelled after all
                raise PartitionsLost(f"table changes pending and not written ({len(revoked)} partitions)")
        self.changes.forget(revoked)
        reads = in_order_reads(self.app.consumer)
        for tp in revoked:
            reads.written.pop(tp, None)

    async def _on_rebalance_complete(self, app: Any, **kwargs: Any) -> None:
        """After a (re)start or a rebalance, once the tables are recovered: every window of the
        assigned partitions waits for a snapshot. Its last one may have failed at its previous owner
        (which no longer retries it), or never been taken (a crash). Not the windows the memory store
        holds for other partitions (standby copies, revoked ones): their owner snapshots them.

        Every throttle is renewed at the next refresh round too (`_renewal_due`): this worker no
        longer knows which of them it published, nor whether another worker did since."""
        self._throttles_expire.clear()
        usage = self.settings.topics.usage
        partitions = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == usage}
        owned = {
            state_key: None
            for state_key, stored in list(plain_store(self.totals).items())
            if stored
            and is_window_key(state_key)
            and usage_partition(state_key.rsplit("|", 1)[0], self.settings.partitions) in partitions
        }
        self.snapshots.waiting.update(owned)

    def _windows_of(self, revoked: set[Any]) -> Callable[[str], bool]:
        """Whether a window state key belongs to one of the revoked usage partitions."""
        partitions = {tp.partition for tp in revoked if tp.topic == self.settings.topics.usage}
        count = self.settings.partitions
        return lambda state_key: (
            bool(partitions) and usage_partition(state_key.rsplit("|", 1)[0], count) in partitions
        )

    def _snapshot_leaving(self, gone: Callable[[str], bool]) -> None:
        """Hand over the snapshots the revoked windows wait for (and evicted windows' last ones) now:
        after the revoke the new owner's may be newer (`UsageSnapshots.leaving`)."""
        leaving = self.snapshots.leaving(gone)
        built = self.snapshots.take_finals() + self._snapshots_of(leaving, SnapshotRun(_now()))
        try:
            self.snapshots.write(built)
        except Exception as exc:  # the revoke goes on: their next owner snapshots them after its recovery
            level = logging.INFO if isinstance(exc, NotReady | ProducerClosed) else logging.WARNING
            logger.log(
                level, "%d budget usage snapshots of revoked partitions not handed over: %r", len(built), exc
            )
        return []

    async def _on_shutdown(self, app: Any, **kwargs: Any) -> None:
        """On a clean stop, write what is pending, flush it and commit what it covers.

        Faust's own last commit ran before this, capped at the last write and the
        last delivered micro-batch; a failure here only means the next owner
        re-reads a little more.
        """
        self._log_signals()  # the signals since the last snapshot run
        try:
            await self._write_changes(flushed=True)
            await self.deliveries.settled()  # flushed: stage 1's last micro-batch is committed too
            await self.app.consumer.commit()
        except Exception as exc:
            logger.warning("could not write the pending table changes on stop: %r", exc)

    async def _account_one(self, record: Any) -> None:
        if not isinstance(record, dict):
            if native_record(record):
                await self._account_bytes(record)
                return
            raise TypeError(f"a usage record is a JSON object, not {type(record).__name__}")
        if record_version(record) == RECORD_VERSION_SINGLE:
            await self._account_single(record)
            return
        handlers = {
            BATCH: self._account_batch,
            BATCHES: self._account_batches,
            GROUPS: self._account_batches,
            TICKS: self._account_ticks,
            REMOVALS: self._account_removals,
            SWEEP: self._account_sweep,
        }
        await handlers[record["kind"]](record)

    async def _account_ticks(self, record: dict[str, Any]) -> None:
        """Re-decide each key; a key that fails is logged with its key and the others go on."""
        now = _now()
        for budget_id, key in tick_rows(record):
            if (budget := self._budgets.get(budget_id)) is None:
                continue
            try:
                await self._settle(budget, key, now)
            except Exception:
                self.agent_errors += 1
                logger.exception("could not refresh budget %s key %r", budget_id, key)

    async def _account_removals(self, record: dict[str, Any]) -> None:
        for budget_id, key, scope in removal_rows(record):
            await self._clear(budget_id, key, scope)

    async def _account_single(self, record: dict[str, Any]) -> None:
        """A version 1 record, about one key (see `stream/records.py`: when this path can go)."""
        if record.get("kind") == "context":
            source = (record["source_partition"], record["source_offset"])
            await self._observe_context(record["guard"], record["key"], record["inputs"], source)
        elif record.get("removed"):
            await self._clear(record["budget"], record["key"], record["scope"])
        elif (budget := self._budgets.get(record["budget"])) is None:
            return
        elif record.get("tick"):
            await self._settle(budget, record["key"], _now())
        else:
            delta = UsageDelta.from_dict(record)
            source = (delta.source_partition, delta.source_offset)
            if (signal := self._apply(DeltaRow.from_wire(delta.to_row()), source, _now())) is not None:
                await self._send_signal(signal)

    async def _account_batches(self, record: dict[str, Any]) -> None:
        """Add a stage-1 micro-batch's sub-batches in order, each with its own message's source."""
        now = _now()
        for batch in sub_batches(record):
            await self._account_rows(batch, now)

    async def _account_bytes(self, record: Any) -> None:
        """A `batches` or `groups` record the native module read from its bytes (`UsageRecord`):
        what `_account_batches` does with its decoded lists, without them.

        The native `TotalsRows.add_record` adds the common steps, sub-batch by sub-batch, and hands
        back each other row (and each sub-batch's contexts) as its bytes, with the step it stopped
        at, which are decoded here and applied by the reference (`_account_handed`,
        `_observe_context`), in order. A step to apply alone comes as its own row's fields (a
        tuple, `records.step_row`'s) with its message's offset: nothing decoded for it (the row's
        JSON decoded and read for one step: ~8% of stage 2 on small messages, BENCHMARKS.md, hSig).
        The stores and pending changes are looked up again after every await (as in
        `_account_rows_natively`). Without the native rows the reference decodes the record whole.
        """
        native = native_totals_rows()
        if native is None:
            await self._account_one(decoded(record.payload))
            return
        now = _now()
        while True:
            added, handed = native.add_record(record, now, *self._native_stores())
            self.changes.added(added)
            if handed is None:
                return
            partition, offset, payload, contexts, step, alone = handed
            if contexts:
                for guard_id, key, inputs in map(ContextRow._make, decoded(payload)):
                    await self._observe_context(guard_id, key, inputs, (partition, offset))
            elif type(payload) is tuple:  # a step alone: its own row, `offset` its message's
                if (signal := self._apply(payload, (partition, offset), now)) is not None:
                    await self._send_signal(signal)
            else:
                await self._account_handed(decoded(payload), step, alone, (partition, offset), now)

    async def _account_batch(self, record: dict[str, Any]) -> None:
        """Add one OTLP message's deltas for this partition; each window key is written once."""
        await self._account_rows(BatchRecord.from_wire(record), _now())

    async def _account_rows(self, batch: BatchRecord, now: datetime) -> None:
        """Each row `_apply`'d with its message's source, a group's row with steps `_apply_combined`.

        A group's row that one message made (its tenth field that message's offset, not the
        group's last: most rows of small messages) is `_apply`'d here, with no call or list
        between. Where the native module is in use, `_account_rows_natively` adds them instead.
        """
        source = batch.source
        native = native_totals_rows()
        if native is not None and type(batch.deltas) is list:
            await self._account_rows_natively(native, batch.deltas, source, now)
        else:
            await self._account_rows_in_python(batch.deltas, source, now)
        for guard_id, key, inputs in map(ContextRow._make, batch.contexts):
            await self._observe_context(guard_id, key, inputs, source)

    async def _account_rows_natively(
        self, native: Any, rows: list[Any], source: tuple[int, int], now: datetime
    ) -> None:
        """The rows in order: each common step added by the native `TotalsRows` (no signal, no state
        change: contracts/native/src/totals.rs), each other one by `_account_handed`.

        The stores and pending changes are looked up again after every await: a changelog write
        may take the pending changes meanwhile (`TableChanges.target`, asked by the native call).
        """
        at, step, end = 0, 0, len(rows)
        while at < end:
            at, step, alone, added = native.add(rows, at, step, *source, now, *self._native_stores())
            self.changes.added(added)
            if at < end:
                await self._account_handed(rows[at], step, alone, source, now)
                at, step = (at, step + 1) if alone else (at + 1, 0)

    async def _account_handed(
        self, row: list[Any], step: int, alone: bool, source: tuple[int, int], now: datetime
    ) -> None:
        """A row the native `TotalsRows` handed back at its step `step`, its steps before added.

        `alone`: that step alone, `_apply`'d as its message's own row (most often it changes the
        key's action and publishes); the native rows go on from the next step, on the kept answer
        the decision left. Else the row from that step on in Python: the whole row (`step` 0), or
        the rest of a group's row that the native rows stopped at again right after a step
        applied alone (`_apply_combined`). Before, a row that changed the action at one of its
        ~8 steps went whole through the Python walk (BENCHMARKS.md, helper hO).
        """
        if alone:
            own = row[-1][step]
            signal = self._apply(step_row(row, own), (source[0], own[0]), now)
            if signal is not None:
                await self._send_signal(signal)
        elif step:
            for signal in self._apply_combined(row, row[-1], source, now, step):
                await self._send_signal(signal)
        else:
            await self._account_rows_in_python([row], source, now)

    def _native_stores(self) -> tuple[Any, ...]:
        """What the native `TotalsRows` adds to, as its `add` and `add_record` take it; looked up
        again for every call, as the stores are after every await (`_account_rows_natively`)."""
        return (
            self._budgets,
            plain_store(self.totals),
            self.changes,
            self.totals,
            plain_store(self.states),
            self.snapshots.waiting,
            self._new_window,
        )

    def _new_window(
        self, budget: Budget, window_start_ns: int, last_ns: int, now: datetime
    ) -> WindowTotals | None:
        """A window absent from the table, for the native `TotalsRows` to add its first row to: its
        empty totals with the kept answer of no spend (`decide_action`: the native add holds each
        step to it, as it holds a stored window's), not yet in the table. None where the reference
        counts the row as late after eviction (`_forgotten`, with the first step's last event):
        the row is handed back. Without it every window's first row was handed back to Python."""
        if self._forgotten(budget, window_start_ns, last_ns):
            return None
        totals = WindowTotals()
        decide_new_window(budget, window_start_ns, totals, now)
        return totals

    async def _account_rows_in_python(self, rows: list[Any], source: tuple[int, int], now: datetime) -> None:
        """The rows' reference path (see `_account_rows`)."""
        for row in rows:
            if len(row) == DELTA_ROW_FIELDS_WITH_STEPS:  # a group's row (`GroupRows`)
                origin = row[-1]
                if type(origin) is not int:  # the steps of several messages
                    for signal in self._apply_combined(row, origin, source, now):
                        await self._send_signal(signal)
                    continue
                signal = self._apply(row[:DELTA_ROW_FIELDS], (source[0], origin), now)
            else:
                # a current row unpacks as a `DeltaRow` does; one written before the call mix is padded
                signal = self._apply(
                    row if len(row) == DELTA_ROW_FIELDS else DeltaRow.from_wire(row), source, now
                )
            if signal is not None:
                await self._send_signal(signal)

    def _apply_combined(
        self, row: list[Any], steps: list[list[Any]], source: tuple[int, int], now: datetime, first: int = 0
    ) -> list[Signal]:
        """A group's row with steps (from its step `first` on): what its messages' own rows would
        do, applied one by one (`_apply`), in order.

        In runs: the longest run of steps that deciding after each would leave alone is added with
        one decision (`_apply_at_once`; most rows are one such run), the step that ends it is
        `_apply`'d alone (skipped as a replay, refused, or decided and its signal published), and
        the next run starts after it, from the action published then.
        """
        partition, end = source[0], len(steps)
        at = self._apply_at_once(row, steps, first, partition, now)
        signals = []
        while at < end:
            step = steps[at]
            signal = self._apply(step_row(row, step), (partition, step[0]), now)
            if signal is not None:
                signals.append(signal)
            at = self._apply_at_once(row, steps, at + 1, partition, now) if at + 1 < end else end
        return signals

    def _apply_at_once(
        self, row: list[Any], steps: list[list[Any]], at: int, partition: int, now: datetime
    ) -> int:
        """Add a combined row's steps from `at` on with one decision, as many as deciding after each
        would leave alone; the index after the last one added (`at`: none, nothing changed).

        Such a run starts with a step above the key's mark (no step of it is a replay: steps
        ascend), holds valid amounts only, and no state between its first and its last step
        decides another action than the one published (`_settled_run`); then no step of it would
        publish and the totals are the same step for step (each `add`ed). `_apply_combined`
        applies the step after the run alone.

        The window is then decided once (`decide_action`, whose answer is the published one): that
        only leaves its kept answer (`WindowTotals.settled`), which the native `TotalsRows` needs to
        add the window's next rows itself. Without it a window made or moved on here handed every
        later row back to this path (most rows handed back: BENCHMARKS.md, helper hC).
        """
        budget_id, key, window_start_ns, _, _, _, _, bucket_ns, mix, _ = row
        budget = self._budgets.get(budget_id)
        if budget is None:
            return len(steps)  # a budget no longer configured: no step would count
        run, added = _valid_run(steps, at)
        if not run:
            return at
        state_key = f"{budget_id}|{key}|{window_start_ns}"
        stored = plain_store(self.totals).get(state_key)
        if stored is None:
            if self._forgotten(budget, window_start_ns, run[0][3] + run[0][4]):  # its last event
                return at
            totals = WindowTotals()
        else:
            totals = stored if type(stored) is WindowTotals else WindowTotals.from_state(stored)
        if run[0][0] <= totals.applied.get(str(partition), -1):  # a new window's too: offset -1 is a replay
            return at
        previous = plain_store(self.states).get(f"{budget_id}|{key}")
        decides = not (previous and previous["window_start_ns"] > window_start_ns)  # else nothing
        if decides:
            action = previous["action"] if previous else "ok"
            run = self._settled_run(budget, row, totals, run, added, action, now)
            if not run:
                return at
        totals.add_steps(partition, run, bucket_ns, mix is not None)
        if decides:
            decide_action(budget, window_start_ns, totals, now)  # leaves the kept answer: see above
        self.changes.set(self.totals, state_key, totals)
        self.snapshots.waiting[state_key] = None
        return at + len(run)

    def _settled_run(
        self,
        budget: Budget,
        row: list[Any],
        totals: WindowTotals,
        run: list[list[Any]],
        added: float,
        action: str,
        now: datetime,
    ) -> list[list[Any]]:
        """The leading steps of `run` (`added` in all) after each of which the key's published
        `action` is still the one decided: `policy.settles_alike` for the whole run (most rows), else
        `policy.settling_steps` (rungs, a predictive downgrade, a closed window, a rolling ring's
        reach)."""
        window_start_ns, bucket_ns = row[2], row[7]
        events = [step[3] + step[4] for step in run] if bucket_ns else []  # each step's last event
        if settles_alike(budget, window_start_ns, totals, now, action, added, events, bucket_ns):
            return run
        steps = [(step[1], step[3] + step[4]) for step in run]
        return run[: settling_steps(budget, window_start_ns, totals, now, action, steps, bucket_ns)]

    def _apply(
        self, row: DeltaRow | tuple[Any, ...] | list[Any], source: tuple[int, int], now: datetime
    ) -> Signal | None:
        """Add one delta row to its window's totals; the signal to publish if the key's action changed.

        `row` is a `DeltaRow`, the tuple of its fields (a step the native rows hand back alone) or
        a wire row of all its fields (they unpack the same).
        """
        budget_id, key, window_start_ns, amount, spans, first_ns, last_ns, bucket_ns, mix = row
        budget = self._budgets.get(budget_id)
        if budget is None:
            return None
        if not (0.0 <= amount < math.inf):  # decoding rejects such spans: a last line of defence
            self.agent_errors += 1
            logger.error("usage for %s|%s at %s is %r: not counted", budget_id, key, source, amount)
            return None
        state_key = f"{budget_id}|{key}|{window_start_ns}"
        stored = plain_store(self.totals).get(state_key)
        if stored is None and self._forgotten(budget, window_start_ns, last_ns):
            self.late_after_eviction += 1  # counted before and forgotten, or too late: not revived
            return None
        totals = stored if type(stored) is WindowTotals else WindowTotals.from_state(stored)
        if not totals.add(*source, amount, spans, first_ns, last_ns, bucket_ns, mix):
            self.replayed_deltas += 1  # a replay after a crash: already counted
            return None
        self.changes.set(self.totals, state_key, totals)
        self.snapshots.waiting[state_key] = None
        return self._signal_if_changed(budget, key, window_start_ns, totals, now)

    async def _observe_context(
        self, guard_id: str, key: str, inputs: list[int], source: tuple[int, int]
    ) -> None:
        guard = self.config.context_guard(guard_id)
        if guard is None:
            return
        state_key = f"{guard.id}|{key}"
        growth = ContextGrowth.from_state(self.contexts.data.get(state_key))
        # Context rows carry no event time: the session is stamped with this worker's latest clock.
        wall_ns = int(_now().timestamp() * _NS)
        clock_ns = max(self._partition_clock(self.changes.partition), wall_ns, self._latest_event_ns)
        if not growth.observe(inputs, *source, clock_ns):
            self.replayed_deltas += 1
            return
        self.changes.set(self.contexts, state_key, growth.to_state())
        signal = decide_context(guard, key, growth, _now(), self.settings.signal_ttl)
        previous = self.states.data.get(state_key)
        if signal.action != (previous["action"] if previous else "ok"):
            self.changes.set(self.states, state_key, {"action": signal.action, "window_start_ns": 0})
            await self._send_signal(signal)

    async def _clear(self, budget_id: str, key: str, scope: str) -> None:
        """A removed budget, or an expired `ok`: forget the key's state, delete its signal from the topic."""
        self.changes.delete(self.states, f"{budget_id}|{key}")
        self._throttles_expire.pop(f"{budget_id}|{key}", None)
        await self._publish_signal(signal_key(scope, key, budget_id), None)

    async def _settle(self, budget: Budget, key: str, now: datetime) -> None:
        """Re-decide a key against the window that holds `now` (roll-over and refresh): a changed
        action is published, the same restriction only when `_renewal_due`."""
        window_start_ns = budget.window_spec.start_ns(int(now.timestamp() * _NS))
        totals = WindowTotals.from_state(self.totals.data.get(f"{budget.id}|{key}|{window_start_ns}"))
        state_key = f"{budget.id}|{key}"
        refresh = self._renewal_due(state_key, self.states.data.get(state_key), window_start_ns, now)
        signal = self._signal_if_changed(budget, key, window_start_ns, totals, now, refresh=refresh)
        if signal is not None:
            await self._send_signal(signal)
        elif _retire_due(self.states.data.get(state_key), now):
            await self._clear(budget.id, key, budget.scope_name)  # the expired `ok` -> a tombstone

    def _renewal_due(
        self, state_key: str, state: dict[str, Any] | None, window_start_ns: int, now: datetime
    ) -> bool:
        """Whether a refresh publishes the key's signal again even if its action is the same.

        Only a throttle waits: guards deny by it whatever its numbers. A `warn` or a `downgrade`
        is renewed each round, as before: its `spent` is the guards' local-accounting baseline
        (instrumentation/local_accounting.py), which a refresh brings up to date. A throttle is
        renewed when the window it was published for is not the one that holds `now` (it
        carries on into the next window: the guards ignore a signal of an ended one), when its
        copy at the guards expires within `StreamSettings.renew_within`, or when this worker
        does not know when it published it (a start, a rebalance, a reloaded budget, a signal given
        up).
        """
        if state is None or state["action"] != "throttle" or state["window_start_ns"] != window_start_ns:
            return True
        expires = self._throttles_expire.get(state_key)
        return expires is None or expires - now < self.settings.renew_within

    def _signal_if_changed(
        self,
        budget: Budget,
        key: str,
        window_start_ns: int,
        totals: WindowTotals,
        now: datetime,
        refresh: bool = False,
    ) -> Signal | None:
        """The signal to publish for a key (recording it as the key's state), or None.

        A `Signal` (a pydantic model with a formatted reason) is only built
        when the action differs from the last published one, or to refresh a
        restriction; the cheap `decide_action` settles every other delta.
        """
        state_key = f"{budget.id}|{key}"
        previous = plain_store(self.states).get(state_key)
        ttl = self.settings.signal_ttl
        signal = changed_signal(budget, key, window_start_ns, totals, now, previous, ttl, refresh)
        if signal is not None:
            state = {"action": signal.action, "window_start_ns": window_start_ns}
            if signal.action == "ok":  # retired by a tombstone once it expired (`_refresh`, `_settle`)
                state[RETIRE_AT_NS] = int(signal.expires_at.timestamp() * _NS)
            if state != previous:  # a refresh leaves it as it was: a changelog record would repeat it
                self.changes.set(self.states, state_key, state)
        return signal

    async def _send_signal(self, signal: Signal) -> None:
        """Published at once; logged one line per signal at DEBUG, and counted for `_log_signals`.

        At wire speed thousands of signals a second change action: a formatted INFO line each
        was most of the signal's cost on the worker's loop (BENCHMARKS.md, the signal log).
        """
        key = signal.kafka_key  # built once: formatted from three fields at each read
        logger.debug("signal %s -> %s (%s)", key, signal.action, signal.reason)
        counted = self._signals_unlogged.get(signal.action)
        if counted is None:
            counted = self._signals_unlogged[signal.action] = [0, ""]
        counted[0] += 1
        counted[1] = key
        value, record_key = signal.to_json(), key.encode()
        # `_publish_signal` inline: awaiting it was a coroutine per signal
        if not self.signal_records.publish_at_once(record_key, value):
            await self.signal_records.publish(record_key, value)
        if self.published is not None:  # after the hand-over: a record that never went is not noted
            self.published.note(record_key, value, signal)
        if signal.action == "throttle":
            self._throttles_expire[f"{signal.budget}|{signal.key}"] = signal.expires_at

    def _log_signals(self) -> None:
        """One INFO line per snapshot run: the signals published since the last, by action."""
        if self._signals_unlogged:
            counts, self._signals_unlogged = self._signals_unlogged, {}
            summary = ", ".join(f"{action} {n} (latest {key})" for action, (n, key) in sorted(counts.items()))
            logger.info("signals published: %s", summary)

    async def _publish_signal(self, key: str, value: bytes | None) -> None:
        """At once: into the producer's open batch of the key's partition, a signal waits for nothing else
        (nor for a coroutine of `publish`'s, but the first time, for the topic's metadata)."""
        record_key = key.encode()
        if not self.signal_records.publish_at_once(record_key, value):
            await self.signal_records.publish(record_key, value)

    # --- eviction (stream/eviction.py) -------------------------------------------------
    def _partition_clock(self, partition: int) -> int:
        """The clock of a usage partition: the horizon its changelog holds (the latest sweep's).

        Read from the table each time: a partition this worker gets back after a rebalance may
        have been swept further by another worker meanwhile. Every sweep stores its clock, so a
        replay after a crash refuses exactly the deltas the first reading refused.
        """
        return int(plain_store(self.totals).get(horizon_key(partition)) or 0)

    def _forgotten(self, budget: Budget, window_start_ns: int, last_ns: int) -> bool:
        """Whether a delta for a window absent from the table is for one this partition forgot."""
        clock = self._partition_clock(self.changes.partition)
        return bool(clock) and self.lifetimes.window_expired(budget, window_start_ns, last_ns, clock)

    def _owned(self, partition_key: str, partition: int) -> bool:
        return usage_partition(partition_key, self.settings.partitions) == partition

    async def _account_sweep(self, record: dict[str, Any]) -> None:
        """Forget what nothing can count in any more, on this record's partition, by its clock.

        Only this partition's keys: each is forgotten in its own partition's stream, where
        its deltas are counted. A window's last change is snapshotted before it goes, so its
        last snapshot stays on the budget usage topic. The horizon is written after the
        tombstones (same changelog partition), so a recovered horizon implies its tombstones.
        """
        partition = self.changes.partition
        stored = self._partition_clock(partition)
        clock = max(SweepRecord.from_wire(record).clock_ns, stored)
        live, windows = self._evict_windows(partition, clock)
        sessions = self._evict_contexts(partition, clock)
        states = await self._evict_states(partition, live, sessions)
        if clock > stored or windows:  # stored even when nothing went: deltas are refused by it
            self.changes.set(self.totals, horizon_key(partition), clock)
        for table, count in (
            ("window-totals", windows),
            ("context-growth", len(sessions)),
            ("signal-states", states),
        ):
            if count:
                self.evicted[table] = self.evicted.get(table, 0) + count
        self._log_table_sizes()

    def _evict_windows(self, partition: int, clock: int) -> tuple[set[str], int]:
        """(`budget|key` of every window left, windows forgotten): closed, idle or emptied ones go."""
        live: set[str] = set()
        evicted = 0
        run = SnapshotRun(_now())
        #: per `budget|...|window_start_ns` pair (key left out), `Lifetimes.expired_before`: the
        #: walk covers every window of every partition, most sharing a few such pairs
        deadlines: dict[tuple[str, str], float] = {}
        for state_key, stored in list(self.totals.data.items()):
            if not is_window_key(state_key) or not stored:
                continue
            partition_key, start = state_key.rsplit("|", 1)  # `split_window_key`, unparsed
            budget_id = partition_key.split("|", 1)[0]
            deadline = deadlines.get((budget_id, start))
            if deadline is None:
                budget = self._budgets.get(budget_id)
                deadline = deadlines[(budget_id, start)] = (
                    -math.inf if budget is None else self.lifetimes.expired_before(budget, int(start), clock)
                )
            if not last_event_ns(stored) < deadline or not self._owned(partition_key, partition):
                live.add(partition_key)
                continue
            self.snapshots.evicting(state_key, partial(self._usage_snapshot, state_key, run))
            self.changes.delete(self.totals, state_key)
            evicted += 1
        return live, evicted

    def _evict_contexts(self, partition: int, clock: int) -> set[str]:
        """`guard|session` of the context growth forgotten: sessions idle for the session idle time."""
        idle = set()
        for state_key, stored in list(self.contexts.data.items()):
            seen_ns = ContextGrowth.from_state(stored).seen_ns
            if self.lifetimes.session_idle(seen_ns, clock) and self._owned(state_key, partition):
                self.changes.delete(self.contexts, state_key)
                idle.add(state_key)
        return idle

    async def _evict_states(self, partition: int, live: set[str], sessions: set[str]) -> int:
        """Forget the signal state of keys without a window (and of idle sessions' context guards).

        A forgotten key gets a tombstone on the signal topic: nothing restricts it any more (a
        guard in `closed` mode must not keep refusing it), and an `ok` not yet retired would
        otherwise stay on the compacted topic for good.
        """
        evicted = 0
        for state_key, state in list(self.states.data.items()):
            if state_key in live or not state:
                continue
            budget = self._budgets.get(state_key.split("|", 1)[0])
            gone = state_key in sessions if budget is None else self._owned(state_key, partition)
            if not gone:
                continue
            self.changes.delete(self.states, state_key)
            self._throttles_expire.pop(state_key, None)
            evicted += 1
            if budget is not None:
                key = state_key.split("|", 1)[1]
                await self._publish_signal(signal_key(budget.scope_name, key, budget.id), None)
        return evicted

    def table_sizes(self) -> dict[str, int]:
        """Entries per table on this worker (the horizons left out): what eviction keeps bounded."""
        return {
            "window-totals": sum(1 for key in list(self.totals.data.keys()) if is_window_key(key)),
            "context-growth": len(self.contexts.data),
            "signal-states": len(self.states.data),
        }

    def _log_table_sizes(self) -> None:
        sizes = self.table_sizes()
        if sizes != self._sizes_logged:
            self._sizes_logged = sizes
            logger.info("table sizes: %s evicted: %s", json.dumps(sizes), json.dumps(self.evicted))

    async def _sweep(self) -> None:
        """Send every usage partition a sweep: the latest time this worker knows, wall or event."""
        clock = max(int(_now().timestamp() * _NS), self._latest_event_ns)
        record = SweepRecord(clock).to_wire()
        for partition in range(self.settings.partitions):
            await self.usage_topic.send(key=SWEEP, value=record, partition=partition)

    # --- timer ---------------------------------------------------------------------
    async def _refresh(self) -> None:
        """Ask the partition of each key that needs it to re-decide it (`_refresh_wanted`): renew a
        restriction, lift it at roll-over, retire an `ok`."""
        now = _now()
        if self.signal_records.given_up != self._given_up_seen:  # a throttle may not have gone out
            self._given_up_seen = self.signal_records.given_up
            self._throttles_expire.clear()
        starts: dict[str, int] = {}
        wanted = [
            key for key, state in list(self.states.items()) if self._refresh_wanted(key, state, now, starts)
        ]
        await self._send_per_partition(TICKS, ((key, list(TickRow(*key.split("|", 1)))) for key in wanted))

    def _refresh_wanted(
        self, state_key: str, state: dict[str, Any] | None, now: datetime, starts: dict[str, int]
    ) -> bool:
        """Whether a refresh round ticks this key: an `ok` due to retire, a restriction of a rolling
        window (its spend slides out with the clock: re-decided, published if changed or due), one
        whose signal `_renewal_due` says to publish again. Not a key without a configured budget (a
        context guard's session): stage 2 passes over it. `starts`: each budget's window start at
        `now`, worked out once a round.

        Filtered here, before the tick is sent: a throttle not due costs neither a tick nor a
        decision. Before, every restriction was ticked and republished every round, 4 times per TTL.
        """
        if not state:
            return False
        budget_id = state_key.split("|", 1)[0]
        budget = self._budgets.get(budget_id)
        if budget is None:
            return False
        if state["action"] == "ok":
            return _retire_due(state, now)
        start = starts.get(budget_id)
        if start is None:
            window = budget.window_spec
            start = window.start_ns(int(now.timestamp() * _NS)) if not window.rolling_ns else _ROLLING
            starts[budget_id] = start
        return start == _ROLLING or self._renewal_due(state_key, state, start, now)

    async def _reload_budgets(self) -> None:
        """Swap in budgets changed on the topic; re-decide every key of a changed or removed budget."""
        if self.feed is None or (new := self.feed.take_update()) is None:
            return
        old, self.config = self.config, new
        self._budgets = {budget.id: budget for budget in new.budgets}
        self.snapshots.forget_keys()
        if new.prices != old.prices or new.unpriced != old.unpriced:
            self.prices = PriceBook.for_config(new)
        removed = {b.id: b for b in old.budgets if new.budget(b.id) is None}
        changed = {b.id for b in new.budgets if old.budget(b.id) != b}
        logger.info("budgets reloaded: changed %s, removed %s", sorted(changed), sorted(removed))
        self._forget_renewals(changed)  # their ticks publish each key's signal again, with the new budget
        ticks, removals = [], []
        for partition_key in self._known_keys(changed | set(removed)):
            budget_id, key = partition_key.split("|", 1)
            if budget_id in removed:
                removals.append(
                    (partition_key, list(RemovalRow(budget_id, key, removed[budget_id].scope_name)))
                )
            else:
                ticks.append((partition_key, list(TickRow(budget_id, key))))
        await self._send_per_partition(TICKS, ticks)
        await self._send_per_partition(REMOVALS, removals)

    def _forget_renewals(self, budget_ids: set[str]) -> None:
        """Forget when the throttles of these budgets' keys were published: `_renewal_due` then says yes."""
        for state_key in [key for key in self._throttles_expire if key.split("|", 1)[0] in budget_ids]:
            del self._throttles_expire[state_key]

    def _known_keys(self, budget_ids: set[str]) -> set[str]:
        """`budget|key` of every key this worker holds state for, among these budgets."""
        keys = set(self.states.keys())
        keys |= {state_key.rsplit("|", 1)[0] for state_key in list(self.totals.keys())}
        return {key for key in keys if key.split("|", 1)[0] in budget_ids}

    async def _snapshot(self) -> None:
        """Publish the totals of windows changed since their last snapshot (all owned, after a rebalance).

        The windows in line when it starts (at most `SNAPSHOT_MAX_PER_RUN`), evicted
        windows' last snapshots and failed ones first, then the oldest change first, in
        slices with pauses between them, so the agents (and the signals they send) are
        not held up by a burst of snapshots; for at most `SNAPSHOT_RUN_SHARE` of the
        interval, so a run ends before the next is due. Their delivery is `UsageSnapshots`'
        (stream/snapshots.py): the timer never waits for the broker, and a failed snapshot is
        taken again.
        """
        snapshots = self.snapshots
        if self.replayed_deltas != self._replays_logged:
            self._replays_logged = self.replayed_deltas
            logger.info("%d replayed deltas recognised and not counted again", self.replayed_deltas)
        self._log_counters()
        self._log_signals()
        pending = snapshots.take(SNAPSHOT_MAX_PER_RUN)
        run = SnapshotRun(_now())
        ends_at = time.monotonic() + self.settings.snapshot_interval.total_seconds() * SNAPSHOT_RUN_SHARE
        for first in range(0, max(len(pending), 1), SNAPSHOT_SLICE):  # once at least: evicted windows'
            if first:
                await asyncio.sleep(SNAPSHOT_PAUSE_S)
                if time.monotonic() > ends_at:  # the next run is due soon: the rest first in line there
                    snapshots.put_back(pending[first:])
                    return
            if snapshots.crowded():  # the broker does not keep up: the rest waits for the next run
                snapshots.put_back(pending[first:])
                return
            if not await self.stall_guard.still_member():  # the revoke that follows forgets them
                snapshots.put_back(pending[first:])
                logger.warning("budget usage snapshots held back: %s", HELD_BACK)
                return
            claimed = snapshots.claim(pending[first : first + SNAPSHOT_SLICE])
            built = snapshots.take_finals() + self._snapshots_of(claimed, run)
            try:
                snapshots.write(built)
            except Exception as exc:  # not taken (the producer is stopping?): retried at the next run
                snapshots.put_back(pending[first + SNAPSHOT_SLICE :])
                level = logging.INFO if isinstance(exc, NotReady | ProducerClosed) else logging.WARNING
                logger.log(level, "budget usage snapshots not handed over (%r): retried at the next run", exc)
                return

    def _snapshots_of(self, state_keys: list[str], run: SnapshotRun) -> list[Snapshot]:
        """The snapshots of these windows; one that cannot be built is logged and counted, not fatal."""
        built, table = [], plain_store(self.totals)
        for state_key in state_keys:
            try:
                snapshot = self._usage_snapshot(state_key, run, table)
            except Exception:  # one bad window must not stop the others' snapshots
                self.agent_errors += 1
                logger.exception("could not snapshot %r", state_key)
                continue
            if snapshot is None:
                self.snapshots.nothing_to_take(state_key)
            else:
                built.append(snapshot)
        return built

    def counters(self) -> dict[str, Any]:
        """What this worker set aside or corrected since it started (logged when it changes)."""
        return {
            "rejected_spans": dict(sorted(self.rejected.items())),
            "deadlettered": self.deadlettered,
            "clock_corrected_spans": self.clock_corrected,
            "duplicate_messages": self.duplicates,
            "unpriced_calls": self.stats.unpriced,
            "too_late": self.stats.too_late,
            "agent_errors": self.agent_errors,
            "evicted": dict(sorted(self.evicted.items())),
            "late_after_eviction": self.late_after_eviction,
            "native_decode_failures": native_failures.count,
            "native_sum_failures": native_sum_failures.count,
            "signals_failed": self.signal_records.failed,
            "signals_given_up": self.signal_records.given_up,
            "usage_records_refused": self.deliveries.refused_records,
        }

    def _log_counters(self) -> None:
        counters = self.counters()
        if tuple(map(str, counters.values())) != self._counters_logged:
            self._counters_logged = tuple(map(str, counters.values()))
            logger.info("input counters: %s", json.dumps(counters))

    def _window_held(self, state_key: str) -> bool:
        """Whether the window is in the totals table (not evicted)."""
        return state_key in plain_store(self.totals)

    def _usage_snapshot(
        self, state_key: str, run: SnapshotRun, table: Mapping[str, Any] | None = None
    ) -> Snapshot | None:
        """A window's `BudgetUsage` record (Kafka key, partition, JSON), encoded without building the model.

        The bytes are `usage_json`'s, in parts: what the window's snapshots share
        (`UsageSnapshots.window_key`), what its budget's windows with the same start
        share in a run (`SnapshotRun.parts`), and its amounts. `table`: the totals'
        store (`plain_store`), read once per slice by `_snapshots_of`.
        """
        budget_id, _, rest = state_key.partition("|")
        key, _, window_start_ns = rest.rpartition("|")
        budget = self._budgets.get(budget_id)
        stored = (plain_store(self.totals) if table is None else table).get(state_key)
        if budget is None or not stored:
            return None
        totals = stored if type(stored) is WindowTotals else WindowTotals.from_state(stored)
        parts = run.parts(budget, window_start_ns)
        window = self.snapshots.window_key(state_key, key, parts)
        spent = window_spent(budget, int(window_start_ns), totals, run.now_ns)
        value = run.value(window.head, parts.bounds, spent, budget.limit, totals.spans, run.stamp)
        return self.snapshots.snapshot(state_key, window, value)


class SnapshotRun:
    """What the snapshots taken at one moment share: `updated_at`, the parts of each budget's
    windows with one start (`WindowParts`), and the writer of their amounts (`usage_value_writer`)."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.now_ns = int(now.timestamp() * _NS)
        self.stamp = usage_stamp(now)
        self.value = usage_value_writer()
        self._parts: dict[tuple[int, str], WindowParts] = {}

    def parts(self, budget: Budget, window_start_ns: str) -> WindowParts:
        """The `WindowParts` of the budget's windows with this start (`window_bounds`), once per run:
        a rolling window's (start 0) bounds move with the clock alone."""
        known = self._parts.get((id(budget), window_start_ns))
        if known is None or known.budget is not budget:
            known = window_parts(budget, *window_bounds(budget, int(window_start_ns), self.now_ns))
            self._parts[(id(budget), window_start_ns)] = known
        return known


def native_totals_rows() -> Any | None:
    """Stage 2's native rows (`TotalsRows`, contracts/native/src/totals.rs) where the native module
    is in use, made at first use with the shapes stage 2's Python gives it (`native_part`); else None."""
    return native_part("TotalsRows", new_totals_rows)


def new_totals_rows(native: Any) -> Any | None:
    """A `TotalsRows` made by the native module's class `native`, or None if it does not fit."""
    try:
        return native(
            WindowTotals,
            Ring,
            NS_PER_MINUTE,
            MIX_FIELDS,
            DELTA_ROW_FIELDS,
            DELTA_ROW_FIELDS_WITH_STEPS,
            CALENDAR_SETTLED,
            ROLLING_SETTLED,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an older build, or other slots
        logger.warning("native stage-2 rows not used (the Python rows are): %s; rebuild: make venv", exc)
        return None


def _valid_run(steps: list[list[Any]], at: int) -> tuple[list[list[Any]], float]:
    """The steps from `at` up to the first whose amount no span has, and their sum: each bad step
    is refused alone (`_apply`), as its message's row would be. The sum, the steps' own amounts
    added in turn, not the row's: what is added is what is decided on."""
    run = steps[at:] if at else steps
    added = 0.0
    for index, step in enumerate(run):
        if not 0.0 <= step[1] < math.inf:
            return run[:index], added
        added += step[1]
    return run, added


def _has_steps(row: list[Any]) -> bool:
    """Whether a delta row is a group's with per-message steps (`GroupRows`)."""
    return len(row) == DELTA_ROW_FIELDS_WITH_STEPS and isinstance(row[-1], list)


def _steps_in(rows: list[list[Any]]) -> tuple[int, bool]:
    """The `Step`s a sub-batch's rows carry, and whether one of them is a group's (combined).

    One pass without a call per row (`_has_steps`'s test inlined): a group has tens of rows per message.
    """
    steps, combined = 0, False
    for row in rows:
        if len(row) == DELTA_ROW_FIELDS_WITH_STEPS:
            combined = True
            if isinstance(row[-1], list):
                steps += len(row[-1])
    return steps, combined


def _retire_due(state: dict[str, Any] | None, now: datetime) -> bool:
    """Whether a key's last published signal is an `ok` that has expired, so a tombstone may replace it.

    An expired `ok` restricts nothing and anchors no guard's local accounting any more: to
    every reader it means what a tombstone (or no record) means, "no restriction".
    """
    return (
        state is not None
        and state["action"] == "ok"
        and RETIRE_AT_NS in state
        and state[RETIRE_AT_NS] <= now.timestamp() * _NS
    )


def output_topics(settings: StreamSettings) -> list[TopicSpec]:
    """The topics the job writes (Faust only creates the ones it reads) and its internal usage topic."""
    topics, partitions = settings.topics, settings.partitions
    return [
        TopicSpec(topics.signals, partitions, compacted=True, config=SIGNALS_TOPIC_CONFIG),
        TopicSpec(topics.signal_checkpoints, 1, compacted=True, config=CHECKPOINTS_TOPIC_CONFIG),
        TopicSpec(topics.budget_usage, partitions, compacted=True),
        TopicSpec(topics.deadletter, 1),
        # Created by the deployment normally; if not, with the broker's clock on every record.
        TopicSpec(topics.spans, partitions, config=SPANS_TOPIC_CONFIG),
        # Read by the job, but created here too: when Faust creates it while subscribing, the
        # assignor may run first, ignore the missing topic, and leave it unread until the next
        # metadata refresh (5 minutes).
        TopicSpec(topics.usage, partitions),
    ]


def create_job(settings: StreamSettings | None = None) -> BudgetJob:
    """The job with the budgets currently on the topic (or the file), following later changes."""
    settings = settings or StreamSettings.from_env()
    config = load_config(settings)
    ensure_topics(settings.kafka, output_topics(settings))
    topic = settings.topics.budgets
    try:
        config = initial_config(settings.kafka, topic, config)
    except (KafkaError, TimeoutError) as exc:
        logger.warning("could not read %s at start (%s); starting with the file's budgets", topic, exc)
    job = BudgetJob(settings, config)
    job.feed = BudgetFeed(settings.kafka, topic, config).start()
    if settings.signal_checkpoint_interval:
        job.checkpoints = signal_checkpoint_writer(job, settings.signal_checkpoint_interval).start(wait_s=0)
    install_liveness_watchdog(job.app, settings)
    return job


def signal_checkpoint_writer(job: BudgetJob, interval: timedelta) -> SignalCheckpointWriter:
    """The job's checkpoint writer (not started), told what the job publishes so it need not parse it."""
    settings = job.settings
    return SignalCheckpointWriter(settings.kafka, settings.topics, interval, published=job.published)


def tune_gc() -> None:
    """Let the cyclic GC scan the young objects after `GC_YOUNG_OBJECTS` of them, not 700.

    Stage 1 makes a few lists per delta row and frees them (reference counts) once the
    micro-batch is sent; with CPython's default the collector ran ~270 young, 24 middle and
    2 full collections per 2,000 small messages (30,000 spans), 17-23% of stage 1's CPU
    (`bench/stream_ingest.py --split`). Objects in cycles are still collected, at most
    50,000 allocations later; the older generations keep their thresholds.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_OBJECTS, older, oldest)


def freeze_startup_heap() -> None:
    """Keep what exists at start-up (modules, the app, its topics and tables) out of later collections.

    Stage 2 decodes each usage record into a list per row, alive until the record is accounted:
    long enough to reach the oldest generation, so full collections come often, and each walked
    the whole start-up heap (`bench/stream_account.py`, BENCHMARKS.md: garbage collection per
    delta row fell 1.2-3.4x). Objects made later (table values) are still collected.
    """
    gc.collect()
    gc.freeze()


def run_worker(settings: StreamSettings | None = None, loglevel: str | None = None) -> None:
    """Run one worker of the job until SIGTERM / SIGINT, logging at `BURNGUARD_LOG_LEVEL` (info)."""
    loglevel = loglevel or env_log_level()
    quiet_library_logs()
    tune_gc()
    settings = settings or StreamSettings.from_env()
    use_event_loop(settings.event_loop)  # before the app: Faust makes its loops from the policy
    job = create_job(settings)
    freeze_startup_heap()
    make_worker(job, loglevel).execute_from_commandline()


def make_worker(job: BudgetJob, loglevel: str = "info") -> BoundedStopWorker:
    """The Faust worker of `job`, its stop bounded by `stop_timeout` (`liveness.BoundedStopWorker`)."""
    stop_timeout_s = job.settings.stop_timeout.total_seconds()
    return BoundedStopWorker(job.app, stop_timeout_s=stop_timeout_s, loglevel=loglevel, quiet=True)
