"""What the export processor costs the worker and gives the enforcement latency, per app call rate.

An app ends one span per call at `rate` calls/s (evenly spaced, with a little jitter) for
`--seconds`; a counting exporter notes each export. Per processor and rate: exports per second
(the worker pays per OTLP message: BENCHMARKS.md, ~31 µs/span at 10-20 spans per message against
~16 at 40-260), spans per export, and the wait from a span's end to its export (median and p99).
`sdk` is OpenTelemetry's `BatchSpanProcessor` (a fixed timer), `paced` burnguard's
`PacedBatchSpanProcessor` (instrumentation/paced_export.py), both at the same delay.

    .venv/bin/python bench/export_pacing.py [--delay-ms 100] [--seconds 3] [--rates 2,8,20,100,1000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from collections.abc import Sequence

from burnguard.instrumentation.paced_export import PacedBatchSpanProcessor
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class CountingExporter(SpanExporter):
    """Each export's size, and each span's wait from its end to its export (ms)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.waits_ms: list[float] = []
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        now = time.time_ns()
        with self.lock:
            self.sizes.append(len(spans))
            self.waits_ms.extend((now - span.end_time) / 1e6 for span in spans if span.end_time)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def run(kind: str, rate: float, seconds: float, delay_ms: float) -> str:
    exporter = CountingExporter()
    processor: SpanProcessor
    if kind == "sdk":
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms)
    else:
        processor = PacedBatchSpanProcessor(exporter, schedule_delay_millis=delay_ms)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("bench")
    jitter = random.Random(7)
    started = next_at = time.monotonic()
    while time.monotonic() - started < seconds:
        tracer.start_span("call").end()
        next_at += jitter.uniform(0.8, 1.2) / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    time.sleep(2 * delay_ms / 1000)  # the last spans' export, before the shutdown's flush
    provider.shutdown()
    waits = sorted(exporter.waits_ms)
    spans = sum(exporter.sizes)
    return (
        f"{kind:5} {rate:>6g} calls/s: {len(exporter.sizes) / seconds:6.1f} exports/s, "
        f"{spans / max(1, len(exporter.sizes)):6.1f} spans/export, wait median "
        f"{statistics.median(waits):5.1f} ms, p99 {waits[int(0.99 * (len(waits) - 1))]:5.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rates", default="2,8,20,100,1000")
    args = parser.parse_args()
    for rate in (float(r) for r in args.rates.split(",")):
        for kind in ("sdk", "paced"):
            print(run(kind, rate, args.seconds, args.delay_ms), flush=True)


if __name__ == "__main__":
    main()
