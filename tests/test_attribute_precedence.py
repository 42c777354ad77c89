"""Which spelling of an attribute wins, written once (`attributes.FIELD_SPELLINGS`, `ATTRIBUTION_SPELLINGS`).

The stream decodes spans (`contracts.otlp`), the app prices them before export
(`instrumentation.cost`) and reads attribution from a resource (`attributes.attribution_of`); the
property test gives all of them the same random mix of current, deprecated and foreign spellings
(zeros and empty strings included) and checks they read the same values.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import BudgetConfig
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.attribution import current_attribution
from burnguard.instrumentation.cost import _int
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard
from burnguard.instrumentation.runtime import reset_runtime
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import burnguard

NOW = datetime.now(UTC)
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_tokens")


def decoded(attributes: dict[str, Any]) -> Any:
    """One real SDK span with these attributes, encoded as the exporter does and decoded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("chat") as span:
        span.set_attributes({attr.GEN_AI_OPERATION_NAME: attr.OP_CHAT, **attributes})
    provider.shutdown()
    (usage,) = decode_usage(encode_spans(exporter.get_finished_spans()).SerializeToString())
    return usage


def spellings_of(table: dict[str, tuple[str, ...]], values: Any) -> Any:
    """Attribute dicts that set any subset of each field's spellings."""
    names = [name for spellings in table.values() for name in spellings]
    return st.dictionaries(st.sampled_from(names), values, max_size=len(names))


@pytest.mark.usefixtures("decode_impl")  # both decoders (tests/fixtures/decoders.py)
@settings(max_examples=100, deadline=None)
@given(
    tokens=spellings_of({f: attr.FIELD_SPELLINGS[f] for f in TOKEN_FIELDS}, st.integers(0, 3)),
    providers=spellings_of(
        {"provider": attr.FIELD_SPELLINGS["provider"]}, st.sampled_from(["", "openai", "x"])
    ),
)
def test_decoding_and_app_side_pricing_read_the_same_spelling(
    tokens: dict[str, int], providers: dict[str, str]
) -> None:
    attributes = {**tokens, **providers}
    usage = decoded(attributes)
    for field in TOKEN_FIELDS:
        assert getattr(usage, field) == _int(attributes, field), field
    assert usage.provider == (attr.first_value(attributes, attr.FIELD_SPELLINGS["provider"]) or "")


@pytest.mark.usefixtures("decode_impl")  # both decoders (tests/fixtures/decoders.py)
@settings(max_examples=100, deadline=None)
@given(spellings_of(attr.ATTRIBUTION_SPELLINGS, st.sampled_from(["", "a", "b"])))
def test_decoding_and_the_app_read_attribution_spellings_alike(attributes: dict[str, str]) -> None:
    usage = decoded(attributes)
    expected = {dimension: getattr(usage, dimension) for dimension in attr.ATTRIBUTION_KEYS}
    found = attr.attribution_of(attributes)
    assert {dimension: found.get(dimension, "") for dimension in attr.ATTRIBUTION_KEYS} == expected


@pytest.mark.usefixtures("decode_impl")  # both decoders (tests/fixtures/decoders.py)
def test_the_current_spelling_wins_unless_it_is_empty() -> None:
    both = {attr.GEN_AI_USAGE_INPUT_TOKENS: 5, attr.GEN_AI_USAGE_PROMPT_TOKENS: 9}
    assert _int(both, "input_tokens") == decoded(both).input_tokens == 5
    zero = {attr.GEN_AI_USAGE_INPUT_TOKENS: 0, attr.GEN_AI_USAGE_PROMPT_TOKENS: 9}
    assert _int(zero, "input_tokens") == decoded(zero).input_tokens == 9
    assert attr.attribution_of({attr.USER_ID: "u1", attr.ENDUSER_ID: "old"}) == {"user": "u1"}


def test_own_attribution_wins_over_the_inherited() -> None:
    merged = attr.inherit_attribution(
        {"tenant": "acme", "user": ""}, {"tenant": "res", "user": "u", "feature": ""}
    )
    assert merged == {"tenant": "acme", "user": "u"}


# --- the app's guard attributes calls by its resource, like the stream ---------------------------
def test_the_guard_enforces_a_tenant_set_only_on_the_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    """`OTEL_RESOURCE_ATTRIBUTES=burnguard.tenant=acme` and no baggage: the stream counts the calls
    under `acme`, so the guard denies them when `acme` is throttled; baggage still wins."""
    for name in ("BURNGUARD_ENFORCE", "BURNGUARD_BUDGETS_FILE", "BURNGUARD_FAIL_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "burnguard.tenant=acme,enduser.id=u1")
    guard = BudgetGuard(KafkaSettings(), Topics(), BudgetConfig(), clock=lambda: NOW)
    monkeypatch.setattr(guard, "start", lambda wait_s=10.0: guard)  # fed by apply(): no Kafka
    monkeypatch.setattr(guard, "stop", lambda timeout_s=10.0: None)
    guard.apply(throttle("acme"))
    exporter = InMemorySpanExporter()
    reset_runtime()
    runtime = burnguard.configure(
        service_name="app",
        exporter=exporter,
        budgets=BudgetConfig(),
        guard=guard,
        batch=False,
        set_global=False,
    )
    try:
        assert current_attribution() == {"tenant": "acme", "user": "u1"}
        with pytest.raises(BudgetExceeded):
            burnguard.record_llm_call("gpt-4.1", "openai", 10, 5, enforce=True)
        with burnguard.attribute(tenant="globex"):  # the baggage's tenant wins over the resource's
            assert current_attribution() == {"tenant": "globex", "user": "u1"}
            burnguard.record_llm_call("gpt-4.1", "openai", 10, 5, enforce=True)
    finally:
        runtime.shutdown()
        reset_runtime()
    assert current_attribution() == {}  # the runtime gone, its resource no longer applies
    (call,) = [s for s in exporter.get_finished_spans() if s.attributes.get(attr.TENANT) == "globex"]
    assert call.resource.attributes[attr.TENANT] == "acme"  # the stream would read globex from the span


def throttle(tenant: str) -> Signal:
    return Signal(
        scope="tenant",
        key=tenant,
        budget="tenant-daily",
        action="throttle",
        spent=25.0,
        limit=20.0,
        ratio=1.25,
        window_start=NOW - timedelta(hours=1),
        window_end=NOW + timedelta(hours=1),
        issued_at=NOW - timedelta(seconds=1),
        expires_at=NOW + timedelta(minutes=2),
    )
