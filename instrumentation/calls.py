"""A small manual API to record LLM calls and tool calls as GenAI spans.

For code paths no auto-instrumentation covers (a custom HTTP client, a model
server of your own), and to drive the pipeline before any SDK is patched.
The span follows the GenAI semantic conventions; its cost is set while the
span is open, so the export path never has to price it again.

`start_llm_call` is the one path every model call takes — the manual API and
the OpenAI and Anthropic SDK wrappers alike: the decision (`decisions.decide_call`:
routing, budget pressure, context budget, local accounting, step cap; a
refusal is recorded as a zero-cost span and raised before any request), span
start, usage, cost, end. Tool calls count against the session's step cap.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import BudgetConfig
from burnguard.instrumentation.attribution import current_attribution, current_stakes
from burnguard.instrumentation.cost import cost_attributes
from burnguard.instrumentation.decisions import CallDecision, CallRequest, decide_call
from burnguard.instrumentation.local_accounting import Reservation
from burnguard.instrumentation.refusals import CallRefused
from burnguard.instrumentation.runtime import Runtime, current_runtime
from burnguard.instrumentation.steps import TOOL_CALLS, step_counter
from burnguard.instrumentation.tokens import count_prompt_tokens
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_TRACER_NAME = "burnguard.instrumentation"
_tracers: weakref.WeakKeyDictionary[Any, trace.Tracer] = weakref.WeakKeyDictionary()
_NO_CONFIG = BudgetConfig()


def _tracer(runtime: Runtime | None) -> trace.Tracer:
    provider = runtime.tracer_provider if runtime is not None else trace.get_tracer_provider()
    try:
        return _tracers[provider]
    except (KeyError, TypeError):
        pass
    tracer = provider.get_tracer(_TRACER_NAME)
    with suppress(TypeError):
        _tracers[provider] = tracer
    return tracer


class LLMCall:
    """The open span of one model call; set what the provider reported before the block ends."""

    def __init__(
        self,
        span: trace.Span,
        model: str,
        requested_model: str,
        base: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        self.span = span
        self.model = model
        self.requested_model = requested_model
        self.cost_usd: float | None = None  # set when the block ends, if the model has a price
        self._attributes: dict[str, Any] = {}
        self._base = base or {}
        self._runtime = runtime
        self._reservation = reservation  # the guard's hold on this call's expected use, settled at the end
        self._ended = False

    def set_usage(
        self,
        input_tokens: int,
        output_tokens: int = 0,
        *,
        cache_read_tokens: int = 0,
        cache_creation_tokens: int = 0,
        reasoning_tokens: int = 0,
        tool_calls: int = 0,
        response_model: str | None = None,
        response_id: str | None = None,
        estimated: bool = False,
    ) -> None:
        usage: dict[str, Any] = {
            attr.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            attr.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
            attr.GEN_AI_RESPONSE_MODEL: response_model or self.model,
        }
        optional = {
            attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cache_read_tokens,
            attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: cache_creation_tokens,
            attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: reasoning_tokens,
            attr.TOOL_CALLS: tool_calls,
            attr.GEN_AI_RESPONSE_ID: response_id,
            attr.USAGE_ESTIMATED: estimated,
        }
        usage.update({name: value for name, value in optional.items() if value})
        self._attributes.update(usage)

    def set_attribute(self, name: str, value: Any) -> None:
        """Any other attribute for the span, written when the call ends."""
        self._attributes[name] = value

    def fail(self, exc: BaseException) -> None:
        """Record that the call failed with `exc` (the provider's error, a timeout, ...)."""
        self.span.set_attribute(attr.ERROR_TYPE, type(exc).__qualname__)
        self.span.set_status(Status(StatusCode.ERROR, str(exc)))

    @property
    def provider(self) -> str:
        return str(self._base.get(attr.GEN_AI_PROVIDER_NAME, ""))

    @property
    def ended(self) -> bool:
        return self._ended

    def _finish(self, base: dict[str, Any], runtime: Runtime | None) -> None:
        attributes = {**base, **self._attributes}
        prices = runtime.prices if runtime is not None else None
        cost = cost_attributes(attributes, prices)
        self.cost_usd = cost.get(attr.COST_USD)
        self.span.set_attributes({**self._attributes, **cost})

    def end(self) -> None:
        """Write usage and cost and end the span (once; later calls do nothing)."""
        if self._ended:
            return
        self._ended = True
        try:
            self._finish(self._base, self._runtime)
        finally:
            self.span.end()
            if self._reservation is not None:
                self._reservation.settle(self.cost_usd, self._attributes)


def _call_decision(
    runtime: Runtime | None,
    model: str,
    provider: str,
    operation: str,
    prompt: Mapping[str, Any] | None,
    routable: bool,
) -> CallDecision | None:
    """The decision for this call, or None when nothing is configured that could change it."""
    guard = runtime.guard if runtime is not None else None
    config = runtime.budgets if runtime is not None else _NO_CONFIG
    if guard is None and not config.routes and not config.context_budgets and not step_counter.active:
        return None
    request = CallRequest(model, provider, operation, current_attribution(), current_stakes(), routable)
    estimate = None
    if prompt is not None:
        estimate = functools.partial(count_prompt_tokens, provider=provider, kwargs=prompt)
    return decide_call(request, config, guard, estimate=estimate, steps=step_counter)


def _refuse(tracer: trace.Tracer, base: dict[str, Any], decision: CallDecision) -> NoReturn:
    """Record the refused call as a span that used nothing, then raise the refusal."""
    assert decision.refusal is not None
    span = tracer.start_span(
        f"{base[attr.GEN_AI_OPERATION_NAME]} {decision.model}",
        kind=SpanKind.CLIENT,
        attributes={**base, attr.COST_USD: 0.0, attr.ERROR_TYPE: type(decision.refusal).__qualname__},
        record_exception=False,
    )
    span.set_status(Status(StatusCode.ERROR, str(decision.refusal)))
    span.end()
    raise decision.refusal


def start_llm_call(
    model: str,
    provider: str,
    *,
    operation: str = attr.OP_CHAT,
    enforce: bool = True,
    tracer: trace.Tracer | None = None,
    prompt: Mapping[str, Any] | None = None,
    routable: bool = True,
    attributes: Mapping[str, Any] | None = None,
) -> LLMCall:
    """Decide and open one model call: `decide_call` first (a refusal raises), then the span.

    `prompt` is the request (its `messages`, `system`, `input` ...), read only
    when the feature has a context budget. `routable=False` keeps the model as
    given (an escalation retry chose it on purpose). The span is not made
    current; callers that send the request inside it attach it. When other
    instrumentations record the same call, `dedupe` keeps it counted once.
    """
    runtime = current_runtime()
    decision = _call_decision(runtime, model, provider, operation, prompt, routable) if enforce else None
    if decision is not None:
        model = decision.model
    base: dict[str, Any] = {
        attr.GEN_AI_OPERATION_NAME: operation,
        attr.GEN_AI_PROVIDER_NAME: provider,
        attr.GEN_AI_REQUEST_MODEL: model,
    }
    if runtime is not None and (model_class := runtime.budgets.model_class(model)):
        base[attr.MODEL_CLASS] = model_class
    if attributes:
        base.update(attributes)
    tracer = tracer or _tracer(runtime)
    if decision is not None:
        base.update(decision.span_attributes())
        if decision.refusal is not None:
            _refuse(tracer, base, decision)
    span = tracer.start_span(
        f"{operation} {model}", kind=SpanKind.CLIENT, attributes=base, record_exception=False
    )
    if decision is None:
        return LLMCall(span, model, model, base, runtime)
    return LLMCall(span, model, decision.requested_model, base, runtime, decision.reservation)


@contextmanager
def llm_call(
    model: str,
    provider: str,
    *,
    operation: str = attr.OP_CHAT,
    enforce: bool = True,
    prompt: Mapping[str, Any] | None = None,
) -> Iterator[LLMCall]:
    """Wrap one model call in a GenAI span; the decision may refuse it or change its model first.

    Use `call.model` for the request: it is the routed or downgraded model
    when a rule or the guard chose another one. A refused call raises a
    `CallRefused` (e.g. `BudgetExceeded`) before the block runs. Pass the
    request as `prompt` (`{"messages": [...]}`) for context budgets to see it.
    """
    call = start_llm_call(model, provider, operation=operation, enforce=enforce, prompt=prompt)
    with trace.use_span(call.span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        try:
            yield call
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            call.end()


def record_llm_call(
    model: str,
    provider: str,
    input_tokens: int,
    output_tokens: int = 0,
    *,
    operation: str = attr.OP_CHAT,
    enforce: bool = False,
    **usage: Any,
) -> str:
    """Record a call that already happened; returns the model it was recorded under."""
    with llm_call(model, provider, operation=operation, enforce=enforce) as call:
        call.set_usage(input_tokens, output_tokens, **usage)
    return call.model


@contextmanager
def tool_call(name: str, *, call_id: str | None = None) -> Iterator[trace.Span]:
    """Wrap one tool execution in an `execute_tool` span; the session's step cap may refuse it."""
    attributes = {attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.GEN_AI_TOOL_NAME: name}
    if call_id:
        attributes[attr.GEN_AI_TOOL_CALL_ID] = call_id
    tracer = _tracer(current_runtime())
    take_tool_step(tracer, attributes)
    with tracer.start_as_current_span(
        f"{attr.OP_EXECUTE_TOOL} {name}", kind=SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


def take_tool_step(tracer: trace.Tracer, attributes: dict[str, Any]) -> None:
    """Count a tool call against its session's cap; a refused one is recorded as a span, then raised."""
    if not step_counter.active:
        return
    try:
        step_counter.take(current_attribution().get("session", ""), TOOL_CALLS)
    except CallRefused as refusal:
        span = tracer.start_span(
            f"{attr.OP_EXECUTE_TOOL} {attributes[attr.GEN_AI_TOOL_NAME]}",
            kind=SpanKind.INTERNAL,
            attributes={
                **attributes,
                attr.REFUSED: refusal.reason,
                attr.ERROR_TYPE: type(refusal).__qualname__,
            },
        )
        span.set_status(Status(StatusCode.ERROR, str(refusal)))
        span.end()
        raise


def record_tool_call(name: str, *, call_id: str | None = None) -> None:
    with tool_call(name, call_id=call_id):
        pass
