"""`configure()`: one call that wires burnguard into an app's OpenTelemetry setup.

It builds the tracer provider the way the rest of burnguard expects it:
attribution copied from baggage onto every span, unpriced GenAI spans priced
before export, OTLP protobuf batches to Kafka, and — with enforcement on — a
BudgetGuard following the signal topic. Everything has an `OTEL_*` or
`BURNGUARD_*` variable, so `configure()` with no arguments does the right
thing in a container.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from burnguard.contracts.budgets import BudgetConfig, load_budget_file
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.attribution import attribution_span_processor
from burnguard.instrumentation.cost import CostSpanProcessor
from burnguard.instrumentation.dedupe import ensure_marker
from burnguard.instrumentation.guard import BudgetGuard, FailMode
from burnguard.instrumentation.kafka_exporter import CountingBatchSpanProcessor, KafkaSpanExporter
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

logger = logging.getLogger(__name__)
_TRUE = {"1", "true", "yes", "on"}


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
        )


@dataclass
class Runtime:
    """What `configure()` set up; `shutdown()` flushes and stops it."""

    settings: Settings
    tracer_provider: TracerProvider
    budgets: BudgetConfig
    prices: PriceBook
    cost_processor: CostSpanProcessor
    exporter: SpanExporter | None = None
    guard: BudgetGuard | None = None

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer("burnguard.instrumentation")

    def flush(self, timeout_millis: int = 10_000) -> bool:
        return self.tracer_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        self.tracer_provider.shutdown()


_runtime: Runtime | None = None


def configure(
    settings: Settings | None = None,
    *,
    service_name: str | None = None,
    exporter: SpanExporter | None = None,
    budgets: BudgetConfig | None = None,
    guard: BudgetGuard | None = None,
    set_global: bool = True,
    batch: bool = True,
) -> Runtime:
    """Set up tracing (and enforcement when enabled) for this process.

    `exporter` replaces the Kafka exporter (tests, or an OTLP exporter to a
    Collector that forwards to Kafka). `batch=False` exports synchronously,
    for scripts that must see every span on the topic before they exit.
    `guard` enforces with a guard built by the caller (started here), e.g.
    one with an `on_signal` callback; otherwise `settings.enforce` builds one.
    """
    global _runtime
    settings = settings or Settings.from_env()
    if budgets is None:
        budgets = load_budget_file(settings.budgets_file) if settings.budgets_file else BudgetConfig()
    prices = PriceBook(budgets.prices)
    resource = Resource.create({"service.name": service_name} if service_name else {})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(attribution_span_processor())
    if exporter is None:
        exporter = KafkaSpanExporter(settings.kafka, settings.topics.spans)
    cost_processor = CostSpanProcessor(_export_processor(exporter, batch), prices)
    provider.add_span_processor(cost_processor)
    ensure_marker(provider)  # a call recorded by two instrumentations is counted once
    if guard is None and settings.enforce:
        guard = BudgetGuard(settings.kafka, settings.topics, budgets, fail_mode=settings.fail_mode)
    if guard is not None:
        guard.service = guard.service or str(resource.attributes.get("service.name", ""))
        guard.start()
    if set_global:
        trace.set_tracer_provider(provider)
    _runtime = Runtime(settings, provider, budgets, prices, cost_processor, exporter, guard)
    return _runtime


def _export_processor(exporter: SpanExporter, batch: bool) -> SpanProcessor:
    if not batch:
        return SimpleSpanProcessor(exporter)
    if isinstance(exporter, KafkaSpanExporter):
        return CountingBatchSpanProcessor(exporter)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(exporter)


def current_runtime() -> Runtime | None:
    return _runtime


def reset_runtime() -> None:
    """Forget the configured runtime (after `shutdown()`), so tests can configure anew."""
    global _runtime
    _runtime = None
