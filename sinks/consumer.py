"""The ClickHouse sink: `otlp_spans` and `burnguard.signals` from Kafka into ClickHouse.

Delivery is at least once and totals are exactly once. The sink buffers what
it polls, inserts it in batches, and commits the Kafka offsets only after
ClickHouse has the rows; a sink that dies in between re-reads the batch, and
the ReplacingMergeTree tables collapse the second copy (queries use FINAL).

Nothing is dropped and nothing stalls the stream:

- A message that is not a decodable OTLP request (or signal) is counted in
  `malformed`, logged with its topic, partition and offset, and passed over;
  the stream job, which reads the same topic, sends it to the dead-letter
  topic. Its offset is committed with the batch.
- When ClickHouse is unreachable or an insert fails, the batch is kept, the
  failure counted in `insert_failures`, and the insert retried with
  exponential backoff. Meanwhile the partitions are paused and the consumer
  keeps polling, so it stays in its group without reading further; nothing
  is committed until the rows are in.
- On stop (SIGTERM, SIGINT or `stop_event`) the sink flushes what it holds
  and commits; if ClickHouse stays down past `shutdown_timeout_s` it exits
  without committing, and the next run reads those messages again.

Spans that arrive without `burnguard.cost.usd` (e.g. from the OTel Collector)
are priced with the same `PriceBook` as the stream job, so spend in
ClickHouse matches what the budgets saw; models without a known price stay
unpriced (`priced = 0`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.pricing import PriceBook, default_price_book, price_if_unpriced
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import ClickHouseWriter, KafkaOrigin, connect, default_dsn, redact_dsn
from burnguard.sinks.schema import DEFAULT_SPAN_TTL_DAYS, migrate
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

DEFAULT_GROUP = "burnguard-sink"
DEFAULT_BATCH_MAX = 10_000
DEFAULT_FLUSH_INTERVAL_S = 1.0
_POLL_TIMEOUT_S = 0.2


@dataclass
class _Batch:
    """What was polled since the last commit: rows to insert and offsets to commit after."""

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


class _LogAssignments(ConsumerRebalanceListener):
    """Logs partition moves. kafka-python 3 runs listeners on its IO thread, where a
    blocking call (an insert, a commit) is not allowed, so rows held by the sink during
    a rebalance are simply written later; the new owner's copies collapse (FINAL).
    """

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("revoked %s", _names(revoked) or "nothing")

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("assigned %s", _names(assigned) or "nothing")


def _names(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions))


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
        span_ttl_days: int = DEFAULT_SPAN_TTL_DAYS,
        prices: PriceBook | None = None,
        price_missing: bool = True,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_max <= 0 or flush_interval_s <= 0:
            raise ValueError("batch_max and flush_interval_s must be positive")
        self.kafka = kafka
        self.topics = topics
        self.dsn = dsn
        self.group_id = group_id
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.span_ttl_days = span_ttl_days
        self.prices = prices if prices is not None else default_price_book()
        self.price_missing = price_missing
        self.consumer_options = dict(consumer_options or {})
        self.messages = 0
        self.spans_written = 0
        self.signals_written = 0
        self.malformed = 0
        self.insert_failures = 0
        self.commit_failures = 0
        self.commits = 0
        self._batch = _Batch()
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
        }

    # --- the loop -----------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Consume until `stop_event` is set, then flush, commit and close."""
        consumer = self._new_consumer()
        try:
            topics = [self.topics.spans, self.topics.signals]
            # Know the partitions before joining: otherwise the first JoinGroup assigns
            # nothing and a second rebalance follows at once (kafka-python 3.0.12 was
            # seen to hang in that second rebalance).
            for topic in topics:
                consumer.partitions_for_topic(topic)
            consumer.subscribe(topics, listener=_LogAssignments())
            log.info(
                "sink %s: %s, %s -> %s",
                self.group_id,
                self.topics.spans,
                self.topics.signals,
                redact_dsn(self.dsn or default_dsn()),
            )
            self._connect_early()
            while not stop_event.is_set():
                self._poll(consumer)
                if self._batch.due(self.batch_max, self.flush_interval_s):
                    self._flush(consumer, give_up=stop_event.is_set)
            deadline = time.monotonic() + self.shutdown_timeout_s
            self._flush(consumer, give_up=lambda: time.monotonic() >= deadline)
        finally:
            consumer.close(autocommit=False)
            self._drop_writer()
            log.info("sink stopped: %s", json.dumps(self.counters()))

    def _new_consumer(self) -> KafkaConsumer:
        options: dict[str, Any] = {
            **self.kafka.kafka_python_config(),
            "group_id": self.group_id,
            "client_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.batch_max,
            **self.consumer_options,
        }
        return KafkaConsumer(**options)

    def _poll(self, consumer: KafkaConsumer) -> None:
        records = consumer.poll(timeout_ms=int(_POLL_TIMEOUT_S * 1000), max_records=self.batch_max)
        for messages in records.values():
            for message in messages:
                self._take(message)

    # --- decoding -------------------------------------------------------------------

    def _take(self, message: Any) -> None:
        origin = KafkaOrigin(message.topic, message.partition, message.offset)
        self.messages += 1
        if self._batch.empty:
            self._batch.started = time.monotonic()
        if message.topic == self.topics.spans:
            self._take_spans(message.value, origin)
        elif message.topic == self.topics.signals:
            self._take_signal(message.value, origin)
        self._batch.next_offsets[TopicPartition(message.topic, message.partition)] = message.offset + 1

    def _take_spans(self, payload: bytes | None, origin: KafkaOrigin) -> None:
        try:
            rows = decode_usage(payload or b"")
        except Exception as exc:  # any undecodable message: count it, never stall the partition
            self._malformed(origin, exc)
            return
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

    def _price(self, rows: list[SpanUsage]) -> None:
        for usage in rows:
            price_if_unpriced(usage, self.prices)

    # --- writing and committing -------------------------------------------------------

    def _flush(self, consumer: KafkaConsumer, give_up: Callable[[], bool]) -> bool:
        """Insert the batch (retrying with backoff until `give_up()`), then commit its offsets."""
        batch = self._batch
        if batch.empty:
            return True
        delay = self.retry_initial_s
        paused = False
        try:
            while not self._write(batch):
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
        self._commit(consumer, batch)
        return True

    def _write(self, batch: _Batch) -> bool:
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

    def _commit(self, consumer: KafkaConsumer, batch: _Batch) -> None:
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in batch.next_offsets.items()}
        try:
            consumer.commit(offsets)
            self.commits += 1
            log.info(
                "wrote %d spans and %d signals, committed %s",
                len(batch.spans),
                len(batch.signals),
                ", ".join(f"{tp.topic}[{tp.partition}]@{n}" for tp, n in sorted(batch.next_offsets.items())),
            )
        except KafkaError as exc:  # e.g. the group rebalanced: the rows are in, a re-read collapses
            self.commit_failures += 1
            log.warning("offset commit failed after the rows were written (they may be read again): %s", exc)
        self._batch = _Batch()

    def _idle(self, consumer: KafkaConsumer, seconds: float, give_up: Callable[[], bool]) -> None:
        """Wait while paused, polling so the group does not evict us (max.poll.interval.ms)."""
        until = time.monotonic() + seconds
        while not give_up() and time.monotonic() < until:
            timeout = min(_POLL_TIMEOUT_S, max(until - time.monotonic(), 0.0))
            records = consumer.poll(timeout_ms=int(timeout * 1000))
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


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m burnguard.sinks",
        description="Write GenAI spans and budget signals from Kafka to ClickHouse.",
    )
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap (BURNGUARD_KAFKA_BOOTSTRAP)")
    parser.add_argument("--dsn", default=None, help="ClickHouse DSN (BURNGUARD_CLICKHOUSE_DSN)")
    parser.add_argument(
        "--group", default=env.get("BURNGUARD_SINK_GROUP", DEFAULT_GROUP), help="(BURNGUARD_SINK_GROUP)"
    )
    parser.add_argument(
        "--batch-max", type=int, default=int(env.get("BURNGUARD_SINK_BATCH_MAX", DEFAULT_BATCH_MAX))
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=float(env.get("BURNGUARD_SINK_FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL_S)),
        help="seconds a partial batch waits before it is written",
    )
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=None,
        help="Kafka group session timeout: how soon a dead sink's partitions move on",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] = ()) -> int:
    """Entry point of `python -m burnguard.sinks` and `burnguard sink`.

    Configured from the environment; `argv` (the module's command line) may
    override it. The default is no arguments, not `sys.argv`, because the
    `burnguard` CLI calls this with its own command line still in `sys.argv`.
    """
    args = _parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("BURNGUARD_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop_event = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s, flushing and stopping", signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    consumer_options = {}
    if args.session_timeout_ms:
        consumer_options["session_timeout_ms"] = args.session_timeout_ms
        consumer_options["heartbeat_interval_ms"] = max(args.session_timeout_ms // 3, 100)
    kafka = KafkaSettings.from_env(args.bootstrap)
    try:
        run_sink(
            kafka,
            Topics.from_env(),
            args.dsn,
            stop_event,
            batch_max=args.batch_max,
            flush_interval_s=args.flush_interval,
            group_id=args.group,
            consumer_options=consumer_options,
        )
    except KafkaError as exc:  # e.g. no broker at start: say so in one line, exit for a restart
        log.error("cannot consume from Kafka at %s: %s", kafka.bootstrap, exc)
        return 2
    return 0
