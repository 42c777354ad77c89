"""KafkaSpanExporter on the real broker: an idempotent producer, and no request too large to land.

The topic here allows 64 KiB messages (`max.message.bytes`, the topic's form of the broker's
`message.max.bytes`). An export of ~300 KiB of spans for one tenant is split into requests
that fit: every span arrives, and is counted sent. The same export with the limit set past
the topic's is refused by the broker, and every span is counted failed, not lost silently.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from burnguard.contracts.attributes import TENANT
from burnguard.contracts.topics import KafkaSettings
from burnguard.deploy.kafka import KafkaBroker
from burnguard.instrumentation.kafka_exporter import KafkaSpanExporter
from kafka import KafkaConsumer, KafkaProducer
from kafka.cluster import ClusterMetadata
from kafka.errors import IllegalStateError, KafkaTimeoutError, TopicAuthorizationFailedError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

TOPIC_LIMIT = 65_536
SPANS = 300


def tenant_spans(count: int, prefix: str = "span", payload_bytes: int = 0) -> list[ReadableSpan]:
    """`count` spans of tenant acme named `{prefix}-{n}`, each with `payload_bytes` of attributes."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    for n in range(count):
        with tracer.start_as_current_span(f"{prefix}-{n}") as span:
            span.set_attribute(TENANT, "acme")
            if payload_bytes:
                span.set_attribute("payload", f"{n:06d}" + "x" * payload_bytes)
    provider.shutdown()
    return list(memory.get_finished_spans())


def big_spans(count: int) -> list[ReadableSpan]:
    """`count` spans of one tenant, each carrying ~1 KiB of attributes."""
    return tenant_spans(count, payload_bytes=1024)


@pytest.fixture
def small_topic(kafka_broker: KafkaBroker) -> Iterator[str]:
    name = f"otlp_spans.small.{time.monotonic_ns()}"
    kafka_broker.create_topic(name, partitions=1, config={"max.message.bytes": str(TOPIC_LIMIT)})
    yield name


def records_on(broker: KafkaBroker, topic: str, spans: int, timeout_s: float = 20) -> list[bytes]:
    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and count_spans(values) < spans:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
    finally:
        consumer.close()
    return values


def span_names(values: list[bytes]) -> list[str]:
    """The names of the spans in these OTLP requests, sorted."""
    return sorted(
        span.name
        for value in values
        for resource in ExportTraceServiceRequest.FromString(value).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    )


def count_spans(values: list[bytes]) -> int:
    return sum(
        len(scope.spans)
        for value in values
        for resource in ExportTraceServiceRequest.FromString(value).resource_spans
        for scope in resource.scope_spans
    )


def connected(exporter: KafkaSpanExporter) -> KafkaSpanExporter:
    exporter.start()
    deadline = time.monotonic() + 20
    while not exporter.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exporter.connected
    return exporter


@pytest.mark.slow
def test_producer_is_idempotent_with_acks_all(kafka_broker: KafkaBroker, small_topic: str) -> None:
    exporter = connected(KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic))
    try:
        producer = exporter._producer
        assert producer is not None
        assert producer.config["enable_idempotence"] is True
        assert producer.config["acks"] == -1
    finally:
        exporter.close()


@pytest.mark.slow
def test_an_export_past_the_message_limit_is_split(kafka_broker: KafkaBroker, small_topic: str) -> None:
    exporter = connected(KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic))
    assert exporter.max_message_bytes == TOPIC_LIMIT  # read from the topic's config
    spans = big_spans(SPANS)
    exporter.export(spans)
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (SPANS, 0, 0)
    values = records_on(kafka_broker, small_topic, SPANS)
    assert count_spans(values) == SPANS
    assert len(values) > 1 and all(len(value) <= TOPIC_LIMIT for value in values)
    names = span_names(values)
    assert names == sorted(f"span-{n}" for n in range(SPANS))  # each once


@pytest.mark.slow
def test_a_limit_set_too_high_is_learned_from_the_refusal(
    kafka_broker: KafkaBroker, small_topic: str
) -> None:
    """Without DescribeConfigs (or with a wrong setting) the broker's refusal lowers the limit."""
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = connected(KafkaSpanExporter(settings, small_topic, max_message_bytes=1_048_576))
    exporter.export(big_spans(SPANS))
    assert exporter.force_flush(20_000)
    exporter.export(big_spans(5))  # after the refusal, on a new producer
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (SPANS + 5, 0, 0)
    assert exporter.max_message_bytes <= TOPIC_LIMIT * 8
    values = records_on(kafka_broker, small_topic, SPANS + 5)
    assert count_spans(values) == SPANS + 5
    assert all(len(value) <= TOPIC_LIMIT for value in values)


@pytest.mark.slow
def test_a_span_too_large_alone_is_counted_failed(kafka_broker: KafkaBroker, small_topic: str) -> None:
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = connected(KafkaSpanExporter(settings, small_topic, max_message_bytes=1_048_576))
    huge = big_spans(1)[0]
    huge = ReadableSpan(
        name="huge",
        context=huge.context,
        attributes={**(huge.attributes or {}), "payload": "y" * (2 * TOPIC_LIMIT)},
        resource=huge.resource,
        start_time=huge.start_time,
        end_time=huge.end_time,
    )
    exporter.export([huge])
    exporter.force_flush(20_000)
    exporter.export(big_spans(5))
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed) == (5, 1)


@pytest.mark.slow
def test_a_slow_first_metadata_answer_loses_no_span(
    kafka_broker: KafkaBroker, small_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's metadata answers arrive after 0.6 s, past the 200 ms an export may block.

    As on a loaded machine over SASL_SSL: the topic's partitions come later than `send` waits for
    them. The export must stay quick (it may be on the app's call path) and lose nothing.
    """
    answer = ClusterMetadata.update_metadata

    def slowly(metadata_cache: ClusterMetadata, response: object) -> object:
        time.sleep(0.6)
        return answer(metadata_cache, response)

    monkeypatch.setattr(ClusterMetadata, "update_metadata", slowly)
    exporter = KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic).start()
    spans = big_spans(20)
    for half in (spans[:10], spans[10:]):
        started = time.monotonic()
        exporter.export(half)
        assert time.monotonic() - started < 0.5
        time.sleep(0.3)
    stats = exporter.close(timeout_s=30)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (20, 0, 0)
    assert count_spans(records_on(kafka_broker, small_topic, 20)) == 20


@pytest.mark.slow
def test_spans_whose_send_timed_out_on_metadata_are_sent_later(
    kafka_broker: KafkaBroker, small_topic: str
) -> None:
    """Metadata lost after connecting (a leader moved, the topic was created again): held, not failed."""
    timeouts = iter([KafkaTimeoutError("Failed to update metadata after 0.2 secs.")])

    def once_without_metadata(producer: KafkaProducer) -> None:
        send = producer.send

        def flaky(*args: object, **kwargs: object) -> object:
            if (error := next(timeouts, None)) is not None:
                raise error
            return send(*args, **kwargs)

        producer.send = flaky  # type: ignore[method-assign]

    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = connected(KafkaSpanExporter(settings, small_topic, on_connect=once_without_metadata))
    exporter.export(big_spans(10))
    assert exporter.force_flush(20_000)
    exporter.export(big_spans(5))
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (15, 0, 0)
    assert count_spans(records_on(kafka_broker, small_topic, 15)) == 15


@pytest.mark.slow
def test_sends_queued_on_a_set_aside_producer_are_delivered_by_close(
    kafka_broker: KafkaBroker, small_topic: str
) -> None:
    """A send queued (lingering) on a producer that is then set aside, and close() comes first.

    The producer stays set aside (its metadata never comes back), so the queued send can only go
    out if `force_flush` flushes it there. Before, close() counted it failed and the connector,
    seeing the exporter closed, closed the producer at once, aborting it: sent 0, failed 15.
    """
    calls = iter(range(1 << 30))

    def second_send_loses_metadata(producer: KafkaProducer) -> None:
        send = producer.send

        def flaky(*args: object, **kwargs: object) -> object:
            if next(calls) == 1:
                producer.partitions_for = lost  # type: ignore[method-assign]
                raise KafkaTimeoutError("Failed to update metadata after 0.2 secs.")
            return send(*args, **kwargs)

        producer.send = flaky  # type: ignore[method-assign]

    def lost(topic: str) -> object:
        raise KafkaTimeoutError(f"Failed to update metadata for {topic}.")

    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = KafkaSpanExporter(
        settings, small_topic, linger_ms=30_000, on_connect=second_send_loses_metadata
    )
    exporter = connected(exporter)
    exporter.export(big_spans(10))  # queued, lingering for 30 s: only a flush sends it in time
    exporter.export(big_spans(5))  # its send times out: the producer is set aside, the spans held
    assert exporter._producer is None and exporter.stats.spans_in_flight == 10
    stats = exporter.close(timeout_s=3)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (10, 5, 0)
    assert count_spans(records_on(kafka_broker, small_topic, 10)) == 10


def without_metadata(producer: KafkaProducer) -> None:
    """From now on the producer never learns the topic's partitions (each wait ends in a timeout)."""

    def never(topic: str, max_wait_ms: float) -> object:
        time.sleep(max_wait_ms / 1000)
        raise KafkaTimeoutError(f"Failed to update metadata after {max_wait_ms / 1000:.1f} secs.")

    producer._wait_on_metadata = never  # type: ignore[method-assign]


@pytest.mark.slow
def test_an_export_racing_close_is_counted(kafka_broker: KafkaBroker, small_topic: str) -> None:
    """An export that passed the closed check just before `close()` took the send lock.

    It then found no producer and held its spans in a buffer `close()` had already counted
    and cleared: they were neither sent, failed nor dropped.
    """
    exporter = connected(KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic))
    exporter._send_lock.acquire()  # as if close() held it: the export waits past its closed check
    racing = threading.Thread(target=exporter.export, args=(big_spans(10),))
    racing.start()
    time.sleep(0.3)
    stats = exporter.close(timeout_s=5)  # the lock is reentrant: close runs in this thread
    exporter._send_lock.release()
    racing.join(5)
    assert (stats.spans_sent, stats.spans_failed + stats.spans_dropped) == (0, 10)
    assert (stats.spans_pending, len(exporter._pending)) == (0, 0)


@pytest.mark.slow
def test_close_while_waiting_for_metadata_returns_and_counts_held_spans(
    kafka_broker: KafkaBroker, small_topic: str
) -> None:
    """The topic's partitions never come: close() keeps its bound and counts every held span failed."""
    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = KafkaSpanExporter(settings, small_topic, on_connect=without_metadata).start()
    exporter.export(big_spans(10))
    time.sleep(1)  # connected, waiting for the partitions
    exporter.export(big_spans(5))
    started = time.monotonic()
    stats = exporter.close(timeout_s=1)
    assert time.monotonic() - started < 2
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (0, 15, 0)


@pytest.mark.slow
def test_an_unauthorized_topic_fails_each_span(kafka_broker: KafkaBroker, small_topic: str) -> None:
    """partitions_for raising TopicAuthorizationFailedError: every span is counted failed, none held."""

    def unauthorized(producer: KafkaProducer) -> None:
        def refuse(topic: str, max_wait_ms: float) -> object:
            raise TopicAuthorizationFailedError({topic})

        producer._metadata.partitions_for_topic = lambda topic: None  # type: ignore[method-assign]
        producer._wait_on_metadata = refuse  # type: ignore[method-assign]

    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = KafkaSpanExporter(settings, small_topic, on_connect=unauthorized).start()
    exporter.export(big_spans(10))
    time.sleep(1)
    started = time.monotonic()
    exporter.export(big_spans(5))
    assert time.monotonic() - started < 0.2
    stats = exporter.close(timeout_s=5)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (0, 15, 0)


def small_spans(count: int, prefix: str = "span") -> list[ReadableSpan]:
    """`count` small spans of one tenant, cheap to build, named `{prefix}-{n}`."""
    return tenant_spans(count, prefix)


@pytest.mark.slow
def test_an_export_does_not_wait_for_the_backlog_to_be_sent(
    kafka_broker: KafkaBroker, small_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """15,000 spans held while the first metadata answer is slow; exports go on meanwhile.

    When the partitions come, the connector encodes and sends the held spans holding the send
    lock (seconds on a loaded machine): an export waiting on it blocks the app past 200 ms.
    """
    answer = ClusterMetadata.update_metadata

    def slowly(metadata_cache: ClusterMetadata, response: object) -> object:
        time.sleep(0.6)
        return answer(metadata_cache, response)

    monkeypatch.setattr(ClusterMetadata, "update_metadata", slowly)
    backlog, later = small_spans(15_000), small_spans(1, "later")
    exporter = KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic).start()
    exporter.export(backlog)
    slowest, exports, deadline = 0.0, 0, time.monotonic() + 15
    while time.monotonic() < deadline and exporter.stats.spans_sent + exporter.stats.spans_in_flight == 0:
        started = time.monotonic()
        exporter.export(later)
        slowest, exports = max(slowest, time.monotonic() - started), exports + 1
        time.sleep(0.01)
    stats = exporter.close(timeout_s=30)
    assert slowest < 0.5
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (15_000 + exports, 0, 0)
    names = [
        span.name
        for value in records_on(kafka_broker, small_topic, 15_000 + exports)
        for resource in ExportTraceServiceRequest.FromString(value).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert names == [f"span-{n}" for n in range(15_000)] + ["later-0"] * exports  # the tenant's order


@pytest.mark.slow
def test_a_connection_failing_with_another_error_says_so_and_the_next_export_connects(
    kafka_broker: KafkaBroker, small_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not Kafka's while connecting (an unreadable CA file, say) used to end the
    connector thread unseen: every later export held its spans, then dropped them, reporting success."""
    failures = iter([OSError("unreadable CA file")])

    def fails_once(producer: KafkaProducer) -> None:
        if (error := next(failures, None)) is not None:
            producer.close(timeout=0)
            raise error

    settings = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    exporter = KafkaSpanExporter(settings, small_topic, on_connect=fails_once).start()
    exporter.export(big_spans(5))
    deadline = time.monotonic() + 20
    while "the Kafka connection failed (OSError)" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "the Kafka connection failed (OSError)" in caplog.text
    assert "unreadable CA file" not in caplog.text  # the type only: a message may quote settings
    exporter.export(big_spans(5))  # connects again
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (10, 0, 0)
    assert count_spans(records_on(kafka_broker, small_topic, 10)) == 10


@pytest.mark.slow
def test_a_span_otlp_cannot_encode_fails_alone_and_the_others_are_sent(
    kafka_broker: KafkaBroker, small_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A span OTLP cannot carry (here a hand-built `ReadableSpan` timed in float seconds) makes
    `encode_spans` raise: that span is counted failed, its name and the error's type logged; the
    spans beside it, of its tenant and of another, are sent."""
    good = tenant_spans(4, prefix="good")
    template = good[0]
    unencodable = ReadableSpan(
        name="unencodable",
        context=template.context,
        attributes={TENANT: "acme"},
        resource=template.resource,
        start_time=1.5,
        end_time=2.5,
    )
    other_tenant = ReadableSpan(
        name="other-tenant",
        context=template.context,
        attributes={TENANT: "globex"},
        resource=template.resource,
        start_time=template.start_time,
        end_time=template.end_time,
    )
    exporter = connected(KafkaSpanExporter(KafkaSettings(bootstrap=kafka_broker.bootstrap), small_topic))
    with caplog.at_level("WARNING", logger="burnguard.instrumentation.kafka_exporter"):
        exporter.export([good[0], good[1], unencodable, good[2], other_tenant, good[3]])
    stats = exporter.close(timeout_s=20)
    assert (stats.spans_sent, stats.spans_failed, stats.spans_dropped) == (5, 1, 0)
    values = records_on(kafka_broker, small_topic, 5)
    names = span_names(values)
    assert names == ["good-0", "good-1", "good-2", "good-3", "other-tenant"]
    refusals = [line for line in caplog.messages if "cannot be encoded" in line]
    assert len(refusals) == 1 and "'unencodable'" in refusals[0] and "TypeError" in refusals[0], refusals


def test_sends_failed_by_replacing_a_broken_producer_are_sent_again() -> None:
    """`_replace_producer` force-closes the broken producer: its queued sends fail with
    `IllegalStateError` (seen once in CI: 150 spans counted failed). While the exporter is broken
    they go back with the refused spans; a forced close at any other time still counts them failed."""
    exporter = KafkaSpanExporter(KafkaSettings(bootstrap="127.0.0.1:9"), "otlp_spans")
    queued, later = tenant_spans(3), tenant_spans(2)
    exporter._broken = True
    exporter._in_flight[1] = (queued, 1_000)
    exporter._settle(1, IllegalStateError("Producer is closed forcefully."))
    assert exporter._refused == queued and exporter.stats.spans_failed == 0
    exporter._broken = False
    exporter._in_flight[2] = (later, 1_000)
    exporter._settle(2, IllegalStateError("Producer is closed forcefully."))
    assert exporter.stats.spans_failed == 2


class _FlushedProducer:
    """Stands in for a connected producer whose `flush` returns before its sends' callbacks ran."""

    def flush(self, timeout: float | None = None) -> None:
        return None


def test_force_flush_says_false_while_a_send_is_still_unacknowledged_at_its_deadline() -> None:
    """kafka-python runs a send's callback on its I/O thread, possibly after `flush` returned:
    `force_flush` waits for it until its deadline. Before, it then said True with the spans still
    in flight (a caller that exits on True loses them unseen); now it says False."""
    exporter = KafkaSpanExporter(KafkaSettings(bootstrap="127.0.0.1:9"), "otlp_spans")
    exporter._producer = _FlushedProducer()  # type: ignore[assignment]
    exporter._in_flight[1] = (tenant_spans(2), 1_000)
    assert exporter.force_flush(50) is False
    exporter._settle(1, None)
    assert exporter.force_flush(50) is True
    assert exporter.stats.spans_sent == 2
