"""`PacedBatchSpanProcessor`: an idle app's span is exported at once, a busy app's spans in batches.

The enforcement latency's largest hop was the SDK's export timer (BENCHMARKS.md); these tests
guard the policy that replaced it, and that the app still never blocks and drops stay counted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from burnguard.instrumentation.paced_export import PacedBatchSpanProcessor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class RecordingExporter(SpanExporter):
    """Notes each export's span names and time; `gate`, when cleared, holds exports until set."""

    def __init__(self) -> None:
        self.exports: list[tuple[float, list[str]]] = []
        self.exported = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.shut_down = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.exported:
            self.exports.append((time.monotonic(), [span.name for span in spans]))
            self.exported.notify_all()
        self.gate.wait(10)
        return SpanExportResult.SUCCESS

    def wait_exports(self, count: int, timeout_s: float) -> bool:
        with self.exported:
            return self.exported.wait_for(lambda: len(self.exports) >= count, timeout_s)

    def names(self) -> list[str]:
        return [name for _, names in self.exports for name in names]

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def exporter() -> RecordingExporter:
    return RecordingExporter()


@pytest.fixture
def make_provider(exporter: RecordingExporter) -> Iterator:
    providers: list[TracerProvider] = []

    def make(**options: object) -> tuple[TracerProvider, PacedBatchSpanProcessor]:
        processor = PacedBatchSpanProcessor(exporter, **options)  # type: ignore[arg-type]
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(processor)
        providers.append(provider)
        return provider, processor

    yield make
    exporter.gate.set()
    for provider in providers:
        provider.shutdown()


def end_spans(provider: TracerProvider, *names: str) -> None:
    tracer = provider.get_tracer("test")
    for name in names:
        tracer.start_span(name).end()


def test_an_idle_apps_span_is_exported_at_once_not_after_the_delay(make_provider, exporter) -> None:
    provider, _ = make_provider(schedule_delay_millis=5_000)
    ended = time.monotonic()
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0), "the first span waited for the delay"
    assert exporter.exports[0][0] - ended < 1.0
    assert exporter.names() == ["first"]


def test_an_idle_apps_span_waits_for_the_spans_ending_right_after_it(make_provider, exporter) -> None:
    """A call's spans end one after the other (HTTP request, SDK instrumentation, burnguard's):
    the first span's export waits until none ended for `quiet_millis`, so they go in one message."""
    provider, _ = make_provider(schedule_delay_millis=5_000, quiet_millis=400)
    for name in ("http", "sdk", "call"):  # 250 ms apart: the last past the first's quiet time
        end_spans(provider, name)
        time.sleep(0.25)
    assert exporter.wait_exports(1, timeout_s=2.0), "the idle app's spans waited for the delay"
    assert exporter.names() == ["http", "sdk", "call"]


def test_a_busy_apps_spans_wait_for_the_delay_after_the_last_export_and_go_together(
    make_provider, exporter
) -> None:
    delay_s = 0.4
    provider, _ = make_provider(schedule_delay_millis=delay_s * 1000)
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0)
    end_spans(provider, "a", "b", "c")
    assert not exporter.wait_exports(2, timeout_s=delay_s / 4), "a busy app's span went out before the delay"
    assert exporter.wait_exports(2, timeout_s=5.0)
    (first_at, _), (second_at, names) = exporter.exports
    assert names == ["a", "b", "c"]
    assert second_at - first_at >= delay_s - 0.01


def test_a_full_batch_does_not_wait_for_the_delay(make_provider, exporter) -> None:
    provider, _ = make_provider(schedule_delay_millis=5_000, max_export_batch_size=3, max_queue_size=10)
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0)
    end_spans(provider, "a", "b", "c")
    assert exporter.wait_exports(2, timeout_s=2.0), "a full batch waited for the delay"
    assert exporter.names() == ["first", "a", "b", "c"]


def test_a_full_queue_drops_the_oldest_spans_counted_and_the_app_never_waits(make_provider, exporter) -> None:
    drops: list[int] = []
    provider, _ = make_provider(
        schedule_delay_millis=1, max_queue_size=4, max_export_batch_size=2, on_drop=lambda: drops.append(1)
    )
    exporter.gate.clear()  # the exporter hangs: the queue fills behind it
    end_spans(provider, "held")
    assert exporter.wait_exports(1, timeout_s=2.0)
    started = time.monotonic()
    end_spans(provider, *(f"s{i}" for i in range(7)))
    assert time.monotonic() - started < 0.5, "on_end waited on the exporter"
    assert len(drops) == 3
    exporter.gate.set()
    provider.force_flush()
    assert exporter.names() == ["held", "s3", "s4", "s5", "s6"]


def test_shutdown_exports_what_is_queued_then_ignores_later_spans(make_provider, exporter) -> None:
    provider, processor = make_provider(schedule_delay_millis=60_000)
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0)
    end_spans(provider, "queued")  # it waits for the delay after the first's export
    time.sleep(0.05)
    started = time.monotonic()
    processor.shutdown()
    assert time.monotonic() - started < 0.5, "shutdown waited out its timeout for the export thread"
    end_spans(provider, "late")
    assert exporter.names() == ["first", "queued"]
    assert exporter.shut_down
    assert processor.force_flush() is False


def test_shutdown_of_an_idle_processor_ends_its_thread_at_once(make_provider, exporter) -> None:
    provider, processor = make_provider(schedule_delay_millis=60_000)
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0)
    time.sleep(0.05)  # the export thread is back waiting for a span
    started = time.monotonic()
    processor.shutdown()
    assert time.monotonic() - started < 0.5, "shutdown waited out its timeout for an idle export thread"


def test_a_forked_child_exports_with_a_thread_of_its_own_and_not_the_parents_spans(
    make_provider, exporter
) -> None:
    """A pre-forking server forks after `configure()`: the child has no export thread unless it
    starts one, and the parent's queued spans are the parent's to export."""
    provider, _ = make_provider(schedule_delay_millis=60_000)
    end_spans(provider, "first")
    assert exporter.wait_exports(1, timeout_s=2.0)
    end_spans(provider, "parent's")  # queued for the delay after the first's export
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when its own span, alone, is exported promptly
        end_spans(provider, "child's")
        exported = exporter.wait_exports(2, timeout_s=2.0) and exporter.names()[1:] == ["child's"]
        os._exit(0 if exported else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child did not export its span"
