"""`configure()`: one call that wires burnguard into an app's OpenTelemetry setup.

It joins the app's SDK tracer provider when there is one (or builds one):
attribution copied from baggage onto every span, unpriced GenAI spans priced
before export, OTLP protobuf batches to Kafka, and — with enforcement on — a
BudgetGuard following the signal topic. The app's own processors and exporters
stay as they are. Everything has an `OTEL_*` or `BURNGUARD_*` variable, so
`configure()` with no arguments does the right thing in a container.

The app never waits on Kafka: the guard replays the signals in the background
(`configure()` waits at most `BURNGUARD_GUARD_WAIT_S` for it), and at exit —
normal, `sys.exit` or SIGTERM, with or without `shutdown()` — every span
recorded so far is delivered within `BURNGUARD_SHUTDOWN_TIMEOUT_S` or counted
as undelivered, and the count is logged.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from burnguard.contracts.budgets import BudgetConfig, load_budget_file
from burnguard.contracts.env_numbers import env_number
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.attribution import attribution_span_processor, use_resource_attribution
from burnguard.instrumentation.cost import CostSpanProcessor
from burnguard.instrumentation.dedupe import ensure_marker
from burnguard.instrumentation.guard import BudgetGuard, FailMode
from burnguard.instrumentation.kafka_exporter import ExportStats, KafkaSpanExporter
from burnguard.instrumentation.paced_export import PacedBatchSpanProcessor
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)
_TRUE = {"1", "true", "yes", "on"}
#: burnguard's export delay when OTEL_BSP_SCHEDULE_DELAY is not set: the SDK's 5 s would let a
#: budget be overspent for 5 s before the worker hears of it. It is the least time between two
#: exports (`PacedBatchSpanProcessor`): an idle app's span goes at once, a busy app's wait for it.
DEFAULT_EXPORT_DELAY_MS = 100


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


@dataclass
class Settings:
    """Instrumentation settings; `from_env` reads the BURNGUARD_* and OTEL_* variables."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings.from_env)
    topics: Topics = field(default_factory=Topics.from_env)
    enforce: bool = False
    fail_mode: FailMode = "open"
    budgets_file: Path | None = None
    capture_content: bool = False
    #: How long `configure()` waits for the guard's replay of the signals (it goes on in the background).
    guard_wait_s: float = 0.5
    #: The bound on `shutdown()` and on the flush at exit.
    shutdown_timeout_s: float = 5.0
    #: Deliver the spans on SIGTERM too (when the app has no SIGTERM handler of its own).
    flush_on_sigterm: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        budgets_file = os.environ.get("BURNGUARD_BUDGETS_FILE")
        fail_mode = os.environ.get("BURNGUARD_FAIL_MODE", "open")
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"BURNGUARD_FAIL_MODE must be 'open' or 'closed', not {fail_mode!r}")
        return cls(
            enforce=_env_flag("BURNGUARD_ENFORCE"),
            fail_mode=fail_mode,  # type: ignore[arg-type]
            budgets_file=Path(budgets_file) if budgets_file else None,
            capture_content=_env_flag("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"),
            guard_wait_s=env_number("BURNGUARD_GUARD_WAIT_S", 0.5, most=3600, zero_ok=True),
            shutdown_timeout_s=env_number("BURNGUARD_SHUTDOWN_TIMEOUT_S", 5.0, most=3600, zero_ok=True),
            flush_on_sigterm=_env_flag("BURNGUARD_FLUSH_ON_SIGTERM", True),
        )


@dataclass(frozen=True)
class ShutdownReport:
    """What `shutdown()` could deliver: spans acknowledged by Kafka, and those that were not."""

    spans_sent: int
    spans_undelivered: int
    seconds: float


@dataclass(eq=False)
class Runtime:
    """What `configure()` set up; `shutdown()` flushes and stops it."""

    settings: Settings
    tracer_provider: TracerProvider
    budgets: BudgetConfig
    prices: PriceBook
    cost_processor: CostSpanProcessor
    exporter: SpanExporter | None = None
    guard: BudgetGuard | None = None
    #: False when burnguard joined a provider the app set up: the app shuts that one down.
    owns_provider: bool = True
    report: ShutdownReport | None = None

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("burnguard.instrumentation")

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Export what is queued and wait for Kafka's acknowledgement (the SDK's flush only exports)."""
        flushed = self.tracer_provider.force_flush(timeout_millis)
        if isinstance(self.exporter, KafkaSpanExporter):
            flushed = self.exporter.force_flush(timeout_millis) and flushed
        return flushed

    def shutdown(self, timeout_s: float | None = None) -> ShutdownReport:
        """Stop the guard and deliver every span recorded so far, within `timeout_s` (idempotent).

        Spans Kafka has not acknowledged by then are counted, logged and reported as undelivered.
        """
        if self.report is not None:
            return self.report
        started = time.monotonic()
        deadline = started + (self.settings.shutdown_timeout_s if timeout_s is None else timeout_s)
        if self.guard is not None:
            self.guard.stop(timeout_s=min(1.0, max(0.0, deadline - time.monotonic())))
        self.cost_processor.force_flush()  # hands the queued spans to the exporter, which never blocks
        stats: ExportStats | None = None
        if isinstance(self.exporter, KafkaSpanExporter):
            stats = self.exporter.close(max(0.0, deadline - time.monotonic()))
        if self.owns_provider:
            self.tracer_provider.shutdown()
        else:
            self.cost_processor.shutdown()  # burnguard's chain only; the app's provider stays up
        _live.discard(self)
        if _joined.get(self.tracer_provider) is self:
            del _joined[self.tracer_provider]
        self.report = ShutdownReport(
            spans_sent=stats.spans_sent if stats else 0,
            spans_undelivered=stats.undelivered if stats else 0,
            seconds=time.monotonic() - started,
        )
        if self.report.spans_undelivered:
            logger.warning(
                "burnguard: %d spans could not be delivered to Kafka (%d delivered)",
                self.report.spans_undelivered,
                self.report.spans_sent,
            )
        return self.report


_runtime: Runtime | None = None
_live: set[Runtime] = set()  # configured, not yet shut down: the exit hook shuts them down
_own_providers: weakref.WeakSet[TracerProvider] = weakref.WeakSet()
#: App providers burnguard joined, and the runtime that joined each (until its shutdown)
_joined: weakref.WeakKeyDictionary[TracerProvider, Runtime] = weakref.WeakKeyDictionary()


def configure(
    settings: Settings | None = None,
    *,
    service_name: str | None = None,
    exporter: SpanExporter | None = None,
    budgets: BudgetConfig | None = None,
    guard: BudgetGuard | None = None,
    set_global: bool = True,
    batch: bool = True,
    tracer_provider: TracerProvider | None = None,
) -> Runtime:
    """Set up tracing (and enforcement when enabled) for this process.

    burnguard's processors join `tracer_provider`, else the app's global SDK
    provider when it has set one (with `set_global`), so the app's own
    exporters keep every span; otherwise a provider is created (and set as the
    global one with `set_global`). `service_name` only names a provider
    burnguard creates. `exporter` replaces the Kafka exporter (tests, or an
    OTLP exporter to a Collector that forwards to Kafka). `batch=False`
    exports synchronously. `guard` enforces with a guard built by the caller
    (started here), e.g. one with an `on_signal` callback; otherwise
    `settings.enforce` builds one.
    """
    global _runtime
    settings = settings or Settings.from_env()
    if budgets is None:
        budgets = load_budget_file(settings.budgets_file) if settings.budgets_file else BudgetConfig()
    prices = PriceBook(budgets.prices)
    provider = tracer_provider or (_app_provider() if set_global else None)
    if provider is not None and (joined := _joined.get(provider)) is not None:
        logger.info("burnguard: already configured on this tracer provider (zero-code?); not twice")
        return joined  # a second set of processors would export every span to Kafka twice
    owns_provider = provider is None
    if provider is None:
        resource = Resource.create({"service.name": service_name} if service_name else {})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the exit hook shuts it down
        _own_providers.add(provider)
    elif service_name:
        logger.info("burnguard: joined the app's tracer provider; its resource names the service")
    provider.add_span_processor(attribution_span_processor())
    if exporter is None:
        exporter = KafkaSpanExporter(settings.kafka, settings.topics.spans, on_connect=_exit_hook_first)
        exporter.start()
    cost_processor = CostSpanProcessor(_export_processor(exporter, batch), prices)
    provider.add_span_processor(cost_processor)
    ensure_marker(provider)  # a call recorded by two instrumentations is counted once
    if guard is None and settings.enforce:
        guard = BudgetGuard(settings.kafka, settings.topics, budgets, fail_mode=settings.fail_mode)
    if guard is not None:
        guard.service = guard.service or str(provider.resource.attributes.get("service.name", ""))
        guard.start(wait_s=settings.guard_wait_s)
    if set_global and owns_provider:
        trace.set_tracer_provider(provider)
    _runtime = Runtime(settings, provider, budgets, prices, cost_processor, exporter, guard, owns_provider)
    use_resource_attribution(provider.resource.attributes)  # the calls' attribution, as the stream reads it
    _live.add(_runtime)
    if not owns_provider:
        _joined[provider] = _runtime
    _install_exit_hooks(settings)
    return _runtime


def _app_provider() -> TracerProvider | None:
    """The app's global SDK tracer provider, if it set one (not one burnguard created)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider) and provider not in _own_providers:
        return provider
    return None


def _export_processor(exporter: SpanExporter, batch: bool) -> SpanProcessor:
    if not batch:
        return SimpleSpanProcessor(exporter)
    delay = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else DEFAULT_EXPORT_DELAY_MS
    on_drop = exporter.count_dropped if isinstance(exporter, KafkaSpanExporter) else None
    return PacedBatchSpanProcessor(exporter, schedule_delay_millis=delay, on_drop=on_drop)


# --- exit ---------------------------------------------------------------------------------
def _shutdown_all() -> None:
    """Shut every live runtime down within its bound (at exit, or on SIGTERM)."""
    for runtime in list(_live):
        try:
            runtime.shutdown()
        except Exception:  # at exit nothing may stop the other runtimes' flush
            logger.exception("burnguard: shutdown at exit failed")


def _exit_hook_first(_producer: object = None) -> None:
    """(Re-)register the exit hook so it runs before the atexit handlers registered so far.

    atexit runs handlers last-in first-out; kafka-python registers one that
    closes the producer when the producer is created, after `configure()`. Were
    that to run first, the final flush would find the producer closed.
    """
    atexit.unregister(_shutdown_all)
    atexit.register(_shutdown_all)


_sigterm_installed = False


def _install_exit_hooks(settings: Settings) -> None:
    global _sigterm_installed
    _exit_hook_first()
    if not settings.flush_on_sigterm or _sigterm_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the app handles SIGTERM (and exits through atexit, or shuts down itself)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Deliver the spans, then die of SIGTERM as the default disposition would.

    The flush runs on its own thread, joined within the runtimes' bound: the handler
    interrupts the main thread anywhere, maybe holding a lock the flush needs.
    """
    bound = max((runtime.settings.shutdown_timeout_s for runtime in list(_live)), default=0.0)
    flusher = threading.Thread(target=_shutdown_all, name="burnguard-sigterm", daemon=True)
    flusher.start()
    flusher.join(bound + 1.0)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def current_runtime() -> Runtime | None:
    return _runtime


def reset_runtime() -> None:
    """Forget the configured runtime (after `shutdown()`), so tests can configure anew."""
    global _runtime
    _runtime = None
    use_resource_attribution(None)
