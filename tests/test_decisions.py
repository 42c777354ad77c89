"""The one decision function every model call goes through: a table of cases, then the edges.

`decide_call` is exercised with a real `BudgetGuard` fed signals directly (the
guard is never started, so no broker is needed) and the routing rules parsed
from YAML the way an app loads its budget file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from burnguard.contracts.budgets import BudgetFileError, parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation.decisions import CallRequest, decide_call
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard
from burnguard.instrumentation.refusals import ContextBudgetExceeded, StepCapExceeded
from burnguard.instrumentation.steps import LLM_CALLS, TOOL_CALLS, StepCounter

CONFIG = parse_budget_yaml(
    """\
model_classes:
  premium:  [gpt-4.1, o3, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5, claude-sonnet-4-0]
  economy:  [gpt-4.1-nano, claude-haiku-4-5, gpt-4o-mini]
downgrade:
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
  o3: gpt-4.1-mini
  claude-opus-4-1: claude-sonnet-4-5
  claude-sonnet-4-5: claude-haiku-4-5
  claude-haiku-4-5: gpt-4.1-nano      # a step into another provider: never taken
  claude-sonnet-4-0: gpt-4o-mini      # into a model `providers:` does not list: mapped by class
providers:
  openai:    {premium: gpt-4.1, standard: gpt-4.1-mini, economy: gpt-4.1-nano}
  anthropic: {premium: claude-opus-4-1, standard: claude-sonnet-4-5, economy: claude-haiku-4-5}
routes:
  - id: high-stakes
    match: {stakes: high}
    use: premium
  - id: routine
    match: {feature: [extract, classify]}
    use: economy
  - id: legal
    match: {workflow: "legal-*"}
    use: premium
  - id: acme-summaries
    match: {tenant: acme, feature: summarize, operation: chat}
    use: standard
context_budgets:
  - {id: summarize-context, feature: summarize, max_input_tokens: 1000}
  - {id: chat-context, feature: "chat*", max_input_tokens: 1000, on_exceed: warn}
"""
)


def signal(
    action: str, *, scope: str = "tenant", key: str = "acme", downgrade_to: str | None = None
) -> Signal:
    now = datetime.now(UTC)
    return Signal(
        scope=scope,
        key=key,
        budget=f"{scope}-{action}",
        action=action,
        downgrade_to=downgrade_to,
        spent=105.0 if action == "throttle" else 88.0,
        limit=100.0,
        ratio=1.05 if action == "throttle" else 0.88,
        window_start=now - timedelta(hours=1),
        window_end=now + timedelta(hours=1),
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
    )


@dataclass(frozen=True)
class Pending:
    """A signal a table case applies, issued when the case runs: one issued at collection would
    expire (in 5 minutes) before an xdist worker busy with slower files reaches the case."""

    action: str
    scope: str = "tenant"
    key: str = "acme"
    downgrade_to: str | None = None

    def issued_now(self) -> Signal:
        return signal(self.action, scope=self.scope, key=self.key, downgrade_to=self.downgrade_to)


def guard_with(*signals: Signal) -> BudgetGuard:
    guard = BudgetGuard(KafkaSettings(), Topics(), CONFIG)  # never started: fed with apply()
    for s in signals:
        guard.apply(s)
    return guard


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    provider: str = "openai"
    attribution: dict[str, str] = field(default_factory=dict)
    stakes: str = "normal"
    operation: str = "chat"
    signals: tuple[Pending, ...] = ()
    routable: bool = True
    # expected
    want_model: str = ""
    want_route: str | None = None
    want_routed_from: str = ""
    want_downgraded_from: str = ""
    want_refused: str = ""
    want_fallback: bool = False  # a cheaper class than requested


ACME = {"tenant": "acme"}
CASES = [
    Case("no rule matches: the requested model", "gpt-4.1", attribution=ACME, want_model="gpt-4.1"),
    Case(
        "routine extraction goes to economy",
        "gpt-4.1",
        attribution={"tenant": "acme", "feature": "extract"},
        want_model="gpt-4.1-nano",
        want_route="routine",
        want_routed_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "classification at Anthropic stays at Anthropic",
        "claude-opus-4-1",
        provider="anthropic",
        attribution={"feature": "classify"},
        want_model="claude-haiku-4-5",
        want_route="routine",
        want_routed_from="claude-opus-4-1",
        want_fallback=True,
    ),
    Case(
        "high stakes keep the premium model, even for extraction",
        "gpt-4.1",
        attribution={"feature": "extract"},
        stakes="high",
        want_model="gpt-4.1",
        want_route="high-stakes",
    ),
    Case(
        "low stakes follow the ordinary rules",
        "gpt-4.1",
        attribution={"feature": "extract"},
        stakes="low",
        want_model="gpt-4.1-nano",
        want_route="routine",
        want_routed_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "a rule may route up: legal review gets premium",
        "gpt-4.1-mini",
        attribution={"workflow": "legal-review"},
        want_model="gpt-4.1",
        want_route="legal",
        want_routed_from="gpt-4.1-mini",
    ),
    Case(
        "a model of the rule's class is kept, not swapped for another of the class",
        "o3",
        attribution={"workflow": "legal-review"},
        want_model="o3",
        want_route="legal",
    ),
    Case(
        "an unclassified model (embeddings) is never routed",
        "text-embedding-3-small",
        operation="embeddings",
        attribution={"feature": "extract"},
        want_model="text-embedding-3-small",
        want_route="routine",
    ),
    Case(
        "all fields of a rule must match: tenant, feature and operation",
        "gpt-4.1",
        attribution={"tenant": "acme", "feature": "summarize"},
        want_model="gpt-4.1-mini",
        want_route="acme-summaries",
        want_routed_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "... another tenant does not match",
        "gpt-4.1",
        attribution={"tenant": "globex", "feature": "summarize"},
        want_model="gpt-4.1",
    ),
    Case(
        "... nor another operation",
        "gpt-4.1",
        operation="text_completion",
        attribution={"tenant": "acme", "feature": "summarize"},
        want_model="gpt-4.1",
    ),
    Case(
        "budget downgrade without a rule walks the ladder one step",
        "gpt-4.1",
        attribution=ACME,
        signals=(Pending("downgrade"),),
        want_model="gpt-4.1-mini",
        want_downgraded_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "downgrade on top of routing walks from the routed model",
        "gpt-4.1-mini",
        attribution={"tenant": "acme", "workflow": "legal-review"},
        signals=(Pending("downgrade"),),
        want_model="gpt-4.1-mini",
        want_route="legal",
        want_routed_from="gpt-4.1-mini",
        want_downgraded_from="gpt-4.1",
    ),
    Case(
        "routed to the cheapest model, a downgrade has nowhere to go",
        "gpt-4.1",
        attribution={"tenant": "acme", "feature": "extract"},
        signals=(Pending("downgrade"),),
        want_model="gpt-4.1-nano",
        want_route="routine",
        want_routed_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "a downgrade to a class walks the ladder until that class",
        "claude-opus-4-1",
        provider="anthropic",
        attribution=ACME,
        signals=(Pending("downgrade", downgrade_to="economy"),),
        want_model="claude-haiku-4-5",
        want_downgraded_from="claude-opus-4-1",
        want_fallback=True,
    ),
    Case(
        "a ladder step into another provider is never taken",
        "claude-haiku-4-5",
        provider="anthropic",
        attribution=ACME,
        signals=(Pending("downgrade"),),
        want_model="claude-haiku-4-5",
    ),
    Case(
        "a ladder step into a model no provider lists goes to its class at the call's provider",
        "claude-sonnet-4-0",
        provider="anthropic",
        attribution=ACME,
        signals=(Pending("downgrade"),),
        want_model="claude-haiku-4-5",
        want_downgraded_from="claude-sonnet-4-0",
        want_fallback=True,
    ),
    Case(
        "throttle denies, whatever the route",
        "gpt-4.1",
        attribution={"tenant": "acme", "feature": "extract"},
        signals=(Pending("throttle"),),
        want_model="gpt-4.1-nano",
        want_route="routine",
        want_routed_from="gpt-4.1",
        want_refused="budget",
        want_fallback=True,
    ),
    Case(
        "routing comes first: a throttled premium class does not stop a call routed to economy",
        "gpt-4.1",
        attribution={"feature": "extract"},
        signals=(Pending("throttle", scope="model_class", key="premium"),),
        want_model="gpt-4.1-nano",
        want_route="routine",
        want_routed_from="gpt-4.1",
        want_fallback=True,
    ),
    Case(
        "... and it does stop a premium call",
        "gpt-4.1",
        attribution={"feature": "translate"},
        signals=(Pending("throttle", scope="model_class", key="premium"),),
        want_model="gpt-4.1",
        want_refused="budget",
    ),
    Case(
        "a warn changes nothing",
        "gpt-4.1",
        attribution=ACME,
        signals=(Pending("warn"),),
        want_model="gpt-4.1",
    ),
    Case(
        "an escalation retry keeps the model it chose",
        "gpt-4.1-mini",
        attribution={"feature": "extract"},
        routable=False,
        want_model="gpt-4.1-mini",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision_table(case: Case) -> None:
    request = CallRequest(
        case.model, case.provider, case.operation, case.attribution, case.stakes, routable=case.routable
    )
    decision = decide_call(request, CONFIG, guard_with(*(p.issued_now() for p in case.signals)))
    assert decision.model == case.want_model
    assert (decision.route.id if decision.route else None) == case.want_route
    assert decision.routed_from == case.want_routed_from
    assert decision.downgraded_from == case.want_downgraded_from
    assert (decision.refusal.reason if decision.refusal else "") == case.want_refused
    assert decision.fallback == case.want_fallback
    attributes = decision.span_attributes()
    assert attributes.get("burnguard.route") == case.want_route
    assert attributes.get("burnguard.routed_from", "") == case.want_routed_from
    assert attributes.get("burnguard.downgraded_from", "") == case.want_downgraded_from
    assert attributes.get("burnguard.fallback", False) == case.want_fallback
    if case.want_refused:
        assert isinstance(decision.refusal, BudgetExceeded)
        assert attributes["burnguard.refused"] == "budget"


def test_the_same_decisions_without_a_guard() -> None:
    request = CallRequest("gpt-4.1", "openai", attribution={"feature": "extract"})
    assert decide_call(request, CONFIG).model == "gpt-4.1-nano"


# --- context budgets -------------------------------------------------------------------------
def test_a_prompt_over_the_context_budget_is_refused_with_its_size_and_limit() -> None:
    estimated: list[str] = []

    def estimate(model: str) -> tuple[int, str]:
        estimated.append(model)
        return 1500, "approx:chars/4"

    request = CallRequest("gpt-4.1", "openai", attribution={"tenant": "acme", "feature": "summarize"})
    decision = decide_call(request, CONFIG, estimate=estimate)
    assert estimated == ["gpt-4.1-mini"]  # estimated for the model the call would use (routed)
    assert isinstance(decision.refusal, ContextBudgetExceeded)
    assert "1,500" in str(decision.refusal) and "1,000" in str(decision.refusal)
    assert "summarize-context" in str(decision.refusal)
    attributes = decision.span_attributes()
    assert attributes["burnguard.refused"] == "context"
    assert attributes["burnguard.context.estimated_input_tokens"] == 1500
    assert attributes["burnguard.context.max_input_tokens"] == 1000


def test_a_prompt_within_the_budget_is_allowed_and_its_estimate_recorded() -> None:
    request = CallRequest("gpt-4.1", "openai", attribution={"feature": "summarize"})
    decision = decide_call(request, CONFIG, estimate=lambda model: (1000, "tiktoken:o200k_base"))
    assert decision.allowed
    assert decision.span_attributes()["burnguard.context.estimator"] == "tiktoken:o200k_base"
    assert "burnguard.context.exceeded" not in decision.span_attributes()


def test_a_warning_context_budget_marks_the_span_and_lets_the_call_through() -> None:
    request = CallRequest("gpt-4.1", "openai", attribution={"feature": "chat-support"})
    decision = decide_call(request, CONFIG, estimate=lambda model: (5000, "approx:chars/4"))
    assert decision.allowed
    assert decision.span_attributes()["burnguard.context.exceeded"] is True


def test_no_estimate_is_made_for_a_feature_without_a_context_budget() -> None:
    def estimate(model: str) -> tuple[int, str]:
        raise AssertionError("estimated a prompt no budget applies to")

    decision = decide_call(
        CallRequest("gpt-4.1", "openai", attribution={"feature": "other"}), CONFIG, estimate=estimate
    )
    assert decision.allowed and "burnguard.context.estimated_input_tokens" not in decision.span_attributes()


# --- step caps -------------------------------------------------------------------------------
def test_the_step_after_the_session_cap_is_refused_and_refusals_take_no_step() -> None:
    steps = StepCounter()
    steps.declare("s-1", {LLM_CALLS: 2})
    request = CallRequest("gpt-4.1", "openai", attribution={"tenant": "acme", "session": "s-1"})
    throttled = guard_with(signal("throttle"))
    assert decide_call(request, CONFIG, throttled, steps=steps).refusal is not None
    assert steps.taken("s-1", LLM_CALLS) == 0  # the budget refused it: no step was taken
    assert decide_call(request, CONFIG, steps=steps).allowed
    assert decide_call(request, CONFIG, steps=steps).allowed
    third = decide_call(request, CONFIG, steps=steps)
    assert isinstance(third.refusal, StepCapExceeded)
    assert "s-1" in str(third.refusal) and "2 llm calls" in str(third.refusal)
    other = CallRequest("gpt-4.1", "openai", attribution={"session": "s-2"})
    assert decide_call(other, CONFIG, steps=steps).allowed  # another session is not capped


def test_a_call_the_step_cap_refuses_gives_back_its_local_reservation_and_counts_nothing() -> None:
    steps = StepCounter()
    steps.declare("capped", {LLM_CALLS: 0})
    calls_signal = signal("warn").model_copy(update={"metric": "calls", "spent": 98.0, "ratio": 0.98})
    guard = guard_with(calls_signal)  # 98 of 100 calls: local accounting follows the key
    capped = CallRequest("gpt-4.1", "openai", attribution={"tenant": "acme", "session": "capped"})
    for _ in range(5):
        refused = decide_call(capped, CONFIG, guard, steps=steps)
        assert isinstance(refused.refusal, StepCapExceeded) and refused.reservation is None
    assert guard._ledger.in_flight == 0
    # The refusals used no call of the budget: two more calls of the tenant still fit under 100.
    other = CallRequest("gpt-4.1", "openai", attribution={"tenant": "acme"})
    first, second = (decide_call(other, CONFIG, guard) for _ in range(2))
    assert first.allowed and second.allowed
    assert isinstance(decide_call(other, CONFIG, guard).refusal, BudgetExceeded)


def test_step_caps_are_counted_per_kind_and_can_be_raised() -> None:
    steps = StepCounter()
    steps.declare("s", {TOOL_CALLS: 1})
    steps.take("s", LLM_CALLS)  # no LLM cap declared: not limited
    steps.take("s", TOOL_CALLS)
    with pytest.raises(StepCapExceeded):
        steps.take("s", TOOL_CALLS)
    steps.declare("s", {TOOL_CALLS: 2})
    steps.take("s", TOOL_CALLS)
    assert steps.taken("s", TOOL_CALLS) == 2


def test_the_step_counter_forgets_the_oldest_sessions_past_its_bound() -> None:
    steps = StepCounter(max_sessions=2)
    for name in ("a", "b", "c"):
        steps.declare(name, {LLM_CALLS: 0})
    steps.take("a", LLM_CALLS)  # forgotten: no longer capped
    with pytest.raises(StepCapExceeded):
        steps.take("c", LLM_CALLS)


# --- validation ------------------------------------------------------------------------------
BASE = """\
model_classes:
  premium: [gpt-4.1]
  economy: [gpt-4.1-nano]
"""


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        (
            "providers:\n  openai: {premium: gpt-4.1}\nroutes:\n"
            "  - id: r\n    match: {feature: x}\n    use: cheap\n",
            9,
            "routes[0].use: route 'r': 'cheap' is not a model class",
        ),
        (
            "providers:\n  openai: {economy: gpt-4.1}\n",
            5,
            "providers.openai.economy: model 'gpt-4.1' is not listed in model_classes.economy",
        ),
        (
            "routes:\n  - id: r\n    match: {feature: x}\n    use: economy\n",
            4,
            "routes: routes need 'providers:'",
        ),
        (
            "providers:\n  openai: {economy: gpt-4.1-nano}\nroutes:\n"
            "  - id: r\n    match: {}\n    use: economy\n",
            8,
            "routes[0].match: Value error, match needs at least one of",
        ),
        (
            "providers:\n  openai: {economy: gpt-4.1-nano}\nroutes:\n"
            "  - id: r\n    match: {stakes: urgent}\n    use: economy\n",
            8,
            "routes[0].match.stakes[0]: Input should be 'low', 'normal' or 'high'",
        ),
        (
            "context_budgets:\n  - {id: c, feature: x, max_input_tokens: 10}\n"
            "  - {id: c, feature: y, max_input_tokens: 10}\n",
            6,
            "context_budgets[1].id: context budget id 'c' is used twice",
        ),
        (
            "context_budgets:\n  - {id: c, feature: x, max_input_tokens: 0}\n",
            5,
            "context_budgets[0].max_input_tokens: Input should be greater than 0",
        ),
    ],
)
def test_routing_mistakes_name_the_line_and_field(extra: str, line: int, message: str) -> None:
    with pytest.raises(BudgetFileError) as caught:
        parse_budget_yaml(BASE + extra, source="routes.yaml")
    assert any(p.startswith(f"routes.yaml:{line}: {message}") for p in caught.value.problems), (
        caught.value.problems
    )
