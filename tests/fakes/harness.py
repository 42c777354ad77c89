"""Test harness: a configured burnguard runtime exporting to memory, instrumented SDKs, fake servers.

Import the fixtures into a test module (`from tests.fakes.harness import harness_fixture, ...`);
pytest then knows them as `harness`, `openai_server` and `anthropic_server`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation import Settings
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.runtime import Runtime, reset_runtime
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import burnguard
from tests import factories
from tests.factories import MODEL_CLASSES_YAML
from tests.fakes.anthropic_api import FakeAnthropic
from tests.fakes.openai_api import FakeOpenAI

BUDGETS = parse_budget_yaml(MODEL_CLASSES_YAML)


def make_signal(action: str, key: str = "acme", downgrade_to: str | None = None) -> Signal:
    """A tenant-daily signal issued now, for `Harness.enforce`: a window of the two hours around now."""
    now = datetime.now(UTC)
    return factories.make_signal(
        action,
        key=key,
        downgrade_to=downgrade_to,
        spent=52.0 if action == "throttle" else 44.0,
        issued_at=now,
        window_start=now - timedelta(hours=1),
        window_end=now + timedelta(hours=1),
    )


@dataclass
class Harness:
    runtime: Runtime
    exporter: InMemorySpanExporter
    openai_server: FakeOpenAI
    anthropic_server: FakeAnthropic

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def calls(self) -> list[ReadableSpan]:
        """Finished spans that are accounted model calls (not duplicates)."""
        return [
            s
            for s in self.spans()
            if s.attributes.get("gen_ai.operation.name") in ("chat", "embeddings", "text_completion")
            and "burnguard.duplicate_of" not in s.attributes
        ]

    def only_call(self) -> ReadableSpan:
        calls = self.calls()
        assert len(calls) == 1, [(s.name, dict(s.attributes)) for s in self.spans()]
        return calls[0]

    def enforce(self, *signals: Signal) -> BudgetGuard:
        guard = BudgetGuard(KafkaSettings(), Topics(), BUDGETS)  # never started: fed with apply()
        for signal in signals:
            guard.apply(signal)
        self.runtime.guard = guard
        return guard

    # --- clients on the fake servers ----------------------------------------------------
    def openai(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.openai_server.base_url, api_key="test", max_retries=0, **kwargs)

    def async_openai(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(
            base_url=self.openai_server.base_url, api_key="test", max_retries=0, **kwargs
        )

    def anthropic(self, **kwargs: Any) -> Any:
        import anthropic

        return anthropic.Anthropic(
            base_url=self.anthropic_server.base_url, api_key="test", max_retries=0, **kwargs
        )

    def async_anthropic(self, **kwargs: Any) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            base_url=self.anthropic_server.base_url, api_key="test", max_retries=0, **kwargs
        )


@pytest.fixture(scope="module", name="openai_server")
def openai_server_fixture() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module", name="anthropic_server")
def anthropic_server_fixture() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(name="harness")
def harness_fixture(
    monkeypatch: pytest.MonkeyPatch, openai_server: FakeOpenAI, anthropic_server: FakeAnthropic
) -> Iterator[Harness]:
    from burnguard.instrumentation.anthropic import AnthropicInstrumentor
    from burnguard.instrumentation.openai import OpenAIInstrumentor

    for name in (
        "BURNGUARD_ENFORCE",
        "BURNGUARD_BUDGETS_FILE",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_OPEN_TELEMETRY", "false")  # the SDK's own spans: see test_autoinstrument_*
    reset_runtime()
    exporter = InMemorySpanExporter()
    runtime = burnguard.configure(
        Settings(enforce=False),
        service_name="sdk-tests",
        exporter=exporter,
        budgets=BUDGETS,
        batch=False,
        set_global=False,
    )
    instrumentors = [OpenAIInstrumentor(), AnthropicInstrumentor()]
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=runtime.tracer_provider)
    for server in (openai_server, anthropic_server):
        server.requests.clear()
        server.replies.clear()
    try:
        yield Harness(runtime, exporter, openai_server, anthropic_server)
    finally:
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
        runtime.shutdown()
        reset_runtime()
