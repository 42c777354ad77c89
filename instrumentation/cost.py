"""Pricing GenAI spans in the app, before they are exported.

Our own instrumentation sets `burnguard.cost.usd` while the span is still
open (`cost_attributes`). Spans written by other instrumentations (the
official OpenTelemetry GenAI ones, OpenLLMetry) arrive at `on_end` without a
cost and read-only, so `CostSpanProcessor` sits in front of the export
processor and hands it a priced copy. A model without a known price is marked
`burnguard.cost.unpriced` and counted, never guessed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.pricing import PriceBook, default_price_book
from burnguard.instrumentation.dedupe import superseded_by
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor


def _count(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _int(attributes: Mapping[str, Any], field: str) -> int:
    """A token count by its spellings' precedence (`attributes.FIELD_SPELLINGS`), as decoding reads it."""
    return _count(attr.first_value(attributes, attr.FIELD_SPELLINGS[field]))


def cost_attributes(attributes: Mapping[str, Any], prices: PriceBook | None = None) -> dict[str, Any]:
    """The cost attributes for a GenAI span with these attributes: cost, or the unpriced mark."""
    model = attributes.get(attr.GEN_AI_RESPONSE_MODEL) or attributes.get(attr.GEN_AI_REQUEST_MODEL)
    provider = attr.first_value(attributes, attr.FIELD_SPELLINGS["provider"]) or ""
    if not model:
        return {attr.UNPRICED: True}
    cost = (prices or default_price_book()).price(
        str(model),
        str(provider),
        input_tokens=_int(attributes, "input_tokens"),
        output_tokens=_int(attributes, "output_tokens"),
        cache_read_tokens=_count(attributes.get(attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS)),
        cache_creation_tokens=_int(attributes, "cache_creation_tokens"),
    )
    if cost is None:
        return {attr.UNPRICED: True}
    return {attr.COST_USD: cost}


def needs_pricing(attributes: Mapping[str, Any]) -> bool:
    """A model call that nobody priced yet."""
    if attr.COST_USD in attributes or attr.UNPRICED in attributes or attr.DUPLICATE_OF in attributes:
        return False
    operation = attributes.get(attr.GEN_AI_OPERATION_NAME)
    if operation is None:
        return attr.GEN_AI_SYSTEM in attributes or attr.GEN_AI_PROVIDER_NAME in attributes
    return operation in attr.MODEL_CALL_OPERATIONS


def with_attributes(span: ReadableSpan, extra: Mapping[str, Any]) -> ReadableSpan:
    """A read-only copy of `span` with `extra` attributes added."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={**(span.attributes or {}), **extra},
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class CostSpanProcessor(SpanProcessor):
    """Prices unpriced GenAI spans, then passes every span on to `next_processor`."""

    def __init__(self, next_processor: SpanProcessor, prices: PriceBook | None = None) -> None:
        self._next = next_processor
        self._prices = prices
        self._lock = threading.Lock()
        self.priced = 0
        self.unpriced = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._next.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        duplicate_of = superseded_by(span)
        if duplicate_of is not None:  # a burnguard span inside it accounts for this call
            self._next.on_end(with_attributes(span, {attr.DUPLICATE_OF: duplicate_of}))
            return
        attributes = span.attributes or {}
        if needs_pricing(attributes):
            extra = cost_attributes(attributes, self._prices)
            self._count(attr.COST_USD in extra)
            span = with_attributes(span, extra)
        elif attributes.get(attr.UNPRICED):
            self._count(False)
        self._next.on_end(span)

    def _count(self, priced: bool) -> None:
        with self._lock:
            if priced:
                self.priced += 1
            else:
                self.unpriced += 1

    def shutdown(self) -> None:
        self._next.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._next.force_flush(timeout_millis)
