"""Zero-code setup: `opentelemetry-instrument python app.py` with burnguard installed.

`opentelemetry-instrument` runs the `opentelemetry_configurator` entry points,
then every `opentelemetry_instrumentor` one. burnguard registers:

- the configurator `burnguard` (`BurnguardConfigurator`): `burnguard.configure()`
  from the environment — the tracer provider with attribution, pricing and the
  duplicate-call marker, the Kafka exporter to `otlp_spans`
  (`BURNGUARD_KAFKA_BOOTSTRAP`, `BURNGUARD_TOPIC_SPANS`, ...), `OTEL_SERVICE_NAME`
  / `OTEL_RESOURCE_ATTRIBUTES` on the resource, and with `BURNGUARD_ENFORCE=true`
  a BudgetGuard following the signals (`BURNGUARD_BUDGETS_FILE` for the model
  classes and the ladder, `BURNGUARD_FAIL_MODE`);
- the instrumentors `burnguard_openai` and `burnguard_anthropic`.

When another configurator is installed too (e.g. `opentelemetry-distro`'s),
`opentelemetry-instrument` runs only the first it finds: set
`OTEL_PYTHON_CONFIGURATOR=burnguard`. `OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`
takes `burnguard_openai` / `burnguard_anthropic` as usual.
"""

from __future__ import annotations

import logging
from typing import Any

from burnguard.instrumentation.metrics import register_guard_metrics
from burnguard.instrumentation.runtime import configure, current_runtime

logger = logging.getLogger(__name__)


class BurnguardConfigurator:
    """The `opentelemetry_configurator` entry point: `configure()` from `OTEL_*` / `BURNGUARD_*`."""

    def configure(self, **kwargs: Any) -> None:
        if current_runtime() is not None:
            return  # the app (or a test) configured burnguard already
        runtime = configure()
        register_guard_metrics()
        logger.debug(
            "burnguard: configured for zero-code instrumentation (enforce=%s)", runtime.settings.enforce
        )
