"""The base of burnguard's SDK instrumentors, in the style of opentelemetry-python-contrib.

A subclass lists its `targets` (module, class, method, `Spec`, wrapper factory);
`instrument()` wraps each with `wrapt` and `uninstrument()` restores it. The
tracer comes from `instrument(tracer_provider=...)` when given, else from the
burnguard runtime (`configure()`), else the global provider — resolved per
call, so configuring after instrumenting works too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from burnguard.instrumentation._sdk import Spec
from burnguard.instrumentation.dedupe import ensure_marker
from burnguard.instrumentation.metrics import register_guard_metrics
from burnguard.instrumentation.runtime import current_runtime
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

_SCOPE = "burnguard.instrumentation"


@dataclass(frozen=True)
class Target:
    module: str
    cls: str
    method: str
    spec: Spec
    factory: Callable[[Spec, Callable[[], trace.Tracer | None]], Callable[..., Any]]


class BurnguardInstrumentor(BaseInstrumentor):
    targets: ClassVar[tuple[Target, ...]] = ()

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider")
        tracer = provider.get_tracer(_SCOPE) if provider is not None else None
        runtime = current_runtime()
        ensure_marker(provider or (runtime.tracer_provider if runtime else trace.get_tracer_provider()))
        register_guard_metrics(kwargs.get("meter_provider"))
        self._wrapped: list[tuple[Any, str]] = []
        for target in self.targets:
            try:
                module = importlib.import_module(target.module)
                owner = getattr(module, target.cls)
                getattr(owner, target.method)
            except (ImportError, AttributeError):
                continue  # an SDK version without this method
            wrap_function_wrapper(
                module, f"{target.cls}.{target.method}", target.factory(target.spec, lambda: tracer)
            )
            self._wrapped.append((owner, target.method))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, method in getattr(self, "_wrapped", ()):
            unwrap(owner, method)
        self._wrapped = []
