"""Zero-code setup: `opentelemetry-instrument python app.py` with burnguard installed.

`opentelemetry-instrument` runs the distro, one `opentelemetry_configurator`
(e.g. `opentelemetry-distro`'s), the `opentelemetry_pre_instrument` hooks,
then every `opentelemetry_instrumentor`. burnguard registers no configurator,
so it never displaces the app's: it registers

- the pre-instrument hook `burnguard` (`setup`): when no configurator set up
  the SDK, it runs the SDK's standard configuration first (the app's
  `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_*`, `OTEL_SERVICE_NAME`,
  `OTEL_RESOURCE_ATTRIBUTES`, ... as `opentelemetry-distro` would honour them;
  no exporter when `OTEL_TRACES_EXPORTER` is unset). Then `burnguard.configure()`
  joins that tracer provider: attribution, pricing and the duplicate-call
  marker, and burnguard's copy of the spans to Kafka (`BURNGUARD_KAFKA_BOOTSTRAP`,
  `BURNGUARD_TOPIC_SPANS`, ...); with `BURNGUARD_ENFORCE=true` a BudgetGuard
  following the signals (`BURNGUARD_BUDGETS_FILE`, `BURNGUARD_FAIL_MODE`);
- the instrumentors `burnguard_openai` and `burnguard_anthropic`.

`OTEL_PYTHON_DISABLED_INSTRUMENTATIONS` takes `burnguard_openai` /
`burnguard_anthropic` as usual.
"""

from __future__ import annotations

import logging

from burnguard.instrumentation.metrics import register_guard_metrics
from burnguard.instrumentation.runtime import configure, current_runtime
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)


def setup() -> None:
    """The `opentelemetry_pre_instrument` hook: join (or set up) the SDK, then `configure()`."""
    if current_runtime() is not None:
        return  # the app (or a test) configured burnguard already
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        _configure_sdk()
    runtime = configure()
    register_guard_metrics()
    logger.debug("burnguard: configured for zero-code instrumentation (enforce=%s)", runtime.settings.enforce)


def _configure_sdk() -> None:
    """The SDK's own configuration from `OTEL_*`, as a configurator would have done it."""
    from opentelemetry.instrumentation.version import __version__
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    _OTelSDKConfigurator().configure(auto_instrumentation_version=__version__)
