"""The guard's decisions as OpenTelemetry metrics.

Observable counters read `BudgetGuard.stats` of the configured runtime at each
collection: `burnguard.guard.stale_decisions` (a stale signal met the fail
mode), `burnguard.guard.denied` and `burnguard.guard.downgraded`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from burnguard.instrumentation.runtime import current_runtime
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_registered: set[int] = set()
_lock = threading.Lock()

COUNTERS = {
    "burnguard.guard.stale_decisions": (
        "stale_decisions",
        "decisions where a stale signal met the fail mode",
    ),
    "burnguard.guard.denied": ("denied", "calls refused before they were sent"),
    "burnguard.guard.downgraded": ("downgraded", "calls sent with a cheaper model"),
}


def _observe(field: str) -> Any:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        runtime = current_runtime()
        guard = runtime.guard if runtime is not None else None
        if guard is None:
            return []
        return [Observation(getattr(guard.stats, field), {"burnguard.fail_mode": guard.fail_mode})]

    return callback


def register_guard_metrics(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Register the guard counters on `meter_provider` (default: the global one), once per provider."""
    provider = meter_provider or metrics.get_meter_provider()
    with _lock:
        if id(provider) in _registered:
            return
        _registered.add(id(provider))
    meter = provider.get_meter("burnguard.instrumentation")
    for name, (field, description) in COUNTERS.items():
        meter.create_observable_counter(
            name, callbacks=[_observe(field)], unit="{decision}", description=description
        )
