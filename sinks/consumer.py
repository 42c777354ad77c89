"""The ClickHouse sink: spans and signals from Kafka into ClickHouse; its batch, insert and commit policy.

Delivery is at least once and totals are exactly once. The sink buffers what
it polls, inserts it in batches, and commits the Kafka offsets only after
ClickHouse has the rows; a sink that dies in between re-reads the batch, and
the ReplacingMergeTree tables collapse the second copy (queries use FINAL).

Nothing is dropped and nothing stalls the stream:

- A message that is not a decodable OTLP request (or signal) is counted in
  `malformed`, logged with its topic, partition and offset, and passed over;
  the stream job, which reads the same topic, sends it to the dead-letter
  topic. Its offset is committed with the batch. A span that breaks a rule of
  `contracts/span_checks.py` (a number not finite, negative or past its
  ceiling, a value of the wrong type, a key too long) is not written and is
  counted in `rejected_spans` by reason; the stream job dead-letters it, so it
  is parked once. A span stamped outside the trusted skew around its record's
  broker time is written at that time, like the stream counts it, with the
  time it claimed in `extra` (`clock_corrected`).
- When ClickHouse is unreachable or an insert fails, the batch is kept, the
  failure counted in `insert_failures`, and the insert retried with
  exponential backoff. Meanwhile the partitions are paused and the consumer
  keeps polling, so it stays in its group without reading further; nothing
  is committed until the rows are in.
- When the commit after an insert fails (typically because the group is
  rebalancing), the offsets are kept and the commit retried on the following
  loop iterations, for the partitions the sink still owns. kafka-python 3
  keeps a partition's position when a rebalance gives it back to the same
  member, so a commit that was simply dropped would never be made: the
  partition would not be read again and its lag would stay forever.
- When a rebalance moves a partition away, the sink drops the rows it holds
  from it and the offsets it has not committed for it; the new owner reads
  them from the last commit (copies of rows already written collapse). A
  partition that comes back later is read from its last commit again.
- While a join is due or under way the sink stays in `consumer.poll` and does
  nothing else (no insert attempt, no backoff); a member kafka-python leaves
  REBALANCING with nothing under way is asked to rejoin; and, as a last resort,
  a consumer that has not been a stable group member for longer than any
  healthy rebalance can take is replaced by a new one, which reads on from the
  committed offsets (`consumer_restarts`). Why, and the kafka-python 3.0.12
  behaviour this works around: `membership.py`, which holds that side.
- On stop (SIGTERM, SIGINT or `stop_event`) the sink flushes what it holds
  and commits; if ClickHouse stays down past `shutdown_timeout_s` it exits
  without committing, and the next run reads those messages again.

Blocking ClickHouse calls (connecting, migrating, inserting) run on the
sink's own thread; kafka-python 3 sends heartbeats from its IO thread, and
chDB gives the GIL back often enough (under 1 s between switches when
measured on a loaded 2-core machine, against a 6 s minimum session timeout),
so they do not cost the group membership.

Spans that arrive without `burnguard.cost.usd` (e.g. from the OTel Collector)
are priced like the stream job prices them: genai-prices with the overrides of
the budgets the workers follow (the `burnguard.budgets` topic, else the file in
`BURNGUARD_BUDGETS_FILE`), so spend in ClickHouse matches what the budgets
saw; models without a known price stay unpriced (`priced = 0`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burnguard.contracts.budget_feed import BudgetFeed, initial_config
from burnguard.contracts.budgets import BudgetConfig, load_budget_file
from burnguard.contracts.otlp import decode_spans, native_failures
from burnguard.contracts.pricing import PriceBook, default_price_book, price_if_unpriced
from burnguard.contracts.signals import Signal
from burnguard.contracts.span_checks import SpanLimits, correct_clock
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import ClickHouseWriter, KafkaOrigin, connect, default_dsn, redact_dsn
from burnguard.sinks.membership import ConsumerStuck, GroupMember, names
from burnguard.sinks.schema import DEFAULT_SPAN_TTL_DAYS, migrate
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

DEFAULT_GROUP = "burnguard-sink"
DEFAULT_BATCH_MAX = 10_000
DEFAULT_FLUSH_INTERVAL_S = 1.0
DEFAULT_REBALANCE_POLL_S = 5.0
_POLL_TIMEOUT_S = 0.2
_COMMIT_RETRY_MAX_S = 5.0


@dataclass
class _Batch:
    """What was polled since the last insert: rows to insert and the offsets they end at."""

    spans: list[SpanUsage] = field(default_factory=list)
    span_origins: list[KafkaOrigin] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    signal_origins: list[KafkaOrigin] = field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    spans_inserted: bool = False  # so a retry after the signals failed does not insert spans twice
    started: float = 0.0  # monotonic time of the first message

    @property
    def rows(self) -> int:
        return len(self.spans) + len(self.signals)

    @property
    def empty(self) -> bool:
        return not self.next_offsets

    def due(self, batch_max: int, flush_interval_s: float) -> bool:
        if self.empty:
            return False
        return self.rows >= batch_max or time.monotonic() - self.started >= flush_interval_s

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget what came from `partitions`; returns the number of rows dropped."""
        before = self.rows

        def keep(origin: KafkaOrigin) -> bool:
            return TopicPartition(origin.topic, origin.partition) not in partitions

        spans = [(row, o) for row, o in zip(self.spans, self.span_origins, strict=True) if keep(o)]
        signals = [(row, o) for row, o in zip(self.signals, self.signal_origins, strict=True) if keep(o)]
        self.spans = [row for row, _ in spans]
        self.span_origins = [o for _, o in spans]
        self.signals = [row for row, _ in signals]
        self.signal_origins = [o for _, o in signals]
        for tp in partitions:
            self.next_offsets.pop(tp, None)
        return before - self.rows


def _offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{n}" for tp, n in sorted(offsets.items()))


class SpanSink:
    """Consumes spans and signals and writes them to ClickHouse; see the module docstring.

    The counters are plain attributes, safe to read from another thread.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Topics,
        dsn: str | None = None,
        *,
        group_id: str = DEFAULT_GROUP,
        batch_max: int = DEFAULT_BATCH_MAX,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        shutdown_timeout_s: float = 30.0,
        rebalance_poll_s: float = DEFAULT_REBALANCE_POLL_S,
        stuck_rebalance_s: float | None = None,
        span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
        prices: PriceBook | None = None,
        budgets_file: Path | None = None,
        price_missing: bool = True,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`rebalance_poll_s`: how long one poll may wait while the group rebalances.
        `stuck_rebalance_s`: after how long without a stable group membership the
        consumer is replaced; by default the consumer's `max_poll_interval_ms` plus
        its `session_timeout_ms` plus `rebalance_poll_s`, more than a healthy
        rebalance can take. `prices` fixes the price book; without it the sink
        follows the budgets topic's price overrides (`budgets_file` until it has any).
        """
        if batch_max <= 0 or flush_interval_s <= 0 or rebalance_poll_s <= 0:
            raise ValueError("batch_max, flush_interval_s and rebalance_poll_s must be positive")
        if stuck_rebalance_s is not None and stuck_rebalance_s <= rebalance_poll_s:
            raise ValueError("stuck_rebalance_s must be longer than rebalance_poll_s")
        self.kafka = kafka
        self.topics = topics
        self.dsn = dsn
        self.group_id = group_id
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.rebalance_poll_s = rebalance_poll_s
        self.stuck_rebalance_s = stuck_rebalance_s
        self.span_ttl_days = span_ttl_days
        self.prices = prices if prices is not None else default_price_book()
        self.budgets_file = budgets_file
        self._follow_prices = prices is None
        self._budget_feed: BudgetFeed | None = None
        self.price_missing = price_missing
        self.consumer_options = dict(consumer_options or {})
        self.messages = 0
        self.spans_written = 0
        self.signals_written = 0
        self.malformed = 0
        self.insert_failures = 0
        self.commit_failures = 0
        self.commits = 0
        self.consumer_restarts = 0
        self.limits = SpanLimits.from_env()
        #: spans not written because they broke a rule, by reason kind (the stream dead-letters them)
        self.rejected_spans: dict[str, int] = {}
        self.clock_corrected = 0
        self._batch = _Batch()
        # Offsets of rows that are in ClickHouse but not yet committed, per partition.
        self._written: dict[TopicPartition, int] = {}
        self._commit_delay = 0.0
        self._next_commit_at = 0.0
        self._member = GroupMember(
            kafka,
            [topics.spans, topics.signals],
            group_id,
            max_poll_records=batch_max,
            rebalance_poll_s=rebalance_poll_s,
            stuck_rebalance_s=stuck_rebalance_s,
            consumer_options=self.consumer_options,
            on_rebalance=self._after_rebalance,
        )
        self._writer: ClickHouseWriter | None = None

    def counters(self) -> dict[str, int]:
        return {
            "messages": self.messages,
            "spans_written": self.spans_written,
            "signals_written": self.signals_written,
            "malformed": self.malformed,
            "insert_failures": self.insert_failures,
            "commit_failures": self.commit_failures,
            "commits": self.commits,
            "consumer_restarts": self.consumer_restarts,
            "rejected_spans": sum(self.rejected_spans.values()),
            "clock_corrected": self.clock_corrected,
            "native_decode_failures": native_failures.count,
        }

    # --- the loop -----------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Consume until `stop_event` is set, then flush, commit and close."""
        consumer = self._member.start()
        try:
            log.info(
                "sink %s: %s, %s -> %s",
                self.group_id,
                self.topics.spans,
                self.topics.signals,
                redact_dsn(self.dsn or default_dsn()),
            )
            self._follow_price_overrides()
            self._connect_early()
            while not stop_event.is_set():
                try:
                    self._step(consumer, stop_event)
                except ConsumerStuck as exc:
                    consumer = self._restart_consumer(exc)
            deadline = time.monotonic() + self.shutdown_timeout_s
            try:
                self._finish(consumer, deadline)
            except ConsumerStuck as exc:
                log.error("%s; stopping without committing, the next run reads on from the last commit", exc)
        finally:
            self._member.close()
            self._drop_writer()
            if self._budget_feed is not None:
                self._budget_feed.stop()
            log.info("sink stopped: %s", json.dumps(self.counters()))

    def _step(self, consumer: KafkaConsumer, stop_event: threading.Event) -> None:
        for messages in self._member.poll(_POLL_TIMEOUT_S, give_up=stop_event.is_set).values():
            for message in messages:
                self._take(message)
        if self._batch.due(self.batch_max, self.flush_interval_s):
            self._flush(consumer, give_up=stop_event.is_set)
        elif self._written and time.monotonic() >= self._next_commit_at:
            self._commit(consumer)

    def _finish(self, consumer: KafkaConsumer, deadline: float) -> None:
        """On stop: write what is held and commit, retrying the commit until `deadline`."""
        self._flush(consumer, give_up=lambda: time.monotonic() >= deadline)
        while self._written:
            now = time.monotonic()
            if now >= self._next_commit_at or now >= deadline:  # at least one try, even late
                if self._commit(consumer):
                    return
                if now >= deadline:
                    break
            # Keep the group going so a rebalance can finish; what this returns is not
            # taken (so not committed): the next run reads it.
            consumer.pause(*consumer.assignment())
            self._member.poll(_POLL_TIMEOUT_S, until=deadline)
        if self._written:
            log.error(
                "stopping with uncommitted offsets %s: those rows are written and will be read again",
                _offsets(self._written),
            )

    def _restart_consumer(self, reason: Exception) -> KafkaConsumer:
        """Replace a consumer stuck outside the group; the new one reads on from the commits."""
        self.consumer_restarts += 1
        log.error(
            "%s; replacing the consumer (dropping %d held rows and uncommitted offsets %s: "
            "they are read again from the last commit)",
            reason,
            self._batch.rows,
            _offsets(self._written) or "none",
        )
        self._batch = _Batch()
        self._written.clear()
        self._commit_delay = 0.0
        self._next_commit_at = 0.0
        return self._member.restart()

    def _after_rebalance(self, gone: set[TopicPartition], assigned: bool) -> None:
        """After each poll: forget what came from partitions that moved away; retry a failed commit."""
        if gone:
            dropped = self._batch.drop(gone)
            uncommitted = {tp: n for tp, n in self._written.items() if tp in gone}
            for tp in uncommitted:
                del self._written[tp]
            log.info(
                "%s moved away: dropped %d held rows and uncommitted offsets %s (read again by their owner)",
                names(gone),
                dropped,
                _offsets(uncommitted) or "none",
            )
        if assigned:  # a commit that failed during the rebalance can go through now
            self._commit_delay = 0.0
            self._next_commit_at = 0.0

    # --- decoding -------------------------------------------------------------------

    def _take(self, message: Any) -> None:
        tp = TopicPartition(message.topic, message.partition)
        held = max(self._batch.next_offsets.get(tp, 0), self._written.get(tp, 0))
        if message.offset < held:
            return  # read again after a rebalance rewound a partition we kept: we have it
        origin = KafkaOrigin(message.topic, message.partition, message.offset)
        self.messages += 1
        if self._batch.empty:
            self._batch.started = time.monotonic()
        if message.topic == self.topics.spans:
            self._take_spans(message.value, origin, message.timestamp)
        elif message.topic == self.topics.signals:
            self._take_signal(message.value, origin)
        self._batch.next_offsets[tp] = message.offset + 1

    def _take_spans(self, payload: bytes | None, origin: KafkaOrigin, timestamp_ms: int = -1) -> None:
        try:
            decoded = decode_spans(payload or b"", self.limits)
        except Exception as exc:  # any undecodable message: count it, never stall the partition
            self._malformed(origin, exc)
            return
        for rejected in decoded.rejected:
            self.rejected_spans[rejected.kind] = self.rejected_spans.get(rejected.kind, 0) + 1
            log.info(
                "span %d of %s[%d]@%d not written (the stream dead-letters it): %s",
                rejected.index,
                origin.topic,
                origin.partition,
                origin.offset,
                rejected.reason[:500],
            )
        rows = decoded.usages
        if timestamp_ms > 0:
            record_ns, limits = timestamp_ms * 1_000_000, self.limits
            for usage in rows:
                self.clock_corrected += correct_clock(
                    usage, record_ns, limits.clock_ahead_ns, limits.clock_behind_ns
                )
        if self.price_missing:
            self._price(rows)
        self._batch.spans.extend(rows)
        self._batch.span_origins.extend([origin] * len(rows))

    def _take_signal(self, payload: bytes | None, origin: KafkaOrigin) -> None:
        if payload is None:
            return  # a tombstone on the compacted topic: the signal's key was retired
        try:
            signal_ = Signal.from_json(payload)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self._malformed(origin, exc)
            return
        self._batch.signals.append(signal_)
        self._batch.signal_origins.append(origin)

    def _malformed(self, origin: KafkaOrigin, exc: Exception) -> None:
        self.malformed += 1
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning(
            "malformed message on %s[%d] at offset %d, skipped: %s",
            origin.topic,
            origin.partition,
            origin.offset,
            reason,
        )

    def _follow_price_overrides(self) -> None:
        """Price with the overrides the workers price with, and follow their changes."""
        if not self._follow_prices:
            return
        file_config = load_budget_file(self.budgets_file) if self.budgets_file else BudgetConfig()
        try:
            config = initial_config(self.kafka, self.topics.budgets, file_config)
        except Exception as exc:  # Kafka not there yet: the follower below catches up when it is
            log.warning("could not read %s yet (%s); pricing with the budgets file", self.topics.budgets, exc)
            config = file_config
        self.prices = PriceBook.for_config(config)
        self._budget_feed = BudgetFeed(self.kafka, self.topics.budgets, config).start()

    def _price(self, rows: list[SpanUsage]) -> None:
        if self._budget_feed is not None and (update := self._budget_feed.take_update()) is not None:
            self.prices = PriceBook.for_config(update)
            log.info("price overrides changed on %s: %s", self.topics.budgets, sorted(update.prices))
        for usage in rows:
            price_if_unpriced(usage, self.prices)

    # --- writing and committing -------------------------------------------------------

    def _flush(self, consumer: KafkaConsumer, give_up: Callable[[], bool]) -> bool:
        """Insert the batch (retrying with backoff until `give_up()`), then commit its offsets.

        Returns False when it gave up before the rows were in.
        """
        batch = self._batch
        delay = self.retry_initial_s
        paused = False
        try:
            # A rebalance during the retries may take every partition of the batch away.
            while not batch.empty and not self._write(batch):
                if give_up():
                    log.error(
                        "giving up on %d spans and %d signals: not committed, they will be read again",
                        0 if batch.spans_inserted else len(batch.spans),
                        len(batch.signals),
                    )
                    return False
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                self._idle(consumer, delay, give_up)
                delay = min(delay * 2, self.retry_max_s)
        finally:
            if paused:
                consumer.resume(*consumer.paused())
        if not batch.empty:
            log.info(
                "wrote %d spans and %d signals up to %s",
                len(batch.spans),
                len(batch.signals),
                _offsets(batch.next_offsets),
            )
            for tp, offset in batch.next_offsets.items():
                self._written[tp] = max(offset, self._written.get(tp, 0))
        self._batch = _Batch()
        self._commit(consumer)
        return True

    def _write(self, batch: _Batch) -> bool:
        if not batch.signals and (batch.spans_inserted or not batch.spans):
            return True  # only malformed messages or tombstones: nothing to insert
        try:
            writer = self._connected_writer()
            if batch.spans and not batch.spans_inserted:
                self.spans_written += writer.insert_spans(batch.spans, batch.span_origins)
                batch.spans_inserted = True
            if batch.signals:
                self.signals_written += writer.insert_signals(batch.signals, batch.signal_origins)
        except Exception as exc:  # unreachable server, failed insert, busy chDB directory: all retried
            self.insert_failures += 1
            log.warning(
                "ClickHouse insert failed, keeping %d spans and %d signals to retry: %s: %s",
                0 if batch.spans_inserted else len(batch.spans),
                len(batch.signals),
                type(exc).__name__,
                exc,
            )
            self._drop_writer()
            return False
        return True

    def _commit(self, consumer: KafkaConsumer) -> bool:
        """Commit the offsets of the written rows of the partitions this sink still owns.

        On failure the offsets are kept and the commit is retried from the loop, with
        backoff; the rows are in ClickHouse already.
        """
        assigned = consumer.assignment()
        moved = {tp: n for tp, n in self._written.items() if tp not in assigned}
        if moved:
            log.info("not committing %s: no longer assigned here (their owner reads them)", _offsets(moved))
            for tp in moved:
                del self._written[tp]
        if not self._written:
            return True
        offsets = {tp: OffsetAndMetadata(n, "", -1) for tp, n in self._written.items()}
        try:
            consumer.commit(offsets)
        except KafkaError as exc:  # e.g. the group is rebalancing: keep the offsets, commit later
            self.commit_failures += 1
            self._commit_delay = min(max(self._commit_delay * 2, self.retry_initial_s), _COMMIT_RETRY_MAX_S)
            self._next_commit_at = time.monotonic() + self._commit_delay
            log.warning(
                "offset commit of %s failed, retrying in %.1f s while the partitions stay assigned: %s",
                _offsets(self._written),
                self._commit_delay,
                exc,
            )
            return False
        self.commits += 1
        log.info("committed %s", _offsets(self._written))
        self._written.clear()
        self._commit_delay = 0.0
        self._next_commit_at = 0.0
        return True

    def _idle(self, consumer: KafkaConsumer, seconds: float, give_up: Callable[[], bool]) -> None:
        """Wait while paused, polling so the group does not evict us (max.poll.interval.ms).

        A join under way when the wait is over is seen to its end first (see `_poll`).
        """
        until = time.monotonic() + seconds
        while not give_up() and time.monotonic() < until:
            records = self._member.poll(min(_POLL_TIMEOUT_S, until - time.monotonic()), give_up=give_up)
            # A rebalance during the wait hands over unpaused partitions: put their
            # records back for later and pause them too.
            for tp, messages in records.items():
                consumer.seek(tp, messages[0].offset)
            if records:
                consumer.pause(*consumer.assignment())

    def _connect_early(self) -> None:
        """Create the tables and surface a bad DSN at start; failing here is retried later."""
        try:
            self._connected_writer()
        except Exception as exc:  # the first flush retries with backoff
            log.warning("ClickHouse not available yet: %s: %s", type(exc).__name__, exc)

    def _connected_writer(self) -> ClickHouseWriter:
        if self._writer is None:
            client = connect(self.dsn)
            try:
                migrate(client, span_ttl_days=self.span_ttl_days)
            except Exception:
                client.close()
                raise
            self._writer = ClickHouseWriter(client, batch_size=self.batch_max)
        return self._writer

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # closing a broken connection must not hide the real error
                log.debug("closing the ClickHouse client failed: %s", exc)


def run_sink(
    kafka: KafkaSettings,
    topics: Topics,
    dsn: str | None,
    stop_event: threading.Event,
    batch_max: int = DEFAULT_BATCH_MAX,
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
    **options: Any,
) -> SpanSink:
    """Run a `SpanSink` until `stop_event` is set; return it for its counters."""
    sink = SpanSink(kafka, topics, dsn, batch_max=batch_max, flush_interval_s=flush_interval_s, **options)
    sink.run(stop_event)
    return sink
