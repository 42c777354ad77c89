"""Synthetic OTLP span load for the budget engine benchmarks.

Messages are `ExportTraceServiceRequest`s built directly with the
opentelemetry-proto classes (the SDK would be far slower than the worker
under test), shaped like what burnguard's `KafkaSpanExporter` writes: one
message per tenant per export batch, the tenant as the Kafka key. Spans
come from agent sessions: each session belongs to one tenant, user,
workflow, feature and service, and makes a few LLM calls and tool calls.
Most LLM spans carry `burnguard.cost.usd` (our instrumentation prices them);
some come from another instrumentation without a cost, so the stream prices
them; some are plain HTTP spans that the stream skips.

Everything is seeded, and `SpanMix.expected` keeps what the stream must count.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from burnguard.contracts import attributes as attr
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

#: (model, provider, class, USD per input token, USD per output token)
MODELS = [
    ("gpt-4.1", "openai", "premium", 2.0e-6, 8.0e-6),
    ("o3", "openai", "premium", 2.0e-6, 8.0e-6),
    ("claude-sonnet-4-5", "anthropic", "standard", 3.0e-6, 15.0e-6),
    ("gpt-4.1-mini", "openai", "standard", 0.4e-6, 1.6e-6),
    ("gpt-4.1-nano", "openai", "economy", 0.1e-6, 0.4e-6),
    ("claude-haiku-4-5", "anthropic", "economy", 1.0e-6, 5.0e-6),
]
MODEL_WEIGHTS = [20, 5, 15, 30, 20, 10]
TOOLS = ["search_docs", "run_sql", "fetch_url", "send_email", "read_file", "calculator"]
WORKFLOWS = [f"wf-{name}" for name in ("support", "triage", "summarize", "research", "codegen", "billing")]
WORKFLOWS += [f"wf-batch-{n}" for n in range(24)]
FEATURES = [f"feature-{n:02d}" for n in range(20)]
SERVICES = [f"svc-{n}" for n in range(10)]

#: The model classes and ladder the budget files use; the generator's classes agree with them.
MODEL_CONFIG_YAML = """\
model_classes:
  premium: [gpt-4.1, o3]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy: [gpt-4.1-nano, claude-haiku-4-5]
downgrade:
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
  o3: gpt-4.1-mini
  claude-sonnet-4-5: claude-haiku-4-5
"""


#: Budgets over every scope, combination, window kind and metric. With the default load a few
#: percent of the keys cross a rung (signals are part of the work), most do not.
BUDGETS_YAML = (
    MODEL_CONFIG_YAML
    + """\
budgets:
  - {id: tenant-daily, scope: tenant, window: day, limit: 2,
     actions: [{at: 0.7, do: warn}, {at: 0.85, do: downgrade, to: standard}, {at: 1.0, do: throttle}]}
  - {id: tenant-monthly, scope: tenant, window: month, limit: 50}
  - {id: tenant-hourly-tokens, scope: tenant, window: 1h, metric: tokens, limit: 1.0e6}
  - {id: tenant-tokyo-day, scope: tenant, window: day, timezone: Asia/Tokyo, limit: 100}
  - {id: enterprise-daily, scope: tenant, match: "ent-*", window: day, limit: 500}
  - {id: one-tenant-30d, scope: tenant, match: tenant-0001, window: 30d, limit: 2000}
  - {id: user-daily, scope: user, window: day, limit: 0.06,
     actions: [{at: 0.8, do: warn}, {at: 1.0, do: throttle}]}
  - {id: user-calls-24h, scope: user, window: 24h, metric: calls, limit: 20}
  - {id: user-input-1h, scope: user, window: 1h, metric: input_tokens, limit: 2.0e6}
  - {id: workflow-daily, scope: workflow, window: day, limit: 5000}
  - {id: feature-hourly, scope: feature, window: 1h, limit: 1000}
  - {id: model-class-month, scope: model_class, window: month, limit: 1.0e6}
  - {id: premium-week, scope: model_class, match: premium, window: week, limit: 1.0e5}
  - {id: session-tools, scope: session, window: session, metric: tool_calls, limit: 10}
  - {id: session-cost, scope: session, window: session, limit: 0.05}
  - {id: service-calls, scope: service, window: month, metric: calls, limit: 1.0e12}
  - {id: service-tool-calls, scope: service, window: month, metric: tool_calls, limit: 1.0e12}
  - {id: tenant-feature-daily, scope: [tenant, feature], window: day, limit: 0.15,
     actions: [{at: 0.85, do: downgrade}, {at: 1.0, do: throttle}]}
  - {id: tenant-workflow-week, scope: [tenant, workflow], window: week, limit: 200}
  - {id: tenant-class-day, scope: [tenant, model_class], window: day, metric: tokens, limit: 2.0e7}
"""
)


#: The `SpanMix` fields a bench's command line may set.
_KNOBS = ("plain_fraction", "batch_min", "batch_max", "tenants", "users_per_tenant", "calls_per_session")


@dataclass
class SpanMix:
    """Knobs of the synthetic load and what it has produced so far."""

    tenants: int = 200
    users_per_tenant: int = 100
    seed: int = 7
    #: spans per message: what one export batch of one tenant holds
    batch_min: int = 40
    batch_max: int = 260
    #: fraction of LLM spans written by another instrumentation, without a cost
    unpriced_fraction: float = 0.1
    #: fraction of spans that are not GenAI at all (HTTP client spans)
    plain_fraction: float = 0.08
    #: the span end times lie in the last `spread_s` seconds before generation
    spread_s: float = 600.0
    #: 0: every message starts new sessions (each session's spans in one message). N > 0: a
    #: user's session goes on across messages until it has made N spans (model, tool and HTTP
    #: calls), as a real agent's session does; the same session, workflow and feature keys recur.
    calls_per_session: int = 0
    spans: int = 0
    model_calls: int = 0
    tool_spans: int = 0
    #: what a `tool_calls` budget counts: tool spans plus tool calls requested by LLM calls
    tool_calls: int = 0
    calls_by_user: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(init=False)
    #: with `calls_per_session`: each user's open session (trace id, attribution, spans left)
    _open: dict[str, list] = field(init=False, default_factory=dict)
    sessions: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SpanMix:
        """The load a bench's command line asks for (`--plain-fraction`, `--batch-min/max`,
        `--tenants`, `--users-per-tenant`, `--calls-per-session`; a missing flag keeps the default)."""
        return cls(**{knob: getattr(args, knob) for knob in _KNOBS if hasattr(args, knob)})

    def tenant(self, index: int) -> str:
        return f"ent-{index:04d}" if index % 10 == 0 else f"tenant-{index:04d}"

    def message(self, tenant_index: int | None = None) -> tuple[bytes, bytes]:
        """(key, value) of one `otlp_spans` message: one tenant's export batch."""
        rng = self.rng
        if tenant_index is None:
            tenant_index = rng.randrange(self.tenants)
        tenant = self.tenant(tenant_index)
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        service = SERVICES[tenant_index % len(SERVICES)]
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = attr.SERVICE_NAME, service
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = "telemetry.sdk.language", "python"
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "burnguard.instrumentation"
        target = rng.randint(self.batch_min, self.batch_max)
        now_ns = time.time_ns()
        made = 0
        while made < target:
            user = f"user-{tenant_index:04d}-{rng.randrange(self.users_per_tenant):03d}"
            made += self._session(scope_spans.spans, tenant, user, now_ns, min(target - made, 12))
        return tenant.encode(), request.SerializeToString()

    def one_call_each(
        self, users: list[str], tenant_index: int = 0, end_ns: int | None = None
    ) -> tuple[bytes, bytes]:
        """One message with exactly one LLM call for each of `users`, ending at `end_ns` (default now)."""
        tenant = self.tenant(tenant_index)
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = attr.SERVICE_NAME, SERVICES[tenant_index % len(SERVICES)]
        spans = resource_spans.scope_spans.add().spans
        now_ns = end_ns or time.time_ns()
        for user in users:
            span = spans.add()
            span.trace_id, span.span_id = os.urandom(16), os.urandom(8)
            span.start_time_unix_nano, span.end_time_unix_nano = now_ns - 1_500_000_000, now_ns
            attribution = ((attr.TENANT, tenant), (attr.USER_ID, user))
            self._llm_span(span, attribution, self.rng)
            self.calls_by_user[user] += 1
            self.spans += 1
        return tenant.encode(), request.SerializeToString()

    def _session(self, spans, tenant: str, user: str, now_ns: int, size: int) -> int:
        """Append up to `size` spans of one agent session; return how many."""
        rng = self.rng
        trace_id, attribution = self._open_session(tenant, user)
        end_ns = now_ns - int(rng.random() * self.spread_s * 1e9)
        count = rng.randint(1, size)
        if self.calls_per_session:
            opened = self._open[user]
            count = min(count, opened[2])
            opened[2] -= count
            if not opened[2]:
                del self._open[user]
        for _ in range(count):
            span = spans.add()
            span.trace_id = trace_id
            span.span_id = os.urandom(8)
            span.parent_span_id = os.urandom(8)
            duration = rng.randint(200_000_000, 4_000_000_000)
            span.start_time_unix_nano = end_ns - duration
            span.end_time_unix_nano = end_ns
            end_ns += rng.randint(10_000_000, 500_000_000)
            roll = rng.random()
            if roll < self.plain_fraction:
                _plain_span(span, rng)
            elif roll < self.plain_fraction + 0.2:
                self._tool_span(span, attribution, rng)
            else:
                self._llm_span(span, attribution, rng)
                self.calls_by_user[user] += 1
            self.spans += 1
        return count

    def _open_session(self, tenant: str, user: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        """(trace id, attribution) of the session `user` makes spans in now: a new one, or its open one."""
        opened = self._open.get(user)
        if opened is not None:
            return opened[0], opened[1]
        rng = self.rng
        trace_id = os.urandom(16)
        session = f"sess-{rng.getrandbits(40):010x}"
        workflow = rng.choice(WORKFLOWS)
        feature = rng.choice(FEATURES)
        attribution = (
            (attr.TENANT, tenant),
            (attr.USER_ID, user),
            (attr.WORKFLOW, workflow),
            (attr.FEATURE, feature),
            (attr.SESSION_ID, session),
        )
        self.sessions += 1
        if self.calls_per_session:
            self._open[user] = [trace_id, attribution, self.calls_per_session]
        return trace_id, attribution

    def _tool_span(self, span: Span, attribution, rng: random.Random) -> None:
        tool = rng.choice(TOOLS)
        span.name = f"execute_tool {tool}"
        span.kind = Span.SPAN_KIND_INTERNAL
        attributes = span.attributes
        _str(attributes, attr.GEN_AI_OPERATION_NAME, attr.OP_EXECUTE_TOOL)
        _str(attributes, attr.GEN_AI_TOOL_NAME, tool)
        _str(attributes, attr.GEN_AI_TOOL_CALL_ID, f"call_{rng.getrandbits(48):012x}")
        for key, value in attribution:
            _str(attributes, key, value)
        self.tool_spans += 1
        self.tool_calls += 1

    def _llm_span(self, span: Span, attribution, rng: random.Random) -> None:
        model, provider, model_class, input_rate, output_rate = rng.choices(MODELS, MODEL_WEIGHTS)[0]
        span.name = f"chat {model}"
        span.kind = Span.SPAN_KIND_CLIENT
        input_tokens = int(rng.lognormvariate(7.0, 1.0)) + 20
        output_tokens = int(rng.lognormvariate(5.0, 0.8)) + 1
        attributes = span.attributes
        _str(attributes, attr.GEN_AI_OPERATION_NAME, attr.OP_CHAT)
        _str(attributes, attr.GEN_AI_PROVIDER_NAME, provider)
        _str(attributes, attr.GEN_AI_REQUEST_MODEL, model)
        _str(attributes, attr.GEN_AI_RESPONSE_MODEL, model)
        _str(attributes, attr.GEN_AI_RESPONSE_ID, f"resp_{rng.getrandbits(64):016x}")
        _int(attributes, attr.GEN_AI_USAGE_INPUT_TOKENS, input_tokens)
        _int(attributes, attr.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
        if rng.random() < 0.3:
            _int(attributes, attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, input_tokens // 2)
        if rng.random() < 0.25:
            requested = rng.randint(1, 3)
            _int(attributes, attr.TOOL_CALLS, requested)
            self.tool_calls += requested
        for key, value in attribution:
            _str(attributes, key, value)
        if rng.random() >= self.unpriced_fraction:  # ours: priced and classed in the app
            _str(attributes, attr.MODEL_CLASS, model_class)
            kv = attributes.add()
            kv.key = attr.COST_USD
            kv.value.double_value = input_tokens * input_rate + output_tokens * output_rate
        self.model_calls += 1


def _plain_span(span: Span, rng: random.Random) -> None:
    span.name = "POST /v1/internal"
    span.kind = Span.SPAN_KIND_CLIENT
    _str(span.attributes, "http.request.method", "POST")
    _str(span.attributes, "url.full", f"https://internal.example/api/{rng.randrange(100)}")
    _int(span.attributes, "http.response.status_code", 200)


def _str(attributes, key: str, value: str) -> None:
    kv = attributes.add()
    kv.key = key
    kv.value.string_value = value


def _int(attributes, key: str, value: int) -> None:
    kv = attributes.add()
    kv.key = key
    kv.value.int_value = value


def count_spans(payload: bytes) -> int:
    """Spans in one `otlp_spans` message (the raw baseline's whole work besides consuming)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    return sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
