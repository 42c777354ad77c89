"""Counting a model call once when two instrumentations record it.

burnguard's SDK wrappers and the official OpenTelemetry or OpenLLMetry
instrumentations (and the Anthropic SDK's own tracing) may all wrap the same
call. Two rules keep it to one accounted span:

- burnguard's wrapper finds the span of the same call already open (a GenAI
  model-call span is current when the call starts): it adopts that span —
  enforces, then enriches it with cost, tool calls and the downgrade — and
  starts none of its own;
- burnguard's span is open and another instrumentation starts a GenAI
  model-call span under it: `DuplicateCallMarker` marks that span
  `burnguard.duplicate_of=<our span id>` when it starts; it is still exported
  (the trace stays whole) but neither priced again nor accounted.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from burnguard.contracts import attributes as attr
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

# span ids of burnguard model-call spans that are open now
_open_calls: set[int] = set()
_OPENLLMETRY_REQUEST_TYPE = "llm.request.type"


def call_opened(span_id: int) -> None:
    _open_calls.add(span_id)


def call_closed(span_id: int) -> None:
    _open_calls.discard(span_id)


def is_model_call(attributes: Mapping[str, Any] | None) -> bool:
    """Attributes of a span that records one model call, in any instrumentation's spelling."""
    if not attributes:
        return False
    operation = attributes.get(attr.GEN_AI_OPERATION_NAME) or attributes.get(_OPENLLMETRY_REQUEST_TYPE)
    if operation is not None:
        return operation in attr.MODEL_CALL_OPERATIONS or operation == "completion"
    return attr.GEN_AI_SYSTEM in attributes or attr.GEN_AI_PROVIDER_NAME in attributes


class DuplicateCallMarker(SpanProcessor):
    """Marks GenAI model-call spans started under an open burnguard call span as duplicates."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        parent = span.parent
        if parent is None or parent.span_id not in _open_calls:
            return
        if is_model_call(span.attributes):
            span.set_attribute(attr.DUPLICATE_OF, format(parent.span_id, "016x"))

    def on_end(self, span: ReadableSpan) -> None:
        pass


_marked: weakref.WeakSet[TracerProvider] = weakref.WeakSet()
_lock = threading.Lock()


def ensure_marker(provider: object) -> None:
    """Add a `DuplicateCallMarker` to an SDK tracer provider once (other providers are left alone)."""
    if not isinstance(provider, TracerProvider):
        return
    with _lock:
        if provider in _marked:
            return
        _marked.add(provider)
    provider.add_span_processor(DuplicateCallMarker())
