"""The whole loop with real parts: app -> Kafka -> Faust worker -> signal -> guard, and ClickHouse.

An instrumented caller spends against a tenant's daily budget through a local
HTTP "model" server. The real worker publishes the throttle, the app's guard
refuses the next call before any request reaches the server, and the sink has
written every span to ClickHouse with totals equal to what the app recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.compacted_topics import read_compacted_topic
from burnguard.contracts.signal_checkpoints import decode_parts
from burnguard.contracts.signals import Signal
from burnguard.instrumentation import Settings
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.runtime import reset_runtime

import burnguard
from burnguard.cli.devstack import wait_until_consumed
from tests.factories import LADDER_YAML, WARN_DOWNGRADE_THROTTLE, budget, budgets_yaml
from tests.fixtures.pipeline import Pipeline, read_to_end

BUDGETS = budgets_yaml(
    budget("tenant-daily", 0.05, match="*", window="day", actions=WARN_DOWNGRADE_THROTTLE), head=LADDER_YAML
)
INPUT_TOKENS, OUTPUT_TOKENS = 2_000, 500  # gpt-4.1: $0.008 a call, gpt-4.1-mini: $0.0016


class ModelServer(ThreadingHTTPServer):
    """A stand-in model endpoint that counts the requests it receives."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat"


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        reply = json.dumps(
            {"model": body["model"], "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    server = ModelServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def call_model(server: ModelServer, tenant: str, recorded: dict[str, float], calls: list[str]) -> None:
    """One instrumented call: guard first, then the HTTP request, then the usage on the span."""
    with burnguard.attribute(tenant=tenant, workflow="e2e"), burnguard.llm_call("gpt-4.1", "openai") as call:
        reply = httpx.post(server.url, json={"model": call.model}).json()
        call.set_usage(reply["usage"]["input_tokens"], reply["usage"]["output_tokens"])
    recorded[tenant] = recorded.get(tenant, 0.0) + (call.cost_usd or 0.0)
    calls.append(call.model)


def read_signals(pipeline: Pipeline) -> list[Signal]:
    return [
        Signal.from_json(r.value)
        for r in read_to_end(pipeline.broker.bootstrap, pipeline.topics.signals)
        if r.value
    ]


def assert_a_new_guard_starts_throttled_from_the_workers_checkpoint(
    pipeline: Pipeline, budgets: BudgetConfig
) -> None:
    """A process starting now reads the worker's checkpoint, not the whole signals topic."""
    topic = pipeline.topics.signal_checkpoints
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts, problems = decode_parts(read_compacted_topic(pipeline.kafka, topic))
        assert problems == []
        kept = [value for part in parts for _, value in part.records]
        if any(b'"key":"acme"' in value and b'"action":"throttle"' in value for value in kept):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the worker never checkpointed acme's throttle")
    guard = BudgetGuard(pipeline.kafka, pipeline.topics, budgets).start(wait_s=30)
    try:
        assert guard.ready and guard.stats.checkpoint_partitions > 0
        assert guard.check(attribution={"tenant": "acme"}).action == "deny"
        assert guard.check(attribution={"tenant": "quiet-co"}).allowed
    finally:
        guard.stop()


@pytest.mark.slow
def test_tenant_over_budget_is_throttled_and_history_is_exact(
    pipeline: Pipeline, model_server: ModelServer
) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.start_worker()
    sink = pipeline.start_sink()
    budgets = parse_budget_yaml(BUDGETS)
    settings = Settings(kafka=pipeline.kafka, topics=pipeline.topics, enforce=True)
    runtime = burnguard.configure(settings, budgets=budgets, batch=False, set_global=False)
    recorded: dict[str, float] = {}
    calls: list[str] = []
    try:
        call_model(model_server, "quiet-co", recorded, calls)
        refused = None
        deadline = time.monotonic() + 90
        while refused is None and time.monotonic() < deadline:
            try:
                call_model(model_server, "acme", recorded, calls)
            except burnguard.BudgetExceeded as exc:
                refused = exc
            time.sleep(0.2)
        assert refused is not None, "acme was never throttled"
        requests_before = len(model_server.requests)
        with pytest.raises(burnguard.BudgetExceeded):
            call_model(model_server, "acme", recorded, calls)
        assert len(model_server.requests) == requests_before, "a refused call reached the server"
        call_model(model_server, "quiet-co", recorded, calls)  # other tenants are not affected
        assert len(model_server.requests) == requests_before + 1
        assert_a_new_guard_starts_throttled_from_the_workers_checkpoint(pipeline, budgets)
    finally:
        runtime.flush()
        runtime.shutdown()
        reset_runtime()

    message = str(refused)
    assert "tenant-daily" in message and "0.05" in message and "resets at" in message
    assert refused.limit == 0.05 and refused.spent >= 0.05
    assert refused.resets_at.hour == 0 and refused.resets_at > refused.signal.window_start
    assert "gpt-4.1-mini" in calls, "the downgrade signal never changed the model"
    assert runtime.exporter.stats.spans_failed == 0 and runtime.exporter.stats.spans_dropped == 0

    acme_actions = [s.action for s in read_signals(pipeline) if s.key == "acme"]
    changes = [a for i, a in enumerate(acme_actions) if i == 0 or acme_actions[i - 1] != a]  # no refreshes
    assert changes[:3] == ["warn", "downgrade", "throttle"]

    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    # One reading process for the three figures: each one starts Python, chDB and the schema check.
    stored, count, refused_calls = pipeline.clickhouse_query(
        "[queries.spend_by_tenant(client), queries.span_count(client),"
        ' int(client.command("SELECT count() FROM genai_spans FINAL'
        " WHERE refused = 'budget' AND cost_usd = 0\"))]"
    )
    assert refused_calls == 2  # the two refused calls are on record, as calls that cost nothing
    assert count == len(calls) + refused_calls
    assert stored.keys() == recorded.keys()
    for tenant, spent in recorded.items():
        assert stored[tenant] == pytest.approx(spent, rel=1e-9), tenant
