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

import wrapt
from burnguard.instrumentation._sdk import Spec
from burnguard.instrumentation.dedupe import ensure_marker
from burnguard.instrumentation.metrics import register_guard_metrics
from burnguard.instrumentation.runtime import current_runtime
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from wrapt import wrap_function_wrapper

_SCOPE = "burnguard.instrumentation"
_PROXY = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)  # wrapt 2 splits the proxy base out


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
        self._wrapped: list[tuple[Any, str, Any]] = []
        for target in self.targets:
            try:
                module = importlib.import_module(target.module)
                owner = getattr(module, target.cls)
                getattr(owner, target.method)
            except (ImportError, AttributeError):
                continue  # an SDK version without this method
            wrapper = target.factory(target.spec, lambda: tracer)
            wrap_function_wrapper(module, f"{target.cls}.{target.method}", wrapper)
            self._wrapped.append((owner, target.method, wrapper))

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, method, wrapper in getattr(self, "_wrapped", ()):
            _unwrap(owner, method, wrapper)
        self._wrapped = []


def _unwrap(owner: Any, method: str, wrapper: Any) -> None:
    """Take our wrapper out of the chain of wrappers on `owner.method`, wherever it sits in it.

    Another instrumentation may have wrapped the method after us: removing the outermost wrapper
    (as a plain `unwrap` does) would remove theirs, so the chain is walked in the class dict.
    """
    outer: Any = None
    current = owner.__dict__.get(method)
    while isinstance(current, _PROXY):
        if getattr(current, "_self_wrapper", None) is wrapper:
            inner = current.__wrapped__
            if outer is None:
                setattr(owner, method, inner)
            else:
                outer.__wrapped__ = inner
            return
        outer, current = current, current.__wrapped__
