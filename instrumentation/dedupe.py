"""Counting a model call once when several instrumentations record it.

burnguard's SDK wrappers, the official OpenTelemetry OpenAI instrumentation,
OpenLLMetry and the Anthropic SDK's own tracing may all wrap the same call,
each with a GenAI span, nested in whatever order they were installed. In a
chain of nested model-call spans exactly one is accounted:

- burnguard's span when the chain has one: its usage, tool calls, downgrade
  and estimate flags are the ones burnguard vouches for;
- otherwise the outermost span.

Every other span of the chain is exported as it is, so the trace stays whole,
but marked `burnguard.duplicate_of=<span id of the accounted span or of its
parent>`: neither priced again (`CostSpanProcessor`) nor accounted
(`decode_usage` skips it). A span started under an open model-call span is
marked when it starts (`DuplicateCallMarker`); a foreign span that a burnguard
span started inside is marked when it ends (`superseded_by`, applied by
`CostSpanProcessor` on the copy it exports).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from burnguard.contracts import attributes as attr
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

BURNGUARD_SCOPE = "burnguard.instrumentation"
_OPENLLMETRY_REQUEST_TYPE = "llm.request.type"
# model-call spans open now, of any instrumentation: span id -> parent span id (0: none)
_open_calls: dict[int, int] = {}
# open foreign model-call spans a burnguard span started inside: span id -> burnguard span id
_superseded: dict[int, int] = {}


def is_model_call(attributes: Mapping[str, Any] | None) -> bool:
    """Attributes of a span that records one model call, in any instrumentation's spelling."""
    if not attributes:
        return False
    operation = attributes.get(attr.GEN_AI_OPERATION_NAME) or attributes.get(_OPENLLMETRY_REQUEST_TYPE)
    if operation is not None:
        return operation in attr.MODEL_CALL_OPERATIONS or operation == "completion"
    return attr.GEN_AI_SYSTEM in attributes or attr.GEN_AI_PROVIDER_NAME in attributes


def _is_burnguard(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return scope is not None and scope.name == BURNGUARD_SCOPE


class DuplicateCallMarker(SpanProcessor):
    """Tracks open model-call spans; marks those started inside another as its duplicates."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if not is_model_call(span.attributes):
            return
        span_id = span.get_span_context().span_id
        parent = span.parent
        parent_id = parent.span_id if parent is not None else 0
        if _is_burnguard(span):
            ancestor = parent_id  # every open model-call span around this call is superseded by it
            while ancestor in _open_calls and ancestor not in _superseded:
                _superseded[ancestor] = span_id
                ancestor = _open_calls[ancestor]
        elif parent_id in _open_calls:
            span.set_attribute(attr.DUPLICATE_OF, format(parent_id, "016x"))
        _open_calls[span_id] = parent_id

    def on_end(self, span: ReadableSpan) -> None:
        if _open_calls:
            span_id = span.get_span_context().span_id
            _open_calls.pop(span_id, None)
            _superseded.pop(span_id, None)


def superseded_by(span: ReadableSpan) -> str | None:
    """For an ending span that a burnguard span accounts for: that span's id (hex), else None."""
    if not _superseded:
        return None
    accounted = _superseded.pop(span.get_span_context().span_id, None)
    if accounted is None or attr.DUPLICATE_OF in (span.attributes or {}):
        return None
    return format(accounted, "016x")


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
