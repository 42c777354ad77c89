"""Fuzzing decoding and accounting: numeric extremes and mutated payloads never escape as NaN,
infinity, a negative total or an exception.

What the stream does with a message, in process: `decode_spans` (rejecting bad
spans), the clock correction, `usage_deltas` (pricing, the `unpriced:` rule),
`WindowTotals.add` and `decide` (which builds a schema-valid `Signal`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.otlp import MalformedSpans, decode_spans
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.span_checks import DEFAULT_LIMITS, correct_clock, span_problem
from burnguard.stream.accounting import BatchStats, WindowTotals, usage_deltas
from burnguard.stream.policy import signal_for_window
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.support.byte_mutations import mutate

#: Every test here runs over both decoders (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("decode_impl")

CONFIG = parse_budget_yaml(
    """
budgets:
  - {id: cost, scope: tenant, window: day, metric: cost_usd, limit: 5}
  - {id: tokens, scope: [tenant, feature], window: week, metric: tokens, limit: 1000}
  - {id: inputs, scope: user, window: 1h, metric: input_tokens, limit: 1000}
  - {id: tools, scope: tenant, window: day, metric: tool_calls, limit: 10}
  - {id: calls, scope: service, window: month, metric: calls, limit: 10}
"""
)
PRICES = PriceBook.for_config(CONFIG)
NOW = datetime.now(UTC)
NOW_NS = int(NOW.timestamp() * 1e9)
NUMERIC_KEYS = [
    attr.COST_USD,
    attr.GEN_AI_USAGE_INPUT_TOKENS,
    attr.GEN_AI_USAGE_OUTPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    attr.GEN_AI_USAGE_PROMPT_TOKENS,
    attr.TOOL_CALLS,
]
TEXT_KEYS = [attr.TENANT, attr.FEATURE, attr.USER_ID, attr.GEN_AI_REQUEST_MODEL, attr.GEN_AI_OPERATION_NAME]

extreme_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, -1e6, 1e4, 2.0**63]
    ),
)
extreme_ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([-(2**63), -1, 0, 2**62, 2**63 - 1, 10**8, 10**8 + 1]),
)
numeric_text = st.sampled_from(["nan", "inf", "-inf", "1e400", "-5", "12.5", "0x10", "", " 7 ", "lots"])
values = st.one_of(
    extreme_floats.map(lambda v: AnyValue(double_value=v)),
    extreme_ints.map(lambda v: AnyValue(int_value=v)),
    numeric_text.map(lambda v: AnyValue(string_value=v)),
    st.text(max_size=300).map(lambda v: AnyValue(string_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.binary(max_size=20).map(lambda v: AnyValue(bytes_value=v)),
    st.just(AnyValue()),
)
attribute_maps = st.dictionaries(st.sampled_from(NUMERIC_KEYS + TEXT_KEYS), values, max_size=10)
operations = st.sampled_from(["chat", "embeddings", "execute_tool", "text_completion", "invoke_agent"])
times = st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.just(NOW_NS))


def request(spans: list[tuple[str, dict[str, AnyValue], int, int]]) -> bytes:
    message = ExportTraceServiceRequest()
    scope = message.resource_spans.add().scope_spans.add()
    for operation, attributes, start_ns, end_ns in spans:
        span = scope.spans.add(name="fuzz", start_time_unix_nano=start_ns, end_time_unix_nano=end_ns)
        span.span_id, span.trace_id = b"\x01" * 8, b"\x02" * 16
        span.attributes.append(
            KeyValue(key=attr.GEN_AI_OPERATION_NAME, value=AnyValue(string_value=operation))
        )
        span.attributes.append(KeyValue(key=attr.TENANT, value=AnyValue(string_value="acme")))
        span.attributes.extend(KeyValue(key=key, value=value) for key, value in attributes.items())
    return message.SerializeToString()


def account(payload: bytes) -> None:
    """The stream's path for one message; asserts every number it produces is finite and non-negative."""
    try:
        decoded = decode_spans(payload)
    except MalformedSpans:
        return
    for usage in decoded.usages:
        assert span_problem(usage, DEFAULT_LIMITS) is None
        correct_clock(usage, NOW_NS, DEFAULT_LIMITS.clock_ahead_ns, DEFAULT_LIMITS.clock_behind_ns)
        assert NOW_NS - DEFAULT_LIMITS.clock_behind_ns <= (usage.end_ns or usage.start_ns)
    for rejected in decoded.rejected:
        assert rejected.reason and ExportTraceServiceRequest.FromString(rejected.request).resource_spans
    stats = BatchStats()
    closed_before_ns = NOW_NS - 3600 * 10**9
    deltas = usage_deltas(decoded.usages, CONFIG, PRICES, stats, (0, 1), closed_before_ns)
    for delta in deltas:
        assert math.isfinite(delta.amount) and delta.amount >= 0, delta
        assert all(math.isfinite(value) and value >= 0 for value in delta.mix or ())
        totals = WindowTotals()
        assert totals.add(0, 1, delta.amount, delta.spans, delta.first_event_ns, delta.last_event_ns, 0)
        assert math.isfinite(totals.spent) and totals.spent >= 0
        budget = CONFIG.budget(delta.budget)
        assert budget is not None
        signal = signal_for_window(
            budget, delta.key, delta.window_start_ns, totals, NOW, timedelta(seconds=60)
        )
        assert signal.spent >= 0 and math.isfinite(signal.ratio) and math.isfinite(signal.burn_rate_per_hour)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(operations, attribute_maps, times, times), min_size=1, max_size=6))
def test_numeric_extremes_never_reach_a_total(spans: list[tuple[str, dict[str, Any], int, int]]) -> None:
    account(request(spans))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with bytes flipped, inserted, deleted or cut off."""
    spans = draw(st.lists(st.tuples(operations, attribute_maps, times, times), min_size=1, max_size=3))
    return mutate(draw, request(spans), max_edits=8, max_inserted=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_payloads_are_rejected_or_counted_sanely(payload: bytes) -> None:
    account(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_malformed(payload: bytes) -> None:
    account(payload)
