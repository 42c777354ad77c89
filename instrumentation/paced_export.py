"""A batch span processor that exports an idle app's span at once and a busy app's spans in batches.

The SDK's `BatchSpanProcessor` exports on a fixed timer: every span waits for the next tick, on
average half the delay (burnguard's 100 ms: ~50 ms, the largest hop from a call to its signal,
BENCHMARKS.md). Here the delay is the least time between two exports instead: a span that ends
when the last export is at least a delay old (an app that was idle) is exported as soon as no
other span ended for `DEFAULT_QUIET_MS` (the rest of its call's spans join it); a span that ends
sooner waits until a delay after that export, with every span ending meanwhile. A busy app thus
still exports once per delay, its messages as big as on the SDK's timer (the stream worker pays
per message); only the first span after a quiet stretch stops waiting for the delay.

Like the SDK's processor it never blocks the app: `on_end` appends to a bounded queue and wakes
the export thread; when the queue is full the oldest span is dropped and counted (`on_drop`), and
the `OTEL_BSP_*` variables set what the arguments leave unset.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.context.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)
#: An idle app's span waits until no span ended for this long: a call's spans end together (its
#: HTTP request's, an SDK instrumentation's and burnguard's, innermost first) and go in one message.
DEFAULT_QUIET_MS = 5


class PacedBatchSpanProcessor(SpanProcessor):
    """Spans to `exporter` in batches, at most one export per `schedule_delay_millis` (see module)."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        schedule_delay_millis: float | None = None,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        on_drop: Callable[[], None] | None = None,
        quiet_millis: float = DEFAULT_QUIET_MS,
    ) -> None:
        if schedule_delay_millis is None:
            schedule_delay_millis = BatchSpanProcessor._default_schedule_delay_millis()
        max_queue_size = max_queue_size or BatchSpanProcessor._default_max_queue_size()
        max_export_batch_size = max_export_batch_size or BatchSpanProcessor._default_max_export_batch_size()
        BatchSpanProcessor._validate_arguments(max_queue_size, schedule_delay_millis, max_export_batch_size)
        self.exporter = exporter
        self.schedule_delay_millis = schedule_delay_millis
        self._delay_s = schedule_delay_millis / 1000
        self._quiet_s = min(quiet_millis, schedule_delay_millis) / 1000
        self._max_queue_size = max_queue_size
        self._max_batch = max_export_batch_size
        self._on_drop = on_drop
        self._shut_down = False
        self._start()
        _restart_in_forked_child(self)

    def _start(self) -> None:
        """A fresh queue and export thread (at construction, and in a forked child, which has no thread)."""
        self._queue: deque[ReadableSpan] = deque(maxlen=self._max_queue_size)
        self._wake = threading.Event()  # a span is queued
        self._hurry = threading.Event()  # a full batch is queued, or shutdown: the pacing wait ends
        self._export_lock = threading.Lock()
        self._last_export = float("-inf")
        self._dropped_unlogged = 0
        self._thread = threading.Thread(target=self._run, name="BurnguardPacedSpanExport", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._shut_down or not (span.context and span.context.trace_flags.sampled):
            return
        if len(self._queue) >= self._max_queue_size:
            self._dropped_unlogged += 1
            if self._on_drop is not None:
                self._on_drop()
        self._queue.append(span)  # a full deque drops its oldest span
        if not self._wake.is_set():
            self._wake.set()
        if len(self._queue) >= self._max_batch and not self._hurry.is_set():
            self._hurry.set()

    def _run(self) -> None:
        """Export what is queued when a span came, but not sooner than a delay after the last export
        (nor later than a full batch); after the shutdown, one last round."""
        while True:
            if not self._shut_down:  # shutdown sets the flag before the wake this may have cleared
                self._wake.wait()
            stopping = self._shut_down  # read before the export: it takes every span queued so far
            if not stopping:
                self._wait_to_export()
            self._wake.clear()  # before taking the queue: a span queued after it wakes the next round
            self._export_queued()
            self._hurry.clear()  # after: a batch filled while the export drained went with it
            if stopping:
                return

    def _wait_to_export(self) -> None:
        """Until a delay after the last export; when that has passed (the app was idle), only until
        no span ended for `quiet_millis` (bounded by the delay). A full batch ends either wait."""
        now = time.monotonic()
        due = self._last_export + self._delay_s
        if now < due:
            self._hurry.wait(due - now)
            return
        due = now + self._delay_s
        queued = len(self._queue)
        while not self._hurry.wait(min(self._quiet_s, max(0.0, due - time.monotonic()))):
            if len(self._queue) == queued or time.monotonic() >= due:
                return
            queued = len(self._queue)

    def _export_queued(self) -> None:
        """Every queued span to the exporter, `max_export_batch_size` at a time, instrumentation off."""
        with self._export_lock:
            self._last_export = time.monotonic()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
                try:
                    self.exporter.export(batch)
                except Exception:  # the export thread must outlive an exporter's error
                    logger.exception("burnguard: exporting %d spans failed", len(batch))
                finally:
                    detach(token)
            self._log_drops()

    def _log_drops(self) -> None:
        dropped, self._dropped_unlogged = self._dropped_unlogged, 0
        if dropped:
            logger.warning(
                "burnguard: the span queue was full (%d); %d spans dropped", self._max_queue_size, dropped
            )

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export what is queued now, on the caller's thread (as the SDK's processor does)."""
        if self._shut_down:
            return False
        self._export_queued()
        return True

    def shutdown(self, timeout_millis: int = 30_000) -> None:
        """Let the export thread export what is queued, for `timeout_millis` at most, then shut the
        exporter down (idempotent); spans ending from now on are not exported."""
        if self._shut_down:
            return
        self._shut_down = True
        self._wake.set()
        self._hurry.set()
        self._thread.join(timeout_millis / 1000)
        self.exporter.shutdown()


def _restart_in_forked_child(processor: PacedBatchSpanProcessor) -> None:
    """A forked child (a pre-forking server's worker) has the queue's copy but not the thread."""
    restart = weakref.WeakMethod(processor._start)

    def after_in_child() -> None:
        if (start := restart()) is not None:
            start()

    os.register_at_fork(after_in_child=after_in_child)
