"""A small manual API to record LLM calls and tool calls as GenAI spans.

For code paths no auto-instrumentation covers (a custom HTTP client, a model
server of your own), and to drive the pipeline before any SDK is patched.
The span follows the GenAI semantic conventions; its cost is set while the
span is open, so the export path never has to price it again. With
enforcement on, `llm_call` consults the guard before the call is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.instrumentation.cost import cost_attributes
from burnguard.instrumentation.runtime import Runtime, current_runtime
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_TRACER_NAME = "burnguard.instrumentation"


def _tracer(runtime: Runtime | None) -> trace.Tracer:
    if runtime is not None:
        return runtime.tracer
    return trace.get_tracer(_TRACER_NAME)


class LLMCall:
    """The open span of one model call; set what the provider reported before the block ends."""

    def __init__(self, span: trace.Span, model: str, requested_model: str) -> None:
        self.span = span
        self.model = model
        self.requested_model = requested_model
        self.cost_usd: float | None = None  # set when the block ends, if the model has a price
        self._attributes: dict[str, Any] = {}

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
        }
        usage.update({name: value for name, value in optional.items() if value})
        self._attributes.update(usage)

    def _finish(self, base: dict[str, Any], runtime: Runtime | None) -> None:
        attributes = {**base, **self._attributes}
        prices = runtime.prices if runtime is not None else None
        cost = cost_attributes(attributes, prices)
        self.cost_usd = cost.get(attr.COST_USD)
        self.span.set_attributes({**self._attributes, **cost})


@contextmanager
def llm_call(
    model: str,
    provider: str,
    *,
    operation: str = attr.OP_CHAT,
    enforce: bool = True,
) -> Iterator[LLMCall]:
    """Wrap one model call in a GenAI span; the guard may deny it or change its model first.

    Use `call.model` for the request: it is the downgraded model when the
    guard asked for a downgrade. A denied call raises `BudgetExceeded` before
    the block runs.
    """
    runtime = current_runtime()
    requested = model
    guard = runtime.guard if runtime is not None and enforce else None
    if guard is not None:
        model = guard.enforce(model) or model
    base: dict[str, Any] = {
        attr.GEN_AI_OPERATION_NAME: operation,
        attr.GEN_AI_PROVIDER_NAME: provider,
        attr.GEN_AI_REQUEST_MODEL: model,
    }
    if runtime is not None and (model_class := runtime.budgets.model_class(model)):
        base[attr.MODEL_CLASS] = model_class
    if model != requested:
        base[attr.DOWNGRADED_FROM] = requested
    with _tracer(runtime).start_as_current_span(
        f"{operation} {model}", kind=SpanKind.CLIENT, attributes=base, record_exception=False
    ) as span:
        call = LLMCall(span, model, requested)
        try:
            yield call
        except BaseException as exc:
            span.set_attribute(attr.ERROR_TYPE, type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            call._finish(base, runtime)


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
    """Wrap one tool execution in an `execute_tool` span."""
    attributes = {attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.GEN_AI_TOOL_NAME: name}
    if call_id:
        attributes[attr.GEN_AI_TOOL_CALL_ID] = call_id
    with _tracer(current_runtime()).start_as_current_span(
        f"{attr.OP_EXECUTE_TOOL} {name}", kind=SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


def record_tool_call(name: str, *, call_id: str | None = None) -> None:
    with tool_call(name, call_id=call_id):
        pass
