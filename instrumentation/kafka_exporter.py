"""A span exporter that writes OTLP protobuf to Kafka, like the Collector's kafkaexporter.

Each export writes one `ExportTraceServiceRequest` per tenant in the batch,
keyed by the tenant, so the stream job receives whole batches and a tenant's
spans stay in one partition. The app never waits on Kafka: the exporter runs
in the batch processor's thread, `KafkaProducer.send` only appends to the
producer's buffer (`max_block_ms` bounds the wait when that buffer is full),
and every span that cannot be handed over is counted in `stats`, not lost
silently.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from burnguard.contracts.attributes import TENANT
from burnguard.contracts.topics import KafkaSettings, Topics
from kafka import KafkaProducer
from kafka.errors import KafkaError
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)


@dataclass
class ExportStats:
    """Counters of what happened to the spans handed to the exporter."""

    spans_sent: int = 0
    spans_failed: int = 0  # the broker refused or never acknowledged them
    spans_dropped: int = 0  # the queue in front of the exporter was full
    messages_sent: int = 0


class KafkaSpanExporter(SpanExporter):
    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        topic: str | None = None,
        *,
        producer: KafkaProducer | None = None,
        max_block_ms: int = 200,
        linger_ms: int = 5,
    ) -> None:
        self._kafka = kafka or KafkaSettings.from_env()
        self._topic = topic or Topics.from_env().spans
        self._producer = producer
        self._producer_config: dict[str, Any] = {
            **self._kafka.kafka_python_config(),
            "acks": 1,
            "linger_ms": linger_ms,
            "max_block_ms": max_block_ms,
            "retries": 5,
        }
        self._lock = threading.Lock()
        self.stats = ExportStats()

    def _get_producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**self._producer_config)
        return self._producer

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            producer = self._get_producer()
        except KafkaError as exc:
            logger.warning("burnguard: Kafka unreachable, %d spans not exported: %s", len(spans), exc)
            self._add(spans_failed=len(spans))
            return SpanExportResult.FAILURE
        result = SpanExportResult.SUCCESS
        for tenant, group in _by_tenant(spans).items():
            payload = encode_spans(group).SerializeToString()
            key = tenant.encode() if tenant else None
            try:
                future = producer.send(self._topic, key=key, value=payload)
            except KafkaError as exc:
                logger.warning("burnguard: could not queue %d spans for Kafka: %s", len(group), exc)
                self._add(spans_failed=len(group))
                result = SpanExportResult.FAILURE
                continue
            count = len(group)
            future.add_callback(lambda _meta, n=count: self._add(spans_sent=n, messages_sent=1))
            future.add_errback(lambda exc, n=count: self._on_send_error(exc, n))
        return result

    def _on_send_error(self, exc: BaseException, count: int) -> None:
        logger.warning("burnguard: Kafka did not acknowledge %d spans: %s", count, exc)
        self._add(spans_failed=count)

    def _add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def count_dropped(self, count: int = 1) -> None:
        self._add(spans_dropped=count)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._producer is None:
            return True
        try:
            self._producer.flush(timeout=timeout_millis / 1000)
        except KafkaError as exc:
            logger.warning("burnguard: Kafka flush failed: %s", exc)
            return False
        return True

    def shutdown(self) -> None:
        if self._producer is not None:
            self.force_flush()
            self._producer.close(timeout=5)
            self._producer = None


def _by_tenant(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    groups: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        tenant = (span.attributes or {}).get(TENANT, "")
        groups[str(tenant)].append(span)
    return groups


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A `BatchSpanProcessor` that counts the spans its full queue drops.

    The SDK drops the oldest span when its bounded queue is full and only logs
    it; burnguard's accounting has to know, so the drop is counted on the
    exporter's stats before the span is handed over.
    """

    def __init__(self, exporter: KafkaSpanExporter, **kwargs: Any) -> None:
        super().__init__(exporter, **kwargs)
        self._exporter = exporter
        self._max_queue = kwargs.get("max_queue_size") or BatchSpanProcessor._default_max_queue_size()

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(self._batch_processor, "_queue", None)
        if queue is not None and len(queue) >= self._max_queue:
            self._exporter.count_dropped()
        super().on_end(span)
