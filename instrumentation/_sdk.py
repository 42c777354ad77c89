"""The machinery the OpenAI and Anthropic wrappers share.

Each wrapped SDK method goes through `sync_wrapper` / `async_wrapper`: the
call is opened with `start_llm_call` (the guard's decision — deny raises
before any request, downgrade rewrites the `model` argument — and the span),
the request runs with the span current, and the result decides how the span
ends: at once for a parsed response; when a stream is exhausted, fails, is
closed, leaves its `with` block or is garbage-collected (an abandoned stream
ends with the usage seen so far); when a raw response is parsed or closed.
What is provider-specific — reading usage off a response, accumulating stream
events, estimating input tokens — comes in a `Spec`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wrapt
from burnguard.contracts import attributes as attr
from burnguard.instrumentation.calls import LLMCall, start_llm_call
from burnguard.instrumentation.escalation import active_check, escalation_model, response_passes
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.refusals import CallRefused
from burnguard.instrumentation.runtime import current_runtime
from burnguard.instrumentation.tokens import estimate_tokens
from opentelemetry import context, trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

logger = logging.getLogger(__name__)
_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def capture_content() -> bool:
    runtime = current_runtime()
    if runtime is not None and runtime.settings.capture_content:
        return True
    return os.environ.get(_CAPTURE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(slots=True)
class Usage:
    """What one call used, as the provider reported it (or as estimated)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    tool_calls: int = 0
    response_model: str | None = None
    response_id: str | None = None
    estimated: bool = False
    finish_reasons: tuple[str, ...] = ()
    output_text: str | None = None  # only kept when content capture is on


def apply_usage(call: LLMCall, usage: Usage) -> None:
    call.set_usage(
        usage.input_tokens,
        usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_creation_tokens=usage.cache_creation_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        tool_calls=usage.tool_calls,
        response_model=usage.response_model,
        response_id=usage.response_id,
        estimated=usage.estimated,
    )
    if usage.finish_reasons:
        call.set_attribute(attr.GEN_AI_RESPONSE_FINISH_REASONS, list(usage.finish_reasons))
    if usage.output_text is not None:
        call.set_attribute(
            attr.GEN_AI_OUTPUT_MESSAGES, json.dumps([{"role": "assistant", "content": usage.output_text}])
        )


class Accumulator:
    """Collects what a stream's events say; `usage()` is the reported usage or an estimate."""

    def __init__(self, input_estimate: int, keep_text: bool) -> None:
        self.input_estimate = input_estimate
        self.keep_text = keep_text
        self.text: list[str] = []
        self.output_chars = 0
        self.tool_call_keys: set[Any] = set()
        self.reported: Usage | None = None
        self.response_model: str | None = None
        self.response_id: str | None = None
        self.finish_reasons: list[str] = []

    def add(self, event: Any) -> None:
        raise NotImplementedError

    def add_text(self, text: str | None) -> None:
        if text:
            self.output_chars += len(text)
            if self.keep_text:
                self.text.append(text)

    def usage(self) -> Usage:
        usage = self.reported
        if usage is None:
            usage = Usage(
                input_tokens=self.input_estimate,
                output_tokens=estimate_tokens(self.output_chars),
                estimated=True,
            )
        usage.tool_calls = max(usage.tool_calls, len(self.tool_call_keys))
        usage.response_model = usage.response_model or self.response_model
        usage.response_id = usage.response_id or self.response_id
        if self.finish_reasons and not usage.finish_reasons:
            usage.finish_reasons = tuple(self.finish_reasons)
        if self.keep_text:
            usage.output_text = "".join(self.text)
        return usage


@dataclass(frozen=True)
class Spec:
    """How to instrument one SDK method."""

    provider: str
    operation: str
    extract: Callable[[Any], Usage | None]  # a parsed response -> its usage
    estimate_input: Callable[[dict[str, Any]], int]  # request kwargs -> estimated input tokens
    accumulator: Callable[[int, bool], Accumulator] | None = None  # for stream=True
    input_messages: Callable[[dict[str, Any]], Any] | None = None  # for opt-in content capture
    output_text: Callable[[Any], str | None] | None = None
    always_stream: bool = False  # a helper that streams without `stream=True` (messages.stream)
    provider_of: Callable[[Any], str] | None = None  # the provider by the client (e.g. Azure OpenAI)


def _open(spec: Spec, kwargs: dict[str, Any], tracer: trace.Tracer | None, instance: Any) -> LLMCall | None:
    model = kwargs.get("model")
    if not isinstance(model, str):
        return None
    provider = spec.provider_of(instance) if spec.provider_of is not None else spec.provider
    call = start_llm_call(model, provider, operation=spec.operation, tracer=tracer, prompt=kwargs)
    if call.model != model:
        kwargs["model"] = call.model
    if spec.input_messages is not None and capture_content():
        with contextlib.suppress(TypeError, ValueError):
            call.span.set_attribute(
                attr.GEN_AI_INPUT_MESSAGES, json.dumps(spec.input_messages(kwargs), default=str)
            )
    return call


def _estimated(spec: Spec, kwargs: dict[str, Any], result: Any = None) -> Usage:
    output = 0
    if result is not None and spec.output_text is not None:
        output = estimate_tokens(len(spec.output_text(result) or ""))
    return Usage(input_tokens=spec.estimate_input(kwargs), output_tokens=output, estimated=True)


def finish(call: LLMCall, spec: Spec, kwargs: dict[str, Any], parsed: Any) -> None:
    """End the call with the usage of a parsed (non-streamed) response."""
    if call.ended:
        return
    try:
        usage = spec.extract(parsed)
        if usage is None or usage.estimated:  # the response carried no usage
            estimate = _estimated(spec, kwargs, parsed)
            if usage is not None:
                estimate.tool_calls = usage.tool_calls
                estimate.response_model = usage.response_model
                estimate.response_id = usage.response_id
                estimate.finish_reasons = usage.finish_reasons
            usage = estimate
        if spec.output_text is not None and capture_content():
            usage.output_text = spec.output_text(parsed)
        apply_usage(call, usage)
    except Exception:  # never let telemetry break the app
        logger.debug("burnguard: could not read usage", exc_info=True)
    call.end()


def fail(call: LLMCall, exc: BaseException) -> None:
    if not call.ended:
        call.fail(exc)
        call.end()


def _stream_accumulator(spec: Spec, kwargs: dict[str, Any]) -> Accumulator:
    assert spec.accumulator is not None
    return spec.accumulator(spec.estimate_input(kwargs), capture_content())


def _is_stream(spec: Spec, kwargs: dict[str, Any]) -> bool:
    return spec.always_stream or kwargs.get("stream") is True


def _raw_kind(result: Any) -> str | None:
    name = type(result).__name__
    if name == "LegacyAPIResponse":
        return "legacy"
    if name in ("APIResponse", "AsyncAPIResponse"):
        return "streamed"
    return None


def handle_result(call: LLMCall, spec: Spec, kwargs: dict[str, Any], result: Any, *, is_async: bool) -> Any:
    """Wrap or read the result of a call so that its span ends with its usage."""
    raw = _raw_kind(result)
    if raw == "legacy":
        if not _is_stream(spec, kwargs):
            finish(call, spec, kwargs, result.parse())
            return result
        return LegacyRawResponse(result, call, spec, kwargs, is_async)
    if raw == "streamed":
        cls = AsyncStreamedRawResponse if is_async else StreamedRawResponse
        return cls(result, call, spec, kwargs)
    if _is_stream(spec, kwargs) and spec.accumulator is not None:
        cls = AsyncStream if is_async else SyncStream
        return cls(result, call, _stream_accumulator(spec, kwargs))
    finish(call, spec, kwargs, result)
    return result


def _run_sync(
    wrapped: Callable[..., Any], args: tuple, kwargs: dict[str, Any], call: LLMCall, spec: Spec
) -> Any:
    token = context.attach(trace.set_span_in_context(call.span))
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        fail(call, exc)
        raise
    finally:
        context.detach(token)
    return handle_result(call, spec, kwargs, result, is_async=False)


async def _run_async(
    wrapped: Callable[..., Any], args: tuple, kwargs: dict[str, Any], call: LLMCall, spec: Spec
) -> Any:
    token = context.attach(trace.set_span_in_context(call.span))
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        fail(call, exc)
        raise
    finally:
        context.detach(token)
    return handle_result(call, spec, kwargs, result, is_async=True)


def _open_escalation(
    spec: Spec, kwargs: dict[str, Any], first: LLMCall, result: Any, tracer: trace.Tracer | None
) -> tuple[LLMCall, dict[str, Any]] | None:
    """The retry of a call whose complete response failed the `escalate_on` check, if one is due."""
    check = active_check()
    if check is None or _is_stream(spec, kwargs) or _raw_kind(result) is not None:
        return None
    if response_passes(check, result):
        return None
    runtime = current_runtime()
    if runtime is None or not (target := escalation_model(first.model, first.provider, runtime.budgets)):
        return None
    if runtime.guard is not None and not _budget_allows(runtime.guard, target):
        return None
    retry_kwargs = {**kwargs, "model": target}
    try:
        retry = start_llm_call(
            target,
            first.provider,
            operation=spec.operation,
            tracer=tracer,
            prompt=retry_kwargs,
            routable=False,
            attributes={attr.ESCALATED_FROM: first.model},
        )
    except CallRefused as refusal:  # the retry is refused (budget, step cap): keep the first answer
        logger.info("burnguard: escalation of %s refused: %s", first.model, refusal)
        return None
    retry_kwargs["model"] = retry.model
    return retry, retry_kwargs


def _budget_allows(guard: BudgetGuard, model: str) -> bool:
    """True when budget pressure would let a retry run on `model` itself: an escalation that a
    downgrade would send straight back to the model that failed is a paid duplicate, not a retry."""
    verdict = guard.check(model)
    return verdict.action != "deny" and (verdict.model or model) == model


def sync_wrapper(spec: Spec, tracer: Callable[[], trace.Tracer | None]) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = _open(spec, kwargs, tracer(), instance)
        if call is None:
            return wrapped(*args, **kwargs)
        result = _run_sync(wrapped, args, kwargs, call, spec)
        escalation = _open_escalation(spec, kwargs, call, result, tracer())
        if escalation is None:
            return result
        retry, retry_kwargs = escalation
        return _run_sync(wrapped, args, retry_kwargs, retry, spec)

    return wrapper


def async_wrapper(spec: Spec, tracer: Callable[[], trace.Tracer | None]) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        # The decision is made when the coroutine is created, before anything is awaited or sent.
        call = _open(spec, kwargs, tracer(), instance)
        if call is None:
            return wrapped(*args, **kwargs)

        async def run() -> Any:
            result = await _run_async(wrapped, args, kwargs, call, spec)
            escalation = _open_escalation(spec, kwargs, call, result, tracer())
            if escalation is None:
                return result
            retry, retry_kwargs = escalation
            return await _run_async(wrapped, args, retry_kwargs, retry, spec)

        return run()

    return wrapper


# --- ending spans of streams ---------------------------------------------------------
class _Ends:
    """Mixin logic: end the call once, with what the accumulator saw."""

    def _self_end(self, exc: BaseException | None = None) -> None:
        call: LLMCall = self._self_call  # type: ignore[attr-defined]
        if call.ended:
            return
        try:
            if exc is not None:
                call.fail(exc)
            apply_usage(call, self._self_acc.usage())  # type: ignore[attr-defined]
        except Exception:
            logger.debug("burnguard: could not record stream usage", exc_info=True)
        call.end()


class _ClosingResponse(wrapt.ObjectProxy):
    """The stream's HTTP response; closing it (as the SDKs' stream helpers do) ends the call."""

    def __init__(self, wrapped: Any, on_close: Callable[[], None]) -> None:
        super().__init__(wrapped)
        self._self_on_close = on_close

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_on_close()

    async def aclose(self) -> None:
        try:
            await self.__wrapped__.aclose()
        finally:
            self._self_on_close()


class SyncStream(_Ends, wrapt.ObjectProxy):
    """A `Stream` whose events are accumulated; the call ends when the stream does."""

    def __init__(self, wrapped: Any, call: LLMCall, acc: Accumulator) -> None:
        super().__init__(wrapped)
        self._self_call = call
        self._self_acc = acc

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Any:
        try:
            item = self.__wrapped__.__next__()
        except StopIteration:
            self._self_end()
            raise
        except BaseException as exc:
            self._self_end(exc)
            raise
        self._self_acc.add(item)
        return item

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_end()

    def __enter__(self) -> SyncStream:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self.__wrapped__.__exit__(*exc_info)
        finally:
            self._self_end()

    @property
    def response(self) -> Any:
        return _ClosingResponse(self.__wrapped__.response, self._self_end)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._self_end()


class AsyncStream(_Ends, wrapt.ObjectProxy):
    """An `AsyncStream` whose events are accumulated; the call ends when the stream does."""

    def __init__(self, wrapped: Any, call: LLMCall, acc: Accumulator) -> None:
        super().__init__(wrapped)
        self._self_call = call
        self._self_acc = acc

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            self._self_end()
            raise
        except BaseException as exc:
            self._self_end(exc)
            raise
        self._self_acc.add(item)
        return item

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            self._self_end()

    async def __aenter__(self) -> AsyncStream:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            self._self_end()

    @property
    def response(self) -> Any:
        return _ClosingResponse(self.__wrapped__.response, self._self_end)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._self_end()


# --- raw responses (`with_raw_response`, `with_streaming_response`) -----------------------------
class _RawBase(wrapt.ObjectProxy):
    def __init__(
        self, wrapped: Any, call: LLMCall, spec: Spec, kwargs: dict[str, Any], is_async: bool = False
    ) -> None:
        super().__init__(wrapped)
        self._self_call = call
        self._self_spec = spec
        self._self_kwargs = kwargs
        self._self_async = is_async
        self._self_stream: Any = None

    def _self_parsed(self, parsed: Any, *, is_async: bool) -> Any:
        call, spec, kwargs = self._self_call, self._self_spec, self._self_kwargs
        if _is_stream(spec, kwargs) and spec.accumulator is not None and hasattr(parsed, "response"):
            if self._self_stream is None:
                cls = AsyncStream if is_async else SyncStream
                self._self_stream = cls(parsed, call, _stream_accumulator(spec, kwargs))
            return self._self_stream
        finish(call, spec, kwargs, parsed)
        return parsed

    def _self_end_unread(self) -> None:
        """Closed or dropped before parsing: the usage is unknown, so it is estimated."""
        call = self._self_call
        if not call.ended and self._self_stream is None:
            apply_usage(call, _estimated(self._self_spec, self._self_kwargs))
            call.end()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._self_end_unread()


class LegacyRawResponse(_RawBase):
    """`with_raw_response` of a streaming call: `parse()` gives the accumulating stream."""

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_parsed(self.__wrapped__.parse(*args, **kwargs), is_async=self._self_async)


class StreamedRawResponse(_RawBase):
    """`with_streaming_response`: the body is read later; parsing or closing ends the call."""

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_parsed(self.__wrapped__.parse(*args, **kwargs), is_async=False)

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_end_unread()


class AsyncStreamedRawResponse(_RawBase):
    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_parsed(await self.__wrapped__.parse(*args, **kwargs), is_async=True)

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            self._self_end_unread()
