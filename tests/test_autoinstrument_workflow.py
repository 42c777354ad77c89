"""Workflows, tools and user actions as spans; the guard's decisions as OpenTelemetry metrics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.metrics import register_guard_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import StatusCode

import burnguard
from tests.fakes.harness import Harness, anthropic_server_fixture, harness_fixture, openai_server_fixture  # noqa: F401


@burnguard.tool
def lookup(city: str) -> str:
    return f"sunny in {city}"


@burnguard.tool(name="search_tickets")
async def search(query: str) -> list[str]:
    if not query:
        raise ValueError("empty query")
    return [query]


def test_workflow_root_span_says_success_and_attributes_its_calls(harness: Harness) -> None:
    with burnguard.attribute(tenant="acme"), burnguard.workflow("triage", action="click-42"):
        harness.openai().chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
        assert lookup("Paris") == "sunny in Paris"
    with pytest.raises(ValueError), burnguard.workflow("triage"):
        asyncio.run(search(""))
    spans = {s.name: s for s in harness.spans()}
    ok_root = next(s for s in harness.spans() if s.name == "workflow triage" and s.status.is_ok)
    failed_root = next(s for s in harness.spans() if s.name == "workflow triage" and not s.status.is_ok)
    assert (
        ok_root.status.status_code == StatusCode.OK
        and ok_root.attributes["burnguard.workflow.success"] is True
    )
    assert failed_root.status.status_code == StatusCode.ERROR
    assert failed_root.attributes["burnguard.workflow.success"] is False
    assert failed_root.attributes["error.type"] == "ValueError"
    call = spans["chat gpt-4.1"]
    assert call.parent.span_id == ok_root.context.span_id
    assert (
        call.attributes["burnguard.workflow"] == "triage"
        and call.attributes["burnguard.action"] == "click-42"
    )
    tool = spans["execute_tool lookup"]
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "lookup" and tool.attributes["burnguard.tenant"] == "acme"
    failed_tool = spans["execute_tool search_tickets"]
    assert (
        failed_tool.status.status_code == StatusCode.ERROR
        and failed_tool.attributes["error.type"] == "ValueError"
    )
    decoded = {u.name: u for u in decode_usage(encode_spans(harness.spans()).SerializeToString())}
    assert decoded["execute_tool lookup"].is_tool_call
    assert decoded["chat gpt-4.1"].is_model_call and decoded["chat gpt-4.1"].workflow == "triage"


def test_user_action_generates_an_id(harness: Harness) -> None:
    with burnguard.user_action() as action_id:
        harness.openai().embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(action_id) == 32
    assert harness.only_call().attributes["burnguard.action"] == action_id


def test_stale_guard_fails_open_and_says_so_in_a_metric(harness: Harness) -> None:
    now = datetime.now(UTC)
    config = parse_budget_yaml("budgets: []")
    guard = BudgetGuard(KafkaSettings(), Topics(), config, fail_mode="open")
    guard.apply(
        Signal(
            scope="tenant",
            key="acme",
            budget="tenant-daily",
            action="throttle",
            spent=60,
            limit=50,
            ratio=1.2,
            window_start=now - timedelta(hours=1),
            window_end=now + timedelta(hours=1),
            issued_at=now - timedelta(minutes=10),
            expires_at=now - timedelta(minutes=5),  # nobody refreshed it: stale
        )
    )
    harness.runtime.guard = guard
    reader = InMemoryMetricReader()
    register_guard_metrics(MeterProvider(metric_readers=[reader]))
    with burnguard.attribute(tenant="acme"):
        harness.openai().chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
        )
    assert harness.openai_server.models == ["gpt-4.1"]  # open: the stale throttle did not refuse the call
    points = {
        metric.name: metric.data.data_points[0].value
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert points["burnguard.guard.stale_decisions"] == 1
    assert points["burnguard.guard.denied"] == 0
