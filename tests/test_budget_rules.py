"""The budget rules written once (`contracts.budget_rules`): the stream and the app's guard agree.

The property test drives the same random calls and budgets through the stream's accounting
(`usage_deltas`, as stage 1 runs it) and through the app's guard (`reserve` / `settle`, its local
accounting between signals), and checks that every budget key holds the same amount on both
sides: same metrics, same scope keys (combined scopes, `service`, `model_class`), same matches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, get_args

from burnguard.contracts import attributes as attr
from burnguard.contracts.budget_rules import (
    METRICS,
    compile_match,
    key_of_span,
    key_of_values,
    metric_value,
    scope_reader,
    span_keys,
)
from burnguard.contracts.budgets import Budget, BudgetConfig, Metric
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.contracts.usage import SpanUsage
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.stream.accounting import usage_deltas
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = datetime(2025, 5, 14, 13, 0, tzinfo=UTC)
NOW_NS = int(NOW.timestamp()) * 1_000_000_000
SERVICE = "api"
MODEL_CLASSES = {"premium": ("gpt-4.1",), "standard": ("gpt-4.1-mini",)}
#: A model outside every class: its calls have no `model_class` key on either side.
MODELS = ("gpt-4.1", "gpt-4.1-mini", "o-other")
DIMENSIONS = ("tenant", "user", "feature", "service", "model_class")
VALUES = ("", "acme", "acme-2", "globex", "team-red")
MATCHES = ("*", "acme", "acme*", "team-?ed", "*/acme", "acme/*", "[ag]*", "premium", "api")


def usage(**fields: Any) -> SpanUsage:
    base: dict[str, Any] = dict(
        trace_id="t", span_id="s", parent_span_id="", name="chat", start_ns=NOW_NS, end_ns=NOW_NS
    )
    return SpanUsage(**{"operation": attr.OP_CHAT, **base, **fields})


# --- the rules, one by one ------------------------------------------------------------------------
def test_the_metric_literal_and_the_rules_list_the_same_metrics() -> None:
    assert get_args(Metric) == METRICS


def test_a_span_and_a_call_with_the_same_values_have_the_same_key() -> None:
    values = {"tenant": "acme", "feature": "summarize"}
    span = usage(tenant="acme", feature="summarize")
    for dimensions in (("tenant",), ("tenant", "feature"), ("feature", "tenant"), ("tenant", "user")):
        assert key_of_values(values, dimensions) == key_of_span(span, dimensions)
        assert span_keys([scope_reader(dimensions)], span) == [key_of_span(span, dimensions)]
    assert key_of_values(values, ("tenant", "feature")) == "acme/summarize"
    assert key_of_values(values, ("tenant", "user")) is None
    assert key_of_values({"tenant": ""}, ("tenant",)) is None


def test_star_compiles_to_no_matcher_and_a_glob_is_case_sensitive() -> None:
    assert compile_match("*") is None
    matcher = compile_match("team-*")
    assert matcher is not None
    assert matcher.matches("team-red") and not matcher.matches("TEAM-red") and not matcher.matches("red")


def test_a_tool_span_is_one_tool_call_and_a_refused_call_counts_nothing() -> None:
    tool = usage(operation=attr.OP_EXECUTE_TOOL, tool_calls=5)
    assert [metric_value(m, tool) for m in METRICS] == [0.0, 0.0, 0.0, 1.0, 0.0]
    refused = usage(refused="budget", input_tokens=9)
    assert metric_value("calls", refused) == 0.0


# --- the property: the stream and the app count the same -------------------------------------------
scopes = st.lists(st.sampled_from(DIMENSIONS), min_size=1, max_size=2, unique=True)
budgets = st.lists(
    st.builds(
        dict,
        scope=scopes,
        match=st.sampled_from(MATCHES),
        metric=st.sampled_from(METRICS),
    ),
    min_size=1,
    max_size=6,
)
calls = st.lists(
    st.builds(
        dict,
        tenant=st.sampled_from(VALUES),
        user=st.sampled_from(VALUES),
        feature=st.sampled_from(VALUES),
        model=st.sampled_from(MODELS),
        input_tokens=st.integers(0, 50_000),
        output_tokens=st.integers(0, 5_000),
        tool_calls=st.integers(0, 4),
        cost_usd=st.floats(0, 5, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=12,
)


def config_of(drawn: list[dict[str, Any]]) -> BudgetConfig:
    budgets = [Budget(id=f"b{index}", limit=1e9, **fields) for index, fields in enumerate(drawn)]
    return BudgetConfig(model_classes=MODEL_CLASSES, budgets=tuple(budgets))


def counted_by_the_stream(config: BudgetConfig, drawn: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    spans = [
        usage(
            tenant=call["tenant"],
            user=call["user"],
            feature=call["feature"],
            service=SERVICE,
            request_model=call["model"],
            input_tokens=call["input_tokens"],
            output_tokens=call["output_tokens"],
            tool_calls=call["tool_calls"],
            cost_usd=call["cost_usd"],
        )
        for call in drawn
    ]
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for delta in usage_deltas(spans, config, PriceBook()):
        totals[(delta.budget, delta.key)] += delta.amount
    return totals


def counted_by_the_app(config: BudgetConfig, drawn: list[dict[str, Any]]) -> BudgetGuard:
    guard = BudgetGuard(KafkaSettings(), Topics(), config, clock=lambda: NOW)
    guard.service = SERVICE
    for call in drawn:
        attribution = {d: call[d] for d in ("tenant", "user", "feature") if call[d]}
        reservation = guard.reserve(call["model"], attribution)
        reservation.settle(
            call["cost_usd"],
            {
                attr.GEN_AI_USAGE_INPUT_TOKENS: call["input_tokens"],
                attr.GEN_AI_USAGE_OUTPUT_TOKENS: call["output_tokens"],
                attr.TOOL_CALLS: call["tool_calls"],
            },
        )
    return guard


@settings(max_examples=200, deadline=None)
@given(drawn_budgets=budgets, drawn_calls=calls)
def test_the_stream_and_the_guard_count_every_budget_key_alike(
    drawn_budgets: list[dict[str, Any]], drawn_calls: list[dict[str, Any]]
) -> None:
    config = config_of(drawn_budgets)
    stream = counted_by_the_stream(config, drawn_calls)
    guard = counted_by_the_app(config, drawn_calls)
    since_s = NOW.timestamp() - 1
    keys = {(budget, key) for budget, key in stream}
    for budget in config.budgets:  # every key any call had, matched or not
        for call in drawn_calls:
            values = {**call, "service": SERVICE, "model_class": config.model_class(call["model"])}
            key = key_of_values(values, budget.scope)
            if key is not None:
                keys.add((budget.id, key))
    for budget_id, key in keys:
        app = guard._ledger.use_since(budget_id, key, since_s)
        assert math.isclose(app, stream.get((budget_id, key), 0.0), rel_tol=1e-9, abs_tol=1e-9), (
            budget_id,
            key,
        )
