"""The app-side core: configure(), baggage attribution, the manual call API and CostSpanProcessor."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation import current_attribution
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.runtime import Runtime, current_runtime, reset_runtime
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import burnguard

BUDGETS = parse_budget_yaml("""\
model_classes:
  premium:  [gpt-4.1, o3]
  standard: [gpt-4.1-mini]
  economy:  [gpt-4.1-nano]
downgrade:
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
""")


class Setup:
    def __init__(self, runtime: Runtime, exporter: InMemorySpanExporter) -> None:
        self.runtime = runtime
        self.exporter = exporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def only_span(self) -> ReadableSpan:
        (span,) = self.spans()
        return span


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    for name in ("BURNGUARD_ENFORCE", "BURNGUARD_BUDGETS_FILE", "BURNGUARD_FAIL_MODE"):
        monkeypatch.delenv(name, raising=False)
    reset_runtime()
    exporter = InMemorySpanExporter()
    runtime = burnguard.configure(
        service_name="test-app", exporter=exporter, budgets=BUDGETS, batch=False, set_global=False
    )
    try:
        yield Setup(runtime, exporter)
    finally:
        runtime.shutdown()
        reset_runtime()


def test_configure_sets_the_current_runtime(setup: Setup) -> None:
    assert current_runtime() is setup.runtime
    assert setup.runtime.guard is None  # enforcement is off unless asked for
    assert setup.runtime.exporter is setup.exporter
    assert setup.runtime.tracer_provider.resource.attributes["service.name"] == "test-app"


def test_attribute_puts_every_dimension_on_spans(setup: Setup) -> None:
    with burnguard.attribute(
        tenant="acme", user="u-1", workflow="triage", feature="summarize", session="s-9", action="click"
    ):
        assert current_attribution() == {
            "tenant": "acme",
            "user": "u-1",
            "workflow": "triage",
            "feature": "summarize",
            "session": "s-9",
            "action": "click",
        }
        burnguard.record_llm_call("gpt-4.1-mini", "openai", 100, 10)
    attributes = setup.only_span().attributes
    assert attributes["burnguard.tenant"] == "acme"
    assert attributes["user.id"] == "u-1"
    assert attributes["burnguard.workflow"] == "triage"
    assert attributes["burnguard.feature"] == "summarize"
    assert attributes["session.id"] == "s-9"
    assert attributes["burnguard.action"] == "click"
    assert current_attribution() == {}


def test_nested_attribute_blocks_extend_and_override(setup: Setup) -> None:
    tracer = setup.runtime.tracer
    with burnguard.attribute(tenant="acme", feature="summarize"):
        with tracer.start_as_current_span("outer-before"):
            pass
        with burnguard.attribute(feature="translate", user="u-2"), tracer.start_as_current_span("inner"):
            pass
        with tracer.start_as_current_span("outer-after"):
            pass
    with tracer.start_as_current_span("outside"):
        pass
    by_name = {s.name: dict(s.attributes) for s in setup.spans()}
    assert by_name["outer-before"] == {"burnguard.tenant": "acme", "burnguard.feature": "summarize"}
    assert by_name["inner"] == {
        "burnguard.tenant": "acme",
        "burnguard.feature": "translate",
        "user.id": "u-2",
    }
    assert by_name["outer-after"] == by_name["outer-before"]
    assert by_name["outside"] == {}


def test_unrelated_baggage_does_not_become_attributes(setup: Setup) -> None:
    from opentelemetry import baggage, context

    token = context.attach(baggage.set_baggage("secret.session.token", "abc"))
    try:
        with burnguard.attribute(tenant="acme"), setup.runtime.tracer.start_as_current_span("x"):
            pass
    finally:
        context.detach(token)
    assert dict(setup.only_span().attributes) == {"burnguard.tenant": "acme"}


def test_record_llm_call_sets_semconv_attributes_and_cost(setup: Setup) -> None:
    model = burnguard.record_llm_call(
        "claude-sonnet-4-5",
        "anthropic",
        250_000,
        2_000,
        cache_read_tokens=100_000,
        cache_creation_tokens=20_000,
        reasoning_tokens=500,
        tool_calls=2,
        response_id="msg_1",
    )
    assert model == "claude-sonnet-4-5"
    span = setup.only_span()
    assert span.name == "chat claude-sonnet-4-5"
    assert span.kind == SpanKind.CLIENT
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert a["gen_ai.response.model"] == "claude-sonnet-4-5"
    assert a["gen_ai.response.id"] == "msg_1"
    assert a["gen_ai.usage.input_tokens"] == 250_000
    assert a["gen_ai.usage.output_tokens"] == 2_000
    assert a["gen_ai.usage.cache_read.input_tokens"] == 100_000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 20_000
    assert a["gen_ai.usage.reasoning.output_tokens"] == 500
    assert a["burnguard.tool_calls"] == 2
    assert "burnguard.cost.unpriced" not in a
    want = PriceBook().price(
        "claude-sonnet-4-5",
        "anthropic",
        input_tokens=250_000,
        output_tokens=2_000,
        cache_read_tokens=100_000,
        cache_creation_tokens=20_000,
    )
    assert want is not None and want > 1.0  # above the 200k tier
    assert a["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)
    assert span.status.status_code != StatusCode.ERROR


def test_cost_uses_the_response_model_and_model_class(setup: Setup) -> None:
    burnguard.record_llm_call("gpt-4.1", "openai", 10_000, 1_000, response_model="gpt-4.1-mini")
    a = setup.only_span().attributes
    assert a["gen_ai.request.model"] == "gpt-4.1"
    assert a["gen_ai.response.model"] == "gpt-4.1-mini"
    assert a["burnguard.model_class"] == "premium"  # the class of the requested model
    want = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=10_000, output_tokens=1_000)
    assert a["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)


def test_embeddings_operation(setup: Setup) -> None:
    burnguard.record_llm_call("text-embedding-3-small", "openai", 8_000, operation="embeddings")
    span = setup.only_span()
    assert span.name == "embeddings text-embedding-3-small"
    want = PriceBook().price("text-embedding-3-small", "openai", input_tokens=8_000)
    assert span.attributes["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)


def test_span_from_another_instrumentation_is_priced(setup: Setup) -> None:
    other = setup.runtime.tracer_provider.get_tracer("opentelemetry.instrumentation.openai")
    with other.start_as_current_span("chat gpt-4.1-mini", kind=SpanKind.CLIENT) as span:
        span.set_attributes(
            {
                "gen_ai.system": "openai",
                "gen_ai.request.model": "gpt-4.1-mini",
                "gen_ai.usage.prompt_tokens": 1_000,
                "gen_ai.usage.completion_tokens": 200,
            }
        )
    exported = setup.only_span()
    want = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=1_000, output_tokens=200)
    assert want is not None and want > 0
    assert exported.attributes["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)
    assert exported.attributes["gen_ai.request.model"] == "gpt-4.1-mini"  # the original attributes stay
    assert exported.name == "chat gpt-4.1-mini"
    assert exported.context.span_id == span.get_span_context().span_id
    assert (setup.runtime.cost_processor.priced, setup.runtime.cost_processor.unpriced) == (1, 0)


def test_semconv_span_from_another_instrumentation_is_priced(setup: Setup) -> None:
    other = setup.runtime.tracer_provider.get_tracer("opentelemetry.instrumentation.anthropic")
    with other.start_as_current_span("chat claude-opus-4-1") as span:
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-opus-4-1",
                "gen_ai.usage.input_tokens": 30_000,
                "gen_ai.usage.output_tokens": 1_500,
                "gen_ai.usage.cache_read.input_tokens": 20_000,
            }
        )
    want = PriceBook().price(
        "claude-opus-4-1", "anthropic", input_tokens=30_000, output_tokens=1_500, cache_read_tokens=20_000
    )
    assert setup.only_span().attributes["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)


def test_non_genai_and_tool_spans_are_not_priced(setup: Setup) -> None:
    with setup.runtime.tracer.start_as_current_span("GET /checkout"):
        pass
    burnguard.record_tool_call("web_search", call_id="call_1")
    by_name = {s.name: s for s in setup.spans()}
    assert set(by_name) == {"GET /checkout", "execute_tool web_search"}
    tool = by_name["execute_tool web_search"].attributes
    assert tool["gen_ai.operation.name"] == "execute_tool"
    assert tool["gen_ai.tool.name"] == "web_search"
    assert tool["gen_ai.tool.call.id"] == "call_1"
    for span in by_name.values():
        assert "burnguard.cost.usd" not in span.attributes
        assert "burnguard.cost.unpriced" not in span.attributes
    assert (setup.runtime.cost_processor.priced, setup.runtime.cost_processor.unpriced) == (0, 0)


def test_unknown_model_is_marked_unpriced_and_counted(setup: Setup) -> None:
    burnguard.record_llm_call("acme-llm-9000", "acme-ai", 1_000, 100)
    other = setup.runtime.tracer_provider.get_tracer("openllmetry")
    with other.start_as_current_span("chat x") as span:
        span.set_attributes({"gen_ai.system": "acme-ai", "gen_ai.request.model": "acme-llm-9001"})
    spans = setup.spans()
    assert len(spans) == 2
    for span in spans:
        assert span.attributes["burnguard.cost.unpriced"] is True
        assert "burnguard.cost.usd" not in span.attributes
    assert setup.runtime.cost_processor.unpriced == 2
    assert setup.runtime.cost_processor.priced == 0


class RateLimitError(Exception):
    pass


def test_llm_call_error_sets_error_type_and_status(setup: Setup) -> None:
    with pytest.raises(RateLimitError, match="slow down"), burnguard.llm_call("gpt-4.1", "openai") as call:
        call.set_usage(50)
        raise RateLimitError("slow down")
    span = setup.only_span()
    assert span.attributes["error.type"] == "RateLimitError"
    assert span.status.status_code == StatusCode.ERROR
    assert "slow down" in span.status.description
    assert span.attributes["gen_ai.usage.input_tokens"] == 50
    assert "burnguard.cost.usd" in span.attributes


def test_llm_call_success_has_no_error(setup: Setup) -> None:
    with burnguard.llm_call("gpt-4.1", "openai") as call:
        assert call.model == "gpt-4.1"
        call.set_usage(10, 5)
    span = setup.only_span()
    assert "error.type" not in span.attributes
    assert span.status.status_code == StatusCode.UNSET


def test_llm_call_downgraded_by_the_guard_records_it(setup: Setup) -> None:
    now = datetime.now(UTC)
    guard = BudgetGuard(KafkaSettings(), Topics(), BUDGETS, clock=lambda: now)  # never started
    guard.apply(
        Signal(
            scope="tenant",
            key="acme",
            budget="tenant-daily",
            action="downgrade",
            downgrade_to="standard",
            spent=44,
            limit=50,
            ratio=0.88,
            window_start=now - timedelta(hours=1),
            window_end=now + timedelta(hours=1),
            issued_at=now,
            expires_at=now + timedelta(minutes=5),
        )
    )
    setup.runtime.guard = guard
    with burnguard.attribute(tenant="acme"), burnguard.llm_call("gpt-4.1", "openai") as call:
        assert call.model == "gpt-4.1-mini"
        call.set_usage(1_000, 100)
    with burnguard.attribute(tenant="globex"), burnguard.llm_call("gpt-4.1", "openai") as call:
        assert call.model == "gpt-4.1"
    downgraded, untouched = setup.spans()
    assert downgraded.name == "chat gpt-4.1-mini"
    assert downgraded.attributes["gen_ai.request.model"] == "gpt-4.1-mini"
    assert downgraded.attributes["burnguard.downgraded_from"] == "gpt-4.1"
    assert downgraded.attributes["burnguard.model_class"] == "standard"
    want = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=1_000, output_tokens=100)
    assert downgraded.attributes["burnguard.cost.usd"] == pytest.approx(want, rel=1e-12)
    assert "burnguard.downgraded_from" not in untouched.attributes
    # record_llm_call records what already happened: it does not consult the guard by default.
    with burnguard.attribute(tenant="acme"):
        assert burnguard.record_llm_call("gpt-4.1", "openai", 10) == "gpt-4.1"


def test_llm_call_denied_by_the_guard_raises_before_the_call(setup: Setup) -> None:
    now = datetime.now(UTC)
    guard = BudgetGuard(KafkaSettings(), Topics(), BUDGETS, clock=lambda: now)  # never started
    guard.apply(
        Signal(
            scope="tenant",
            key="acme",
            budget="tenant-daily",
            action="throttle",
            spent=51,
            limit=50,
            ratio=1.02,
            window_start=now - timedelta(hours=1),
            window_end=now + timedelta(hours=1),
            issued_at=now,
            expires_at=now + timedelta(minutes=5),
        )
    )
    setup.runtime.guard = guard
    ran = []
    with (
        burnguard.attribute(tenant="acme"),
        pytest.raises(burnguard.BudgetExceeded, match="tenant-daily"),
        burnguard.llm_call("gpt-4.1", "openai"),
    ):
        ran.append(True)
    assert ran == []
    # The refusal is recorded as a span that used and cost nothing, so refusals can be counted.
    (refused,) = setup.spans()
    assert refused.attributes["burnguard.refused"] == "budget"
    assert refused.attributes["burnguard.cost.usd"] == 0.0
    assert refused.attributes["error.type"] == "BudgetExceeded"
    assert "gen_ai.usage.input_tokens" not in refused.attributes
    # enforce=False records without asking the guard.
    with burnguard.attribute(tenant="acme"), burnguard.llm_call("gpt-4.1", "openai", enforce=False):
        ran.append(True)
    assert ran == [True]
    assert len(setup.spans()) == 2
