"""Who and what a call is for, carried as OpenTelemetry baggage.

Baggage crosses process boundaries with the W3C `baggage` header, so the
tenant set at the edge of a request arrives on the spans of every service the
request touches. `BaggageSpanProcessor` (opentelemetry-processor-baggage)
copies the entries onto spans at start; the predicate keeps it to our keys so
unrelated baggage never becomes span attributes.

A deployment that serves one tenant may say so on its resource instead
(`OTEL_RESOURCE_ATTRIBUTES=burnguard.tenant=...`); the stream counts such
spans under that tenant, so the guard must decide for them likewise: the
attribution of a call is the baggage's, then the runtime's resource's for the
dimensions the baggage leaves empty (`attributes.inherit_attribution`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from burnguard.contracts.attributes import (
    ATTRIBUTION_BY_ATTRIBUTE,
    ATTRIBUTION_KEYS,
    DEFAULT_STAKES,
    STAKES,
    attribution_of,
    inherit_attribution,
)
from burnguard.contracts.routes import check_stakes
from opentelemetry import baggage, context
from opentelemetry.processor.baggage import BaggageSpanProcessor

_ATTRIBUTION_BAGGAGE_KEYS = frozenset((*ATTRIBUTION_KEYS.values(), STAKES))
#: The attribution the configured runtime's resource carries (set by `configure()`).
_resource_attribution: dict[str, str] = {}


def use_resource_attribution(resource_attributes: Mapping[str, Any] | None) -> None:
    """Make the attribution of these resource attributes the fallback of every call (None: none)."""
    global _resource_attribution
    _resource_attribution = attribution_of(resource_attributes or {})


def is_attribution_key(key: str) -> bool:
    return key in _ATTRIBUTION_BAGGAGE_KEYS


def attribution_span_processor() -> BaggageSpanProcessor:
    return BaggageSpanProcessor(is_attribution_key)


@contextmanager
def attribute(
    *,
    tenant: str | None = None,
    user: str | None = None,
    workflow: str | None = None,
    feature: str | None = None,
    session: str | None = None,
    action: str | None = None,
) -> Iterator[None]:
    """Attribute every span started inside the block (and downstream services) to these keys.

    Nested blocks add to or override the outer attribution; values given as
    None keep what the outer block set.
    """
    given = {
        "tenant": tenant,
        "user": user,
        "workflow": workflow,
        "feature": feature,
        "session": session,
        "action": action,
    }
    ctx = context.get_current()
    for dimension, value in given.items():
        if value is not None:
            ctx = baggage.set_baggage(ATTRIBUTION_KEYS[dimension], str(value), context=ctx)
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def current_attribution() -> dict[str, str]:
    """The attribution of a call made now, by dimension name (tenant, user, ...): the current
    baggage's, the runtime's resource filling what it leaves empty."""
    found: dict[str, str] = {}
    for key, value in baggage.get_all().items():
        dimension = ATTRIBUTION_BY_ATTRIBUTE.get(key)
        if dimension is not None:
            found[dimension] = str(value)
    return inherit_attribution(found, _resource_attribution) if _resource_attribution else found


@contextmanager
def stakes(level: str) -> Iterator[None]:
    """Declare how much rides on the calls inside: `low`, `normal` (the default) or `high`.

    Routing rules can match on it (high-stakes work keeps the premium model);
    like the attribution it travels as baggage to downstream services.
    """
    ctx = baggage.set_baggage(STAKES, check_stakes(level))
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def current_stakes() -> str:
    value = baggage.get_baggage(STAKES)
    return str(value) if value else DEFAULT_STAKES
