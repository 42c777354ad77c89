"""Workflow, tool and user-action spans (docs/ARCHITECTURE.md §11: cost per successful workflow, tokens per
user action, tool calls per session).

- `workflow(name)` opens the workflow's root span (`workflow {name}`) and attributes every span
  inside it — model calls included, across services through baggage — to the workflow. The span's
  status says whether the run succeeded: OK when the block (or decorated function) returns,
  ERROR with `error.type` when it raises; `burnguard.workflow.success` carries the same as a bool.
- `@tool` (or `tool_call(name)`) wraps one tool execution in an `execute_tool {name}` span.
- `user_action(id)` attributes what one user action caused (`burnguard.action`); without an id
  one is generated.
Each works as a context manager and as a decorator of sync and async functions.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from burnguard.contracts import attributes as attr
from burnguard.instrumentation.attribution import attribute
from burnguard.instrumentation.calls import _tracer, take_tool_step
from burnguard.instrumentation.runtime import current_runtime
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

F = TypeVar("F", bound=Callable[..., Any])


def _fail(span: trace.Span, exc: BaseException) -> None:
    span.set_attribute(attr.ERROR_TYPE, type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(exc)))


class _SpanBlock:
    """A context manager that is also a decorator (sync and async), opening a fresh span each use."""

    def _open(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> trace.Span:
        self._cm = self._open()
        return self._cm.__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        return self._cm.__exit__(*exc_info)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with self._open():
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self._open():
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]


class workflow(_SpanBlock):
    """The root span of one workflow run; its status says whether the run succeeded."""

    def __init__(self, name: str, *, action: str | None = None, **attribution: str) -> None:
        self.name = name
        self.action = action
        self.attribution = attribution

    @contextmanager
    def _open(self) -> Iterator[trace.Span]:
        with attribute(workflow=self.name, action=self.action, **self.attribution):
            span = _tracer(current_runtime()).start_span(
                f"{attr.OP_WORKFLOW} {self.name}",
                kind=SpanKind.INTERNAL,
                attributes={attr.GEN_AI_OPERATION_NAME: attr.OP_WORKFLOW, attr.WORKFLOW: self.name},
            )
            with trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                try:
                    yield span
                except BaseException as exc:
                    span.set_attribute(attr.WORKFLOW_SUCCESS, False)
                    _fail(span, exc)
                    raise
                span.set_attribute(attr.WORKFLOW_SUCCESS, True)
                span.set_status(Status(StatusCode.OK))


class _Tool(_SpanBlock):
    def __init__(self, name: str, call_id: str | None = None) -> None:
        self.name = name
        self.call_id = call_id

    @contextmanager
    def _open(self) -> Iterator[trace.Span]:
        attributes = {attr.GEN_AI_OPERATION_NAME: attr.OP_EXECUTE_TOOL, attr.GEN_AI_TOOL_NAME: self.name}
        if self.call_id:
            attributes[attr.GEN_AI_TOOL_CALL_ID] = self.call_id
        tracer = _tracer(current_runtime())
        take_tool_step(tracer, attributes)
        span = tracer.start_span(
            f"{attr.OP_EXECUTE_TOOL} {self.name}", kind=SpanKind.INTERNAL, attributes=attributes
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                yield span
            except BaseException as exc:
                _fail(span, exc)
                raise


@overload
def tool(func: F, /) -> F: ...
@overload
def tool(*, name: str | None = None, call_id: str | None = None) -> Callable[[F], F]: ...


def tool(func: F | None = None, /, *, name: str | None = None, call_id: str | None = None) -> Any:
    """`@tool` or `@tool(name="search")`: each call of the function is an `execute_tool` span."""
    if func is not None:
        return _Tool(func.__name__)(func)

    def decorate(f: F) -> F:
        return _Tool(name or f.__name__, call_id)(f)

    return decorate


@contextmanager
def user_action(action_id: str | None = None) -> Iterator[str]:
    """Attribute everything inside to one user action (`burnguard.action`); yields its id."""
    action_id = action_id or uuid.uuid4().hex
    with attribute(action=action_id):
        yield action_id
