"""Routing visibility end to end: an instrumented app with routing rules, escalation and a step cap,
the real Kafka broker, the Faust worker and the ClickHouse sink.

The app's calls go through the real OpenAI client to a local server that speaks its API. The
worker counts the call mix of the tenant's budget window and says it in the signal's reason; the
sink's rollup counts the same fallbacks, escalations and refusals.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.instrumentation import Settings
from burnguard.instrumentation.openai import OpenAIInstrumentor
from burnguard.instrumentation.runtime import reset_runtime
from burnguard.instrumentation.steps import step_counter

import burnguard
from burnguard.cli.devstack import wait_until_consumed
from tests.fakes.openai_api import FakeOpenAI
from tests.fixtures.pipeline import Pipeline

BUDGETS = """
model_classes:
  premium:  [gpt-4.1]
  standard: [gpt-4.1-mini]
  economy:  [gpt-4.1-nano]
downgrade: {gpt-4.1: gpt-4.1-mini, gpt-4.1-mini: gpt-4.1-nano}
providers:
  openai: {premium: gpt-4.1, standard: gpt-4.1-mini, economy: gpt-4.1-nano}
routes:
  - {id: routine, match: {feature: extract}, use: economy}
budgets:
  - id: tenant-calls
    scope: tenant
    window: day
    metric: calls
    limit: 100
    actions:
      - {at: 0.01, do: warn}
      - {at: 1.0, do: throttle}
"""
MESSAGES = [{"role": "user", "content": "Extract the city from: 'I live in Paris.' Answer as JSON."}]


def is_json(reply: Any) -> Any:
    return json.loads(reply.choices[0].message.content)


@pytest.mark.slow
def test_fallbacks_escalation_cost_and_refusals_reach_the_signal_reason_and_clickhouse(
    pipeline: Pipeline,
) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env["BURNGUARD_SIGNAL_REFRESH_S"] = "1"
    pipeline.start_worker()
    sink = pipeline.start_sink()
    settings = Settings(kafka=pipeline.kafka, topics=pipeline.topics, enforce=True)
    runtime = burnguard.configure(settings, budgets=parse_budget_yaml(BUDGETS), batch=False, set_global=False)
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=runtime.tracer_provider)
    try:
        with FakeOpenAI() as server:
            server.replies.update({"gpt-4.1-nano": "Paris", "gpt-4.1-mini": '{"city": "Paris"}'})
            client = server_client(server)
            with burnguard.attribute(tenant="acme"), burnguard.session("run-1", max_llm_calls=5):
                with burnguard.attribute(feature="extract"):
                    client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)  # routed down
                    with burnguard.escalate_on(is_json):  # routed down, fails the check, retried up
                        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
                with burnguard.attribute(feature="translate"):
                    client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
                    client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
                    with pytest.raises(burnguard.StepCapExceeded):  # the sixth call of the session
                        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
            assert server.models == ["gpt-4.1-nano", "gpt-4.1-nano", "gpt-4.1-mini", "gpt-4.1", "gpt-4.1"]
    finally:
        instrumentor.uninstrument()
        runtime.flush()
        runtime.shutdown()
        reset_runtime()
        step_counter.clear()

    escalation_usd = PriceBook().price("gpt-4.1-mini", "openai", input_tokens=120, output_tokens=30)
    assert escalation_usd
    mix = f"5 calls, 40.0% fell back to cheaper models, escalations cost ${escalation_usd:.4f}, 1 refused"
    # Refreshes re-issue the warn with the reason as of now, so the final mix shows up.
    signal = pipeline.wait_for_signal(
        lambda s: s.budget == "tenant-calls" and mix in s.reason, f"saying {mix!r}", timeout_s=60
    )
    assert (signal.key, signal.spent) == ("acme", 5.0)  # the refused call is not a call of the budget

    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    stored = pipeline.clickhouse_query(
        "[int(v) if i != 4 else round(v, 9) for i, v in enumerate(client.query("
        "'SELECT sum(model_calls), sum(fallback_calls), sum(routed_calls), sum(escalated_calls),"
        " sum(escalation_cost_usd), sum(refused_calls) FROM genai_usage_1m').result_rows[0])]"
    )
    assert stored == [5, 2, 2, 1, round(escalation_usd, 9), 1]


def server_client(server: FakeOpenAI) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
