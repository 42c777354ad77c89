"""Time each instrumentation adds to one OpenAI call: burnguard, the official one, OpenLLMetry.

Everything runs in this one process against the same in-process transport (`httpx2.MockTransport`
returning a canned chat completion), so the network is out of the picture and what remains is the
SDK plus the instrumentation. Each instrumentation is installed once; its wrapped
`Completions.create` is then swapped in and out of the class, so instrumented and baseline
(uninstrumented, same client) rounds alternate and share the machine's drift. The added time is
p50(instrumented) - p50(baseline), likewise p99, in microseconds of this thread's CPU time
(`time.thread_time_ns`), so a busy shared machine inflates the figures less than wall time would.

Pipelines: burnguard with what `configure()` builds (baggage attribution, pricing, duplicate
marker, batch export — to an exporter that drops the batches); each peer with a TracerProvider and
a BatchSpanProcessor to the same dropping exporter. `burnguard_enforce` has a BudgetGuard that
consults its (empty) signal state before each call. `burnguard+routing` adds the routing decision
(docs/ARCHITECTURE.md §12) on top: four routing rules, providers, a context budget on another feature, calls
attributed to the `extract` feature so a rule matches and rewrites the model to the economy class.
The decision path's own cost is `routing - enforce`; the decision path alone (with three matching
warn signals, local accounting, a step cap) is timed in a loop as well.

    .venv/bin/python bench/instrumentation_overhead.py [--calls 4000] [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.pop("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", None)
os.environ["TRACELOOP_TRACE_CONTENT"] = "false"  # OpenLLMetry records prompts by default

import httpx2
import openai
import openai.resources.chat.completions.completions as chat_module
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Fine, thanks.", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
).encode()
MESSAGES = [{"role": "user", "content": "How are you?"}]


class DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_client() -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=REPLY, headers={"content-type": "application/json"})

    return openai.OpenAI(
        base_url="http://bench.invalid/v1",
        api_key="bench",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


def peer_provider() -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=100_000))
    return provider


ROUTING_YAML = """\
model_classes:
  premium:  [gpt-4.1, o3, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy:  [gpt-4.1-nano, claude-haiku-4-5]
downgrade: {gpt-4.1: gpt-4.1-mini, gpt-4.1-mini: gpt-4.1-nano, claude-opus-4-1: claude-sonnet-4-5}
providers:
  openai:    {premium: gpt-4.1, standard: gpt-4.1-mini, economy: gpt-4.1-nano}
  anthropic: {premium: claude-opus-4-1, standard: claude-sonnet-4-5, economy: claude-haiku-4-5}
routes:
  - {id: high-stakes, match: {stakes: high}, use: premium}
  - {id: legal, match: {workflow: "legal-*"}, use: premium}
  - {id: acme-summaries, match: {tenant: acme, feature: summarize}, use: standard}
  - {id: routine, match: {feature: [extract, classify]}, use: economy}
context_budgets:
  - {id: summarize-context, feature: summarize, max_input_tokens: 8000}
"""


def routing_config() -> Any:
    from burnguard.contracts.budgets import parse_budget_yaml

    return parse_budget_yaml(ROUTING_YAML, source="bench routing")


@contextlib.contextmanager
def extract_feature() -> Iterator[None]:
    from burnguard.instrumentation import attribute

    with attribute(tenant="acme", feature="extract"):
        yield


def install_burnguard(enforce: bool, routing: bool = False) -> Callable[[], None]:
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.instrumentation import configure
    from burnguard.instrumentation.guard import BudgetGuard
    from burnguard.instrumentation.openai import OpenAIInstrumentor
    from burnguard.instrumentation.runtime import Settings, reset_runtime

    reset_runtime()
    budgets = routing_config() if routing else None
    runtime = configure(
        Settings(), service_name="bench", exporter=DropExporter(), budgets=budgets, set_global=False
    )
    if enforce:
        runtime.guard = BudgetGuard(KafkaSettings(), Topics(), runtime.budgets)  # never started: no signals
    instrumentor = OpenAIInstrumentor()
    instrumentor.uninstrument()  # a second configuration: wrap anew with this runtime's provider
    instrumentor.instrument(tracer_provider=runtime.tracer_provider)
    return lambda: None


def install_official() -> Callable[[], None]:
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    OpenAIInstrumentor().instrument(tracer_provider=peer_provider())
    return lambda: None


def install_openllmetry() -> Callable[[], None]:
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    OpenAIInstrumentor().instrument(tracer_provider=peer_provider())
    return lambda: None


def timed_calls(
    client: openai.OpenAI, n: int, context: Callable[[], Any] = contextlib.nullcontext
) -> list[float]:
    create = client.chat.completions.create
    out = []
    clock = time.thread_time_ns  # CPU time of this thread: other processes on a shared machine do not count
    with context():
        for _ in range(n):
            start = clock()
            create(model="gpt-4.1", messages=MESSAGES)
            out.append((clock() - start) / 1000)
    return out


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def measure(
    name: str,
    install: Callable[[], Any],
    calls: int,
    rounds: int,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> dict[str, float]:
    original = chat_module.Completions.__dict__["create"]
    install()
    wrapped = chat_module.Completions.__dict__["create"]
    assert wrapped is not original, f"{name} did not wrap Completions.create"
    client = make_client()
    chat_module.Completions.create = wrapped
    timed_calls(client, 300, context)  # warm-up: imports, price lookups, connection
    base: list[float] = []
    inst: list[float] = []
    gc.disable()
    try:
        for _ in range(rounds):
            chat_module.Completions.create = original
            base += timed_calls(client, calls // rounds, context)
            chat_module.Completions.create = wrapped
            inst += timed_calls(client, calls // rounds, context)
            gc.collect()
    finally:
        gc.enable()
        chat_module.Completions.create = original
    result = {
        "base_p50": quantile(base, 0.50),
        "base_p99": quantile(base, 0.99),
        "p50": quantile(inst, 0.50) - quantile(base, 0.50),
        "p99": quantile(inst, 0.99) - quantile(base, 0.99),
    }
    print(
        f"{name:18s} added p50 {result['p50']:7.1f} us   p99 {result['p99']:7.1f} us"
        f"   (baseline p50 {result['base_p50']:.1f} us, p99 {result['base_p99']:.1f} us)",
        flush=True,
    )
    return result


def bare_span_cost(spans: int = 4000) -> float:
    """p50 CPU time of one plain SDK span (start, a few attributes, end, batch queue): the floor
    under any OpenTelemetry instrumentation on this machine, printed for scale."""
    tracer = peer_provider().get_tracer("bench")
    clock, costs = time.thread_time_ns, []
    for _ in range(spans):
        start = clock()
        with tracer.start_as_current_span("chat gpt-4.1") as span:
            span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4.1"})
        costs.append((clock() - start) / 1000)
    return quantile(costs, 0.50)


def decision_cost(calls: int = 20_000) -> float:
    """p50 CPU time of the whole decision path of one routed call, as `start_llm_call` runs it:
    attribution and stakes read from the baggage, `decide_call` (rule match, three matching warn
    signals with local accounting, a reservation, a session step cap), and the reservation
    settled when the call ends."""
    from datetime import UTC, datetime, timedelta

    from burnguard.contracts.signals import Signal
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.instrumentation import attribute
    from burnguard.instrumentation.attribution import current_attribution, current_stakes
    from burnguard.instrumentation.decisions import CallRequest, decide_call
    from burnguard.instrumentation.guard import BudgetGuard
    from burnguard.instrumentation.steps import LLM_CALLS, StepCounter

    config = routing_config()
    guard = BudgetGuard(KafkaSettings(), Topics(), config)
    now = datetime.now(UTC)
    for scope, key in (("tenant", "acme"), ("user", "u-1"), ("feature", "extract")):
        guard.apply(
            Signal(
                scope=scope,
                key=key,
                budget=f"{scope}-daily",
                action="warn",
                spent=1.0,
                limit=1e9,
                ratio=0.75,
                window_start=now - timedelta(hours=1),
                window_end=now + timedelta(days=1),
                issued_at=now,
                expires_at=now + timedelta(days=1),
            )
        )
    steps = StepCounter()
    steps.declare("s-1", {LLM_CALLS: calls * 2})
    clock, costs = time.thread_time_ns, []
    with attribute(tenant="acme", user="u-1", feature="extract", session="s-1"):
        for _ in range(calls):
            start = clock()
            request = CallRequest("gpt-4.1", "openai", "chat", current_attribution(), current_stakes())
            decision = decide_call(request, config, guard, steps=steps)
            decision.reservation.settle(0.0001, {})
            costs.append((clock() - start) / 1000)
    assert decision.model == "gpt-4.1-nano" and decision.allowed
    return quantile(costs, 0.50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calls", type=int, default=4000, help="calls per configuration (and as many baseline)"
    )
    parser.add_argument("--rounds", type=int, default=8, help="alternations of baseline and instrumented")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, openai {openai.__version__}, {args.calls} calls per configuration"
    )
    results = {
        "burnguard": measure("burnguard", lambda: install_burnguard(False), args.calls, args.rounds),
        "burnguard_enforce": measure(
            "burnguard+enforce", lambda: install_burnguard(True), args.calls, args.rounds
        ),
        "burnguard_routing": measure(
            "burnguard+routing",
            lambda: install_burnguard(True, True),
            args.calls,
            args.rounds,
            extract_feature,
        ),
        "openai_v2": measure("openai-v2", install_official, args.calls, args.rounds),
        "openllmetry": measure("openllmetry", install_openllmetry, args.calls, args.rounds),
    }
    b, v2, ol = results["burnguard"], results["openai_v2"], results["openllmetry"]
    routing_added = results["burnguard_routing"]["p50"] - results["burnguard_enforce"]["p50"]
    decide_us = decision_cost()
    print(f"for scale: one bare SDK span costs p50 {bare_span_cost():.1f} us of CPU here")
    print(
        f"routing decision path: +{routing_added:.1f} us p50 per call over burnguard+enforce; "
        f"the decision path alone p50 {decide_us:.1f} us"
    )
    print(
        "RESULT instrumentation_overhead "
        f"burnguard_p50_us={b['p50']:.0f} burnguard_p99_us={b['p99']:.0f} "
        f"openai_v2_p50_us={v2['p50']:.0f} openllmetry_p50_us={ol['p50']:.0f} "
        f"decision_path_p50_us={routing_added:.0f} decide_call_p50_us={decide_us:.1f}"
    )


if __name__ == "__main__":
    main()
