"""A span exporter that writes OTLP protobuf to Kafka, like the Collector's kafkaexporter.

Each export writes one `ExportTraceServiceRequest` per tenant in the batch,
keyed by the tenant, so the stream job receives whole batches and a tenant's
spans stay in one partition. A request larger than the topic's
`max.message.bytes` is split into several, never refused by the broker.

The app never waits on Kafka. The producer (idempotent, `acks=all`, where the
broker supports it) is created on a background thread, because creating one
waits for the broker, and it is used only once it knows the topic's partitions
(the first metadata answer may take longer than an export may block, e.g. over
SASL_SSL on a loaded machine); until then, exported spans wait in a bounded
buffer. `KafkaProducer.send` then only appends to the producer's buffer; if
it times out (`max_block_ms`) because the topic's metadata went missing, the
spans go back to that buffer and the background thread waits for the metadata
again; a large held backlog is encoded off the send lock, so an export meanwhile only holds its
spans. `close()` delivers what it can within its bound and counts the rest:
every span is in `stats` as sent, failed or dropped, never lost silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from burnguard.contracts.attributes import TENANT
from burnguard.contracts.topics import KafkaSettings, Topics
from kafka import KafkaProducer
from kafka.errors import IllegalStateError, KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)

#: Kafka's default `message.max.bytes` is 1,048,588; the producer's `max_request_size` 1,048,576.
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
#: Room for the record batch header, the record header and the key inside the broker's limit.
MESSAGE_OVERHEAD_BYTES = 1024
DEFAULT_MAX_PENDING_SPANS = 20_000
DEFAULT_CLOSE_TIMEOUT_S = 5.0
#: Below this, a refused message is not split further: its spans are counted failed.
MIN_MESSAGE_BYTES = 16_384
#: Between two waits (each `max_block_ms`) for the topic's metadata: its request stays in flight.
METADATA_RETRY_S = 0.05
#: A larger held backlog is encoded without the send lock (20,000 spans take seconds when loaded).
DRAIN_UNDER_LOCK_SPANS = 500


@dataclass
class ExportStats:
    """Counters of what happened to the spans handed to the exporter."""

    spans_sent: int = 0
    spans_failed: int = 0  # the broker refused them, never acknowledged them, or was unreachable at close
    spans_dropped: int = 0  # a queue in front of the producer was full
    messages_sent: int = 0
    spans_in_flight: int = 0  # handed to the producer, not yet acknowledged
    spans_pending: int = 0  # waiting for the producer to connect

    @property
    def undelivered(self) -> int:
        """Spans that did not reach Kafka (failed or dropped)."""
        return self.spans_failed + self.spans_dropped


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    number = int(value)
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return number


class KafkaSpanExporter(SpanExporter):
    """Writes spans to the spans topic; see the module docstring for the delivery guarantees."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        topic: str | None = None,
        *,
        producer: KafkaProducer | None = None,
        max_block_ms: int = 200,
        linger_ms: int = 5,
        max_message_bytes: int | None = None,
        max_pending_spans: int | None = None,
        connect_timeout_ms: int = 5000,
        on_connect: Callable[[KafkaProducer], None] | None = None,
    ) -> None:
        self._kafka = kafka or KafkaSettings.from_env()
        self._topic = topic or Topics.from_env().spans
        self._producer = producer
        # No `acks` or `retries`: kafka-python's defaults make the producer idempotent with
        # acks=all where the broker supports it (>= 0.11), so a retry never writes a batch twice.
        self._producer_config: dict[str, Any] = {
            **self._kafka.kafka_python_config(),
            "linger_ms": linger_ms,
            "max_block_ms": max_block_ms,
            "bootstrap_timeout_ms": connect_timeout_ms,
        }
        configured = max_message_bytes or _env_int("BURNGUARD_KAFKA_MAX_MESSAGE_BYTES", 0) or None
        self._max_message_bytes_fixed = configured is not None
        self.max_message_bytes = configured or DEFAULT_MAX_MESSAGE_BYTES
        self._max_pending = max_pending_spans or _env_int(
            "BURNGUARD_MAX_PENDING_SPANS", DEFAULT_MAX_PENDING_SPANS
        )
        self._on_connect = on_connect
        self._lock = threading.Lock()  # the counters and the in-flight sends
        self._send_lock = threading.RLock()  # one sender at a time: export, the connector, close
        self._pending: deque[ReadableSpan] = deque()
        self._draining: list[ReadableSpan] = []  # held spans the connector is encoding, off the lock
        # send id -> (its spans, payload bytes), until acknowledged or given up
        self._in_flight: dict[int, tuple[list[ReadableSpan], int]] = {}
        self._refused: list[ReadableSpan] = []  # to be sent again on a new producer (split if too large)
        self._broken = False  # the producer failed fatally (after a refused message) or was closed
        self._send_ids = iter(range(1 << 62))
        self._closed = threading.Event()
        self._connector: threading.Thread | None = None
        #: the producer last set aside: its queued sends go on while it waits for the topic again
        self._aside: KafkaProducer | None = None
        self.stats = ExportStats()

    # --- connecting ------------------------------------------------------------------
    def start(self) -> KafkaSpanExporter:
        """Start connecting in the background (once); `export` calls it too."""
        with self._send_lock:
            if self._producer is None and self._connector is None and not self._closed.is_set():
                self._connector = threading.Thread(target=self._connect, name="burnguard-kafka", daemon=True)
                self._connector.start()
        return self

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def _connect(self, producer: KafkaProducer | None = None) -> None:
        """The connector thread: connect and use the producer, or say why it could not.

        A connector that died unseen would leave every later export holding spans (then dropping
        them) while reporting success, so any error ends it loudly, and the next export starts
        another (the held spans wait for it).
        """
        try:
            self._connect_and_use(producer)
        except Exception as exc:  # whatever it is, the app must hear of it and go on
            with self._send_lock:
                if self._connector is threading.current_thread():
                    self._connector = None
            logger.error(
                "burnguard: the Kafka connection failed (%s); holding spans (up to %d), retrying at the "
                "next export",
                type(exc).__name__,  # not the message: a client error may quote its configuration
                self._max_pending,
            )

    def _connect_and_use(self, producer: KafkaProducer | None) -> None:
        """Create the producer (or take back one set aside), then use it once it knows the topic.

        Retries until then or until the exporter is closed; the spans wait in the bounded buffer.
        """
        backoff, warned = 0.5, False
        while producer is None and not self._closed.is_set():
            try:
                producer = self._new_producer()
            except KafkaError as exc:
                if not warned:
                    logger.warning(
                        "burnguard: Kafka unreachable at %s (%s); holding spans (up to %d) and retrying",
                        self._kafka.bootstrap,
                        type(exc).__name__,
                        self._max_pending,
                    )
                    warned = True
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        if producer is not None:
            try:
                self._await_partitions(producer)
            except Exception:
                with contextlib.suppress(Exception):
                    producer.close(timeout=0)
                raise
            self._use(producer)

    def _new_producer(self) -> KafkaProducer:
        self._learn_max_message_bytes()
        producer = KafkaProducer(**self._producer_config)
        if self._on_connect is not None:
            # at once: kafka-python has just registered an exit handler closing it
            self._on_connect(producer)
        return producer

    def _await_partitions(self, producer: KafkaProducer) -> None:
        """Wait, off the export path, until the producer knows the topic's partitions.

        `send` waits only `max_block_ms` for them, so a first metadata answer slower than that
        (SASL_SSL on a loaded machine) would fail the spans; here the wait is as long as it takes.
        Any other error (not authorized, say) is left to `send`, which reports it per span.
        """
        warn_at = time.monotonic() + self._producer_config["bootstrap_timeout_ms"] / 1000
        while not self._closed.is_set():
            try:
                producer.partitions_for(self._topic)
                return
            except KafkaTimeoutError:
                if warn_at and time.monotonic() > warn_at:
                    logger.warning(
                        "burnguard: no metadata yet for topic %s; holding spans (up to %d) and waiting",
                        self._topic,
                        self._max_pending,
                    )
                    warn_at = 0.0
            except KafkaError:
                return
            self._closed.wait(METADATA_RETRY_S)

    def _use(self, producer: KafkaProducer) -> None:
        """Send through `producer` from now on, starting with the spans held for it.

        A large backlog is encoded without the send lock, so exports meanwhile only hold
        their spans (behind it: a tenant's order is kept) instead of waiting seconds for it.
        """
        while True:
            with self._send_lock:
                if self._closed.is_set():  # close() counted what was held or being encoded
                    with contextlib.suppress(KafkaError):
                        producer.close(timeout=0)
                    return
                self._aside = None  # taken back: its queued sends are flushed as the current producer's
                if len(self._pending) <= DRAIN_UNDER_LOCK_SPANS:
                    self._producer = producer
                    self._send_pending()
                    return
                self._draining = list(self._pending)
                self._pending.clear()
            requests = _requests(self._draining, self.max_message_bytes - MESSAGE_OVERHEAD_BYTES)
            if not self._send_drained(producer, requests):
                return

    def _send_drained(self, producer: KafkaProducer, requests: list[_Request]) -> bool:
        """Send an encoded backlog, then hold what came meanwhile; whether to go on draining."""
        with self._send_lock:
            if self._closed.is_set():
                return True  # the loop closes the producer
            self._draining = []
            newer = list(self._pending)
            self._pending.clear()
            self._producer = producer
            for key, payload, part in requests:
                self._send_one(key, payload, part)
            set_aside = self._producer is not producer  # a new connector owns it now
            if not set_aside:
                self._producer = None
            self._hold(newer)
            return not set_aside

    def _set_aside(self, producer: KafkaProducer) -> None:
        """Stop sending through `producer` until it knows the topic's partitions again.

        Called with `_send_lock` held; its sends already queued go on in its own thread, and
        `force_flush` waits for them there.
        """
        self._producer = None
        self._aside = producer
        self._connector = threading.Thread(
            target=self._connect, args=(producer,), name="burnguard-kafka", daemon=True
        )
        self._connector.start()

    def _learn_max_message_bytes(self) -> None:
        """Read the topic's effective `max.message.bytes` (best effort; needs DescribeConfigs)."""
        if self._max_message_bytes_fixed:
            return
        from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

        try:
            admin = KafkaAdminClient(**self._kafka.kafka_python_config(), bootstrap_timeout_ms=2000)
        except KafkaError:
            return  # unreachable: the producer will say so
        self._max_message_bytes_fixed = True  # asked once: a replaced producer keeps the answer
        try:
            described = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, self._topic, ["max.message.bytes"])],
                config_filter="all",  # the broker's default too, not only a topic override
            )
            limit = int(described["topic"][self._topic]["max.message.bytes"]["value"])
        except (KafkaError, ValueError, TypeError, KeyError) as exc:
            logger.debug("burnguard: could not read max.message.bytes of %s: %s", self._topic, exc)
            limit = None
        finally:
            admin.close()
        if limit:
            self.max_message_bytes = min(limit, DEFAULT_MAX_MESSAGE_BYTES)

    # --- exporting ---------------------------------------------------------------------
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._send_lock:  # close() counts the held spans under it: check closed after it
            if self._closed.is_set():
                self._add(spans_failed=len(spans))
                return SpanExportResult.FAILURE
            if self._broken and self._producer is not None:
                self._replace_producer()
            if self._producer is None:
                self.start()
                self._hold(spans)
                return SpanExportResult.SUCCESS
            self._send_pending()
            return self._send(spans)

    def _replace_producer(self) -> None:
        """Close a producer that failed fatally and connect a new one; refused spans wait for it.

        kafka-python's idempotent producer fails every later send once the broker refused a
        message as too large, so the producer is replaced, and the refused spans are sent
        again in smaller requests under the lowered limit.
        """
        producer, self._producer = self._producer, None
        self._connector = None
        if producer is not None:
            _close_within(producer, time.monotonic())
        with self._lock:
            refused, self._refused = self._refused, []
            self._broken = False
        self._hold(refused)
        self.start()

    def _hold(self, spans: Sequence[ReadableSpan]) -> None:
        """Keep spans until the producer connects; past `max_pending_spans` the oldest are dropped."""
        room = max(0, self._max_pending - len(self._draining))
        overflow = max(0, len(self._pending) + len(spans) - room)
        for _ in range(min(overflow, len(self._pending))):
            self._pending.popleft()
        self._pending.extend(spans[max(0, len(spans) - room) :])
        if overflow:
            logger.warning("burnguard: Kafka still unreachable; dropped %d held spans", overflow)
        self._add(spans_dropped=overflow)
        self.stats.spans_pending = len(self._pending) + len(self._draining)

    def _send_pending(self) -> None:
        if self._pending:
            held = list(self._pending)
            self._pending.clear()
            self.stats.spans_pending = 0
            self._send(held)

    def _send(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.SUCCESS
        for key, payload, part in _requests(spans, self.max_message_bytes - MESSAGE_OVERHEAD_BYTES):
            if isinstance(payload, Exception):
                self._refuse_unencodable(part[0], payload)
                result = SpanExportResult.FAILURE
            elif not self._send_one(key, payload, part):
                result = SpanExportResult.FAILURE
        return result

    def _refuse_unencodable(self, span: ReadableSpan, error: Exception) -> None:
        """A span OTLP cannot carry fails alone: its name and the error's type, not its values."""
        logger.warning(
            "burnguard: span %r cannot be encoded as OTLP (%s); not sent", span.name, type(error).__name__
        )
        self._add(spans_failed=1)

    def _send_one(self, key: bytes | None, payload: bytes, spans: list[ReadableSpan]) -> bool:
        producer = self._producer
        if producer is None:  # set aside by an earlier part of this export
            self._hold(spans)
            return True
        try:
            future = producer.send(self._topic, key=key, value=payload)
        except KafkaTimeoutError:  # the topic's metadata went missing: hold, wait for it off this path
            logger.info("burnguard: no metadata for %s within max_block_ms; holding spans", self._topic)
            self._set_aside(producer)
            self._hold(spans)
            return True
        except IllegalStateError:  # closed under us (kafka-python's exit handler): use a new one
            with self._lock:
                self._broken = True
                self._refused.extend(spans)
            return True
        except KafkaError as exc:
            logger.warning("burnguard: could not queue %d spans for Kafka: %s", len(spans), exc)
            self._add(spans_failed=len(spans))
            return False
        send_id = next(self._send_ids)
        with self._lock:
            self._in_flight[send_id] = (spans, len(payload))
            self.stats.spans_in_flight += len(spans)
        future.add_callback(lambda _meta: self._settle(send_id, None))
        future.add_errback(lambda exc: self._settle(send_id, exc))
        return True

    def _settle(self, send_id: int, error: BaseException | None) -> None:
        """Count an acknowledged (or failed) send once; `close()` may have given up on it already."""
        with self._lock:
            sent = self._in_flight.pop(send_id, None)
            if sent is None:
                return
            spans, size = sent
            self.stats.spans_in_flight -= len(spans)
            if error is None:
                self.stats.spans_sent += len(spans)
                self.stats.messages_sent += 1
                return
            if _refused_for_the_producer(error, self._broken) and self._send_again(spans, size):
                self._refused.extend(spans)
                return
            self.stats.spans_failed += len(spans)
        logger.warning("burnguard: Kafka did not acknowledge %d spans: %s", len(spans), error)

    def _send_again(self, spans: list[ReadableSpan], size: int) -> bool:
        """On a refusal for size: whether to send these spans again (split, on a new producer).

        The first refusal marks the producer broken and lowers the limit below the refused
        message (a lone span, or a message already small, cannot be helped: it fails). The
        sends the broken producer then aborts carry the same error but were never too large.
        Called with `_lock` held.
        """
        if self._broken:
            return True
        self._broken = True
        if len(spans) == 1 or size <= MIN_MESSAGE_BYTES:
            return False
        self.max_message_bytes = min(self.max_message_bytes, size)
        logger.warning("burnguard: Kafka refused a %d-byte message; sending smaller requests", size)
        return True

    def _add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def count_dropped(self, count: int = 1) -> None:
        self._add(spans_dropped=count)

    # --- flushing and closing ----------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait up to `timeout_millis` for every span handed over so far to be acknowledged; False
        if one is not by then.

        Spans held for a producer still connecting, or refused as too large, are sent first.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        while True:
            with self._send_lock:  # the connector sends the held spans under it
                if self._broken and self._producer is not None:
                    self._replace_producer()
                producer = self._producer
            if producer is None:  # connecting, or set aside until it knows the topic again
                if not self._pending and not self._draining and not self._in_flight:
                    return True
                if self._in_flight and not self._flush_set_aside(deadline):
                    return False
                if not self._wait_connected(deadline):
                    return False
                continue
            if not self._flushed(producer, deadline):
                return False
            if not self._broken:  # a send still unacknowledged at the deadline is not flushed
                return not self._in_flight

    def _flush_set_aside(self, deadline: float) -> bool:
        """Deliver the sends a set-aside producer still has queued; False if they are not by `deadline`.

        Without it, `close()` counted them failed (and the connector, seeing the exporter closed,
        dropped them) although the producer could still deliver them.
        """
        aside = self._aside
        if aside is None or self._producer is not None:
            return True
        return self._flushed(aside, deadline)

    def _flushed(self, producer: KafkaProducer, deadline: float) -> bool:
        """Flush `producer` and wait for its sends' callbacks; False if the flush raised."""
        try:
            producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError as exc:
            logger.warning("burnguard: Kafka flush did not complete: %s", exc)
            return False
        self._wait_settled(deadline)
        return True

    def _wait_settled(self, deadline: float) -> None:
        """Wait for the callbacks of flushed sends, which may run just after `flush` returns."""
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.005)

    def _wait_connected(self, deadline: float) -> bool:
        while self._producer is None and time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(0.02)
        return self._producer is not None

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> ExportStats:
        """Deliver what can be delivered within `timeout_s`, then count the rest as failed.

        Idempotent; returns the final counters.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        if not self._closed.is_set():
            self.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000))
        with self._send_lock:
            if self._closed.is_set():
                return self.stats
            self._closed.set()
            producer, self._producer = self._producer, None
            unsent = len(self._pending) + len(self._draining)
            self._pending.clear()
            self._draining = []
        if producer is not None:
            _close_within(producer, deadline)
        with self._lock:
            unsent += sum(len(spans) for spans, _ in self._in_flight.values()) + len(self._refused)
            self._in_flight.clear()
            self._refused.clear()
            self.stats.spans_in_flight = 0
            self.stats.spans_pending = 0
            self.stats.spans_failed += unsent
        if unsent:
            logger.warning("burnguard: %d spans could not be delivered to Kafka before close", unsent)
        return self.stats

    def shutdown(self, timeout_millis: float = DEFAULT_CLOSE_TIMEOUT_S * 1000) -> None:
        self.close(timeout_millis / 1000)


def _refused_for_the_producer(error: BaseException, broken: bool) -> bool:
    """Whether a failed send failed for its producer, not its spans: they may go on a new producer.

    A refusal for size breaks the producer (`_send_again`). Replacing it force-closes it, which
    fails the sends still queued with `IllegalStateError` while the exporter is marked broken: those
    spans were never refused, and are sent again as the size-refused ones are.
    """
    return isinstance(error, MessageSizeTooLargeError) or (broken and isinstance(error, IllegalStateError))


def _close_within(producer: KafkaProducer, deadline: float) -> None:
    """Flush until `deadline`, then close the producer at once, failing what is still unsent.

    kafka-python's `close(timeout)` raises when its flush times out and leaves the sender
    running (and `__del__` then flushes again for a second), so the sender is stopped first.
    """
    with contextlib.suppress(KafkaError):
        producer.flush(timeout=max(0.0, deadline - time.monotonic()))
    sender = getattr(producer, "_sender", None)
    accumulator = getattr(producer, "_accumulator", None)
    if sender is not None and accumulator is not None and accumulator.has_incomplete:
        sender.force_close()  # fails the unsent batches: their errbacks count them
        sender.join(0.5)
    with contextlib.suppress(KafkaError):
        producer.close(timeout=0)


#: One OTLP request: its key (the tenant), its bytes and the spans it holds; or, for a span that
#: cannot be encoded, the error in place of the bytes.
_Request = tuple[bytes | None, bytes | Exception, list[ReadableSpan]]


def _requests(spans: Sequence[ReadableSpan], limit: int) -> list[_Request]:
    """The requests holding `spans`, one or more per tenant, each of at most `limit` bytes."""
    return [
        (tenant.encode() if tenant else None, payload, part)
        for tenant, group in _by_tenant(spans).items()
        for payload, part in _payloads(group, limit)
    ]


def _payloads(spans: list[ReadableSpan], limit: int) -> list[tuple[bytes | Exception, list[ReadableSpan]]]:
    """OTLP requests of at most `limit` bytes holding `spans`, split in halves as needed.

    A single span past the limit stays whole (the broker will refuse it and it is counted failed).
    A span `encode_spans` refuses (a hand-built one with float times or an id past its width) is
    found by the same halving and comes back alone with the error: it must not take the spans
    beside it down with it.
    """
    try:
        payload = encode_spans(spans).SerializeToString()
    except Exception as error:  # the encoder raises bare Exception, TypeError, OverflowError...
        if len(spans) == 1:
            return [(error, spans)]
    else:
        if len(payload) <= limit or len(spans) == 1:
            return [(payload, spans)]
    middle = len(spans) // 2
    return _payloads(spans[:middle], limit) + _payloads(spans[middle:], limit)


def _by_tenant(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    groups: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        tenant = (span.attributes or {}).get(TENANT, "")
        groups[str(tenant)].append(span)
    return groups
