"""burnguard beside the official OpenAI instrumentation, OpenLLMetry and the Anthropic SDK's own tracing.

Spans those make are attributed and priced by burnguard's pipeline; when several of them
and burnguard record the same call, `decode_usage` over the exported OTLP yields ONE model
call per request, whatever order the instrumentations were installed in.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.instrumentation import Settings
from burnguard.instrumentation.anthropic import AnthropicInstrumentor
from burnguard.instrumentation.openai import OpenAIInstrumentor
from burnguard.instrumentation.runtime import Runtime, reset_runtime
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.openai import OpenAIInstrumentor as OpenLLMetryInstrumentor
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor as OfficialInstrumentor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import burnguard
from tests.fakes.harness import BUDGETS, anthropic_server_fixture, make_signal, openai_server_fixture  # noqa: F401
from tests.fakes.openai_api import FakeOpenAI

MESSAGES = [{"role": "user", "content": "Classify this ticket."}]
OFFICIAL, OPENLLMETRY, BURNGUARD = "openai-v2", "openllmetry", "burnguard"
INSTRUMENTORS = {
    OFFICIAL: OfficialInstrumentor,
    OPENLLMETRY: OpenLLMetryInstrumentor,
    BURNGUARD: OpenAIInstrumentor,
}
GPT41 = PriceBook().price("gpt-4.1", "openai", input_tokens=120, output_tokens=30)


class Setup:
    def __init__(self, runtime: Runtime, exporter: InMemorySpanExporter) -> None:
        self.runtime = runtime
        self.exporter = exporter
        self.active: list[Any] = []

    def instrument(self, *names: str) -> None:
        for name in names:  # the last one installed wraps outermost
            instrumentor = INSTRUMENTORS[name]()
            instrumentor.instrument(tracer_provider=self.runtime.tracer_provider)
            self.active.append(instrumentor)

    def decoded(self) -> list[SpanUsage]:
        """What the stream job would account: the exported spans through OTLP protobuf and `decode_usage`."""
        spans = self.exporter.get_finished_spans()
        return decode_usage(encode_spans(spans).SerializeToString())


def snapshot_openai() -> dict[tuple[type, str], Any]:
    """Every method of the `openai` resource classes, to put back after the peers' `uninstrument()`,
    which leaves wrappers behind when it is not the outermost one."""
    import openai.resources  # noqa: F401

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("openai.resources") or module is None:
            continue
        for owner in vars(module).values():
            if isinstance(owner, type) and owner.__module__ == name:
                found.update({(owner, key): value for key, value in vars(owner).items() if callable(value)})
    return found


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    monkeypatch.delenv("OTEL_SEMCONV_STABILITY_OPT_IN", raising=False)
    originals = snapshot_openai()
    reset_runtime()
    exporter = InMemorySpanExporter()
    runtime = burnguard.configure(
        Settings(),
        service_name="interplay",
        exporter=exporter,
        budgets=BUDGETS,
        batch=False,
        set_global=False,
    )
    result = Setup(runtime, exporter)
    try:
        yield result
    finally:
        for instrumentor in reversed(result.active):
            instrumentor.uninstrument()
        for (owner, key), value in originals.items():
            if vars(owner).get(key) is not value:
                setattr(owner, key, value)
        runtime.shutdown()
        reset_runtime()


def client(server: FakeOpenAI) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)


@pytest.mark.parametrize("peer", [OFFICIAL, OPENLLMETRY])
def test_peer_spans_alone_are_attributed_and_priced(
    setup: Setup, openai_server: FakeOpenAI, peer: str
) -> None:
    setup.instrument(peer)
    with burnguard.attribute(tenant="acme", feature="triage"):
        client(openai_server).chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    (usage,) = setup.decoded()
    assert usage.is_model_call and usage.model == "gpt-4.1" and usage.provider == "openai"
    assert (usage.input_tokens, usage.output_tokens) == (120, 30)
    assert (usage.tenant, usage.feature) == ("acme", "triage")  # baggage copied onto their span
    assert usage.cost_usd == pytest.approx(GPT41)  # priced by burnguard's CostSpanProcessor
    (span,) = setup.exporter.get_finished_spans()
    assert span.instrumentation_scope.name != "burnguard.instrumentation"


@pytest.mark.parametrize(
    "order",
    [
        *itertools.permutations([OFFICIAL, BURNGUARD]),
        *itertools.permutations([OPENLLMETRY, BURNGUARD]),
        *itertools.permutations([OFFICIAL, OPENLLMETRY, BURNGUARD]),
    ],
    ids="+".join,
)
def test_one_call_counted_once_whatever_the_order(
    setup: Setup, openai_server: FakeOpenAI, order: tuple
) -> None:
    setup.instrument(*order)
    openai = client(openai_server)
    with burnguard.attribute(tenant="acme"):
        openai.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-tool-calls": "2"}
        )
        for _ in openai.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ):
            pass
    exported = setup.exporter.get_finished_spans()
    assert len([s for s in exported if "gen_ai.operation.name" in s.attributes]) == 2 * len(order)  # all kept
    calls = [u for u in setup.decoded() if u.is_model_call]
    assert len(calls) == 2, "\n".join(
        f"{s.instrumentation_scope.name} {s.name} {dict(s.attributes)}" for s in exported
    )
    for usage in calls:
        assert (usage.input_tokens, usage.output_tokens) == (120, 30)
        assert usage.tenant == "acme"
        assert usage.cost_usd == pytest.approx(GPT41)
    assert calls[0].tool_calls == 2 or calls[1].tool_calls == 2  # burnguard's count, on the accounted span
    assert sum(u.cost_usd for u in calls) == pytest.approx(2 * GPT41)


def test_enforcement_still_applies_under_a_peer(setup: Setup, openai_server: FakeOpenAI) -> None:
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.instrumentation.guard import BudgetGuard

    guard = BudgetGuard(KafkaSettings(), Topics(), BUDGETS)
    guard.apply(make_signal("downgrade", key="acme", downgrade_to="standard"))
    setup.runtime.guard = guard
    setup.instrument(BURNGUARD, OFFICIAL)  # the official span is outermost: burnguard adopts it
    openai_server.requests.clear()
    with burnguard.attribute(tenant="acme"):
        client(openai_server).chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert openai_server.models == ["gpt-4.1-mini"]
    (usage,) = setup.decoded()
    assert usage.downgraded_from == "gpt-4.1" and usage.model == "gpt-4.1-mini"
    mini = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=120, output_tokens=30)
    assert usage.cost_usd == pytest.approx(mini)


def test_anthropic_sdk_tracing_and_burnguard_count_once(setup: Setup, anthropic_server: Any) -> None:
    import anthropic

    setup.instrument()
    AnthropicInstrumentor().instrument(tracer_provider=setup.runtime.tracer_provider)
    setup.active.append(AnthropicInstrumentor())
    claude = anthropic.Anthropic(
        base_url=anthropic_server.base_url,
        api_key="test",
        max_retries=0,
        open_telemetry={"tracer_provider": setup.runtime.tracer_provider},  # the SDK's own spans, on
    )
    headers = {"x-fake-cached": "400", "x-fake-cache-creation": "100"}
    with burnguard.attribute(tenant="acme"):
        claude.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, extra_headers=headers
        )
        for _ in claude.messages.create(
            model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES, stream=True, extra_headers=headers
        ):
            pass
    scopes = {s.instrumentation_scope.name for s in setup.exporter.get_finished_spans()}
    assert "com.anthropic.sdk.python" in scopes  # the SDK did record its own spans
    calls = [u for u in setup.decoded() if u.is_model_call]
    assert len(calls) == 2
    want = PriceBook().price(
        "claude-sonnet-4-5",
        "anthropic",
        input_tokens=600,
        output_tokens=25,
        cache_read_tokens=400,
        cache_creation_tokens=100,
    )
    for usage in calls:
        assert usage.input_tokens == 600 and usage.cache_creation_tokens == 100
        assert usage.cost_usd == pytest.approx(want)
