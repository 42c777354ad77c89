"""The one decision every model call goes through before it is made (docs/ARCHITECTURE.md §12).

In order:

1. **Routing** picks the model class for the task: the first rule under
   `routes:` that matches the call's tenant, workflow, feature, operation and
   stakes names a class, and the call's own provider says which concrete
   model that class is. Calls whose model has no class are never routed.
2. **Budget pressure** then applies: a downgrade signal walks the downgrade
   ladder from the routed model, a throttle denies.
3. **The feature's context budget** checks the estimated prompt size.
4. **The guard's local accounting** reserves the call's expected use (or
   refuses it when the spend since the last signal reaches the limit).
5. **The session's step cap** counts the call, or refuses it.

A model change never crosses providers: a ladder step into another provider's
model is replaced by the same class at the call's provider, or not taken.
Every instrumented client (the manual API, OpenAI, Anthropic) calls
`decide_call`; none re-implements a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import BudgetConfig
from burnguard.contracts.routes import Route
from burnguard.instrumentation.guard import BudgetExceeded, BudgetGuard
from burnguard.instrumentation.local_accounting import Reservation
from burnguard.instrumentation.refusals import CallRefused, ContextBudgetExceeded
from burnguard.instrumentation.steps import LLM_CALLS, StepCounter

if TYPE_CHECKING:
    from burnguard.contracts.signals import Signal

#: model -> (estimated prompt tokens, estimator name); called only when a context budget applies.
PromptEstimator = Callable[[str], tuple[int, str]]
_NO_ATTRIBUTION: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class CallRequest:
    """One model call as the app asked for it, before any decision."""

    model: str
    provider: str
    operation: str = attr.OP_CHAT
    attribution: Mapping[str, str] = field(default_factory=lambda: _NO_ATTRIBUTION)
    stakes: str = attr.DEFAULT_STAKES
    routable: bool = True  # False when the caller chose the model on purpose (an escalation retry)


@dataclass(slots=True)
class CallDecision:
    """The model to call with and why; `refusal` is set when the call must not be made."""

    model: str
    requested_model: str
    route: Route | None = None
    routed_from: str = ""
    downgraded_from: str = ""
    signal: Signal | None = None
    refusal: CallRefused | None = None
    context_attributes: dict[str, Any] = field(default_factory=dict)  # of the context budget, for the span
    fallback: bool = False  # the model's class is cheaper than the requested model's
    reservation: Reservation | None = None  # the guard's hold on the call's expected use, settled at its end

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    def span_attributes(self) -> dict[str, Any]:
        """What the decision adds to the call's span."""
        found: dict[str, Any] = dict(self.context_attributes)
        if self.route is not None:
            found[attr.ROUTE] = self.route.id
        if self.routed_from:
            found[attr.ROUTED_FROM] = self.routed_from
        if self.downgraded_from:
            found[attr.DOWNGRADED_FROM] = self.downgraded_from
        if self.fallback:
            found[attr.FALLBACK] = True
        if self.refusal is not None:
            found[attr.REFUSED] = self.refusal.reason
        return found


def route_model(request: CallRequest, config: BudgetConfig) -> tuple[str, Route | None]:
    """The model the routing rules pick for this call, and the rule that matched (if any)."""
    if not request.routable or not config.routes:
        return request.model, None
    attribution = request.attribution
    route = config.compiled_routes.first_match(
        (
            attribution.get("tenant", ""),
            attribution.get("workflow", ""),
            attribution.get("feature", ""),
            request.operation,
            request.stakes,
        )
    )
    if route is None:
        return request.model, None
    current_class = config.model_class(request.model)
    if not current_class or current_class == route.use:
        return request.model, route  # an unclassified model, or already of the class the rule asks for
    return config.model_for(request.provider, route.use) or request.model, route


def same_provider_model(model: str, provider: str, config: BudgetConfig) -> str | None:
    """`model` when it is `provider`'s, else the model of its class at `provider` (None: no such model).

    With `providers:` configured, a model counts as the provider's only when listed
    there; any other ladder target is replaced by its class's model at the call's
    provider. Without `providers:` nothing says who owns a model, and the ladder
    is taken as written.
    """
    if not config.providers or config.provider_of_model.get(model) == provider:
        return model
    return config.model_for(provider, config.model_class(model))


def apply_budget_pressure(
    decision: CallDecision, request: CallRequest, config: BudgetConfig, guard: BudgetGuard
) -> None:
    """Downgrade along the ladder from the routed model, or refuse, as the guard's signals say."""
    verdict = guard.check_signals(decision.model, request.attribution)
    decision.signal = verdict.signal
    if verdict.action == "deny":
        assert verdict.signal is not None
        decision.refusal = BudgetExceeded(verdict.signal)
    elif verdict.action == "downgrade" and verdict.model:
        cheaper = same_provider_model(verdict.model, request.provider, config)
        if cheaper and cheaper != decision.model:
            decision.downgraded_from = decision.model
            decision.model = cheaper


def check_context_budget(
    decision: CallDecision, request: CallRequest, config: BudgetConfig, estimate: PromptEstimator
) -> None:
    """Estimate the prompt when the feature has a context budget; warn on the span or refuse."""
    feature = request.attribution.get("feature", "")
    budget = config.context_budget_for(feature) if feature else None
    if budget is None:
        return
    tokens, estimator = estimate(decision.model)
    decision.context_attributes = {
        attr.CONTEXT_ESTIMATED_INPUT_TOKENS: tokens,
        attr.CONTEXT_ESTIMATOR: estimator,
        attr.CONTEXT_LIMIT: budget.max_input_tokens,
    }
    if tokens <= budget.max_input_tokens:
        return
    if budget.on_exceed == "warn":
        decision.context_attributes[attr.CONTEXT_EXCEEDED] = True
        return
    decision.refusal = ContextBudgetExceeded(budget.id, feature, tokens, budget.max_input_tokens, estimator)


def decide_call(
    request: CallRequest,
    config: BudgetConfig,
    guard: BudgetGuard | None = None,
    *,
    estimate: PromptEstimator | None = None,
    steps: StepCounter | None = None,
) -> CallDecision:
    """Decide one model call: routing, then budget pressure, then the context budget and the step cap.

    Nothing is raised here; a refused call comes back with `refusal` set, so the
    caller can record the refusal on a span before raising it.
    """
    model, route = route_model(request, config)
    decision = CallDecision(model=model, requested_model=request.model, route=route)
    if model != request.model:
        decision.routed_from = request.model
    if guard is not None:
        apply_budget_pressure(decision, request, config, guard)
    if decision.model != request.model:
        decision.fallback = config.is_cheaper_class(
            config.model_class(decision.model), config.model_class(request.model)
        )
    if decision.allowed and estimate is not None and config.context_budgets:
        check_context_budget(decision, request, config, estimate)
    if decision.allowed and guard is not None:
        reserve_in_guard(decision, request, guard)
    if decision.allowed and steps is not None:
        try:
            steps.take(request.attribution.get("session", ""), LLM_CALLS)
        except CallRefused as refusal:
            decision.refusal = refusal
            release_reservation(decision)
    return decision


def reserve_in_guard(decision: CallDecision, request: CallRequest, guard: BudgetGuard) -> None:
    """Hold the call's expected use in the guard's local accounting, so that concurrent callers
    cannot all slip under a limit between two signals; a local deny refuses the call."""
    try:
        decision.reservation = guard.reserve(decision.model, request.attribution)
    except BudgetExceeded as refusal:
        decision.refusal = refusal


def release_reservation(decision: CallDecision) -> None:
    """A call refused after its reservation was made used nothing: give the hold back."""
    if decision.reservation is not None:
        decision.reservation.release()
        decision.reservation = None
