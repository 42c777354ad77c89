"""OpenTelemetry instrumentation of the `anthropic` SDK, with burnguard's enforcement.

`AnthropicInstrumentor().instrument()` (or the `burnguard_anthropic` entry
point) wraps `messages.create` (JSON and `stream=True`), `messages.parse` and
the `messages.stream(...)` helper, sync and async, for `client.messages` and
`client.beta.messages`.

Anthropic reports `input_tokens` WITHOUT the cache tokens; the semconv
`gen_ai.usage.input_tokens` includes them, so the span carries
`input_tokens + cache_read_input_tokens + cache_creation_input_tokens`, with
the two cache counts beside it. `tool_use` blocks (and server tool uses) are
counted in `burnguard.tool_calls`. A stream reports its input side in
`message_start` and its cumulative output in `message_delta`; one abandoned
before `message_delta` ends with the input reported and the output estimated
from the text seen (`burnguard.usage.estimated=true`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.instrumentation._sdk import (
    Accumulator,
    AsyncStream,
    Spec,
    SyncStream,
    Usage,
    _open,
    _stream_accumulator,
    apply_usage,
    async_wrapper,
    fail,
    sync_wrapper,
)
from burnguard.instrumentation.instrumentor import BurnguardInstrumentor, Target
from burnguard.instrumentation.tokens import estimate_tokens, text_chars
from opentelemetry import context, trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

_PROVIDER = "anthropic"
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _usage(raw: Any) -> Usage:
    uncached = _int(getattr(raw, "input_tokens", 0))
    cache_read = _int(getattr(raw, "cache_read_input_tokens", 0))
    cache_creation = _int(getattr(raw, "cache_creation_input_tokens", 0))
    details = getattr(raw, "output_tokens_details", None)
    return Usage(
        input_tokens=uncached + cache_read + cache_creation,
        output_tokens=_int(getattr(raw, "output_tokens", 0)),
        cache_read_tokens=cache_read,
        cache_creation_tokens=cache_creation,
        reasoning_tokens=_int(getattr(details, "thinking_tokens", 0)),
    )


def _extract(message: Any) -> Usage:
    raw = getattr(message, "usage", None)
    usage = _usage(raw) if raw is not None else Usage(estimated=True)
    usage.tool_calls = sum(
        1 for block in getattr(message, "content", None) or () if block.type in _TOOL_BLOCKS
    )
    usage.response_model = getattr(message, "model", None)
    usage.response_id = getattr(message, "id", None)
    stop = getattr(message, "stop_reason", None)
    if stop:
        usage.finish_reasons = (stop,)
    return usage


def _output_text(message: Any) -> str | None:
    parts = []
    for block in getattr(message, "content", None) or ():
        parts.append(getattr(block, "text", None) or "")
    return "".join(parts)


def _estimate_input(kwargs: dict[str, Any]) -> int:
    messages = kwargs.get("messages") or ()
    try:
        count = len(messages)
    except TypeError:
        count = 0
    chars = text_chars(messages) + text_chars(kwargs.get("system")) + text_chars(kwargs.get("tools"))
    return estimate_tokens(chars) + 4 * count + 3


def _input_messages(kwargs: dict[str, Any]) -> Any:
    system = kwargs.get("system")
    messages = list(kwargs.get("messages") or ())
    return ([{"role": "system", "content": system}] if system else []) + messages


class MessagesAccumulator(Accumulator):
    def add(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind == "content_block_delta":
            delta = event.delta
            dtype = getattr(delta, "type", None)
            if dtype == "text_delta":
                self.add_text(delta.text)
            elif dtype == "input_json_delta":
                self.output_chars += len(delta.partial_json or "")
            elif dtype == "thinking_delta":
                self.output_chars += len(getattr(delta, "thinking", "") or "")
        elif kind == "content_block_start":
            if getattr(event.content_block, "type", None) in _TOOL_BLOCKS:
                self.tool_call_keys.add(event.index)
        elif kind == "message_start":
            message = event.message
            self.response_model = getattr(message, "model", None)
            self.response_id = getattr(message, "id", None)
            if getattr(message, "usage", None) is not None:
                self.reported = _usage(message.usage)
                self.output_seen = False
        elif kind == "message_delta":
            usage = getattr(event, "usage", None)
            if usage is not None:
                self._delta_usage(usage)
            stop = getattr(event.delta, "stop_reason", None)
            if stop:
                self.finish_reasons.append(stop)

    def _delta_usage(self, raw: Any) -> None:
        """`message_delta` usage is cumulative; fields it leaves out (None) keep what `message_start` said."""
        reported = self.reported or Usage()
        if getattr(raw, "output_tokens", None) is not None:
            reported.output_tokens = raw.output_tokens
            self.output_seen = True
        cache_read = getattr(raw, "cache_read_input_tokens", None)
        cache_creation = getattr(raw, "cache_creation_input_tokens", None)
        uncached = getattr(raw, "input_tokens", None)
        if cache_read is not None:
            reported.cache_read_tokens = cache_read
        if cache_creation is not None:
            reported.cache_creation_tokens = cache_creation
        if uncached is not None:
            reported.input_tokens = uncached + reported.cache_read_tokens + reported.cache_creation_tokens
        self.reported = reported

    def usage(self) -> Usage:
        usage = super().usage()
        if self.reported is not None and not getattr(self, "output_seen", False):
            # Abandoned before `message_delta`: the input is known, the output so far is estimated.
            usage.output_tokens = max(usage.output_tokens, estimate_tokens(self.output_chars))
            usage.estimated = True
        return usage


MESSAGES = Spec(
    _PROVIDER,
    attr.OP_CHAT,
    extract=_extract,
    estimate_input=_estimate_input,
    accumulator=MessagesAccumulator,
    input_messages=_input_messages,
    output_text=_output_text,
)
STREAM_HELPER = Spec(
    _PROVIDER,
    attr.OP_CHAT,
    extract=_extract,
    estimate_input=_estimate_input,
    accumulator=MessagesAccumulator,
    input_messages=_input_messages,
    output_text=_output_text,
    always_stream=True,
)


def _api_request_attribute(manager: Any) -> str | None:
    """The name-mangled attribute a `*MessageStreamManager` keeps its deferred request in."""
    for name in vars(manager):
        if name.endswith("__api_request"):
            return name
    return None


def _stream_helper(
    spec: Spec, tracer: Callable[[], trace.Tracer | None], is_async: bool
) -> Callable[..., Any]:
    """`messages.stream(...)`: decided and opened at the call; the request goes out when it is entered."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        call = _open(spec, kwargs, tracer(), instance)
        if call is None:
            return wrapped(*args, **kwargs)
        try:
            manager = wrapped(*args, **kwargs)
        except BaseException as exc:
            fail(call, exc)
            raise
        name = _api_request_attribute(manager)
        if name is None:  # an SDK whose helper we do not know: end with an estimate rather than never
            apply_usage(call, Usage(input_tokens=spec.estimate_input(kwargs), estimated=True))
            call.end()
            return manager
        api_request = getattr(manager, name)
        accumulator = _stream_accumulator(spec, kwargs)
        if is_async:

            async def request() -> Any:
                call._sent = True  # type: ignore[attr-defined]
                token = context.attach(trace.set_span_in_context(call.span))
                try:
                    raw = await api_request
                except BaseException as exc:
                    fail(call, exc)
                    raise
                finally:
                    context.detach(token)
                return AsyncStream(raw, call, accumulator)

            setattr(manager, name, request())
        else:

            def request() -> Any:
                call._sent = True  # type: ignore[attr-defined]
                token = context.attach(trace.set_span_in_context(call.span))
                try:
                    raw = api_request()
                except BaseException as exc:
                    fail(call, exc)
                    raise
                finally:
                    context.detach(token)
                return SyncStream(raw, call, accumulator)

            setattr(manager, name, request)
        weakref.finalize(manager, _end_unentered, call, spec, kwargs)
        return manager

    return wrapper


def _end_unentered(call: Any, spec: Spec, kwargs: dict[str, Any]) -> None:
    """A stream manager dropped without being entered sent no request: end its span as such."""
    if not call.ended and not getattr(call, "_sent", False):
        apply_usage(call, Usage(estimated=True))
        call.end()


def _sync_stream(spec: Spec, tracer: Callable[[], trace.Tracer | None]) -> Callable[..., Any]:
    return _stream_helper(spec, tracer, is_async=False)


def _async_stream(spec: Spec, tracer: Callable[[], trace.Tracer | None]) -> Callable[..., Any]:
    return _stream_helper(spec, tracer, is_async=True)


_MODULES = ("anthropic.resources.messages.messages", "anthropic.resources.beta.messages.messages")
TARGETS: tuple[Target, ...] = tuple(
    target
    for module in _MODULES
    for target in (
        Target(module, "Messages", "create", MESSAGES, sync_wrapper),
        Target(module, "AsyncMessages", "create", MESSAGES, async_wrapper),
        Target(module, "Messages", "parse", MESSAGES, sync_wrapper),
        Target(module, "AsyncMessages", "parse", MESSAGES, async_wrapper),
        Target(module, "Messages", "stream", STREAM_HELPER, _sync_stream),
        Target(module, "AsyncMessages", "stream", STREAM_HELPER, _async_stream),
    )
)


class AnthropicInstrumentor(BurnguardInstrumentor):
    """burnguard's instrumentation of the `anthropic` SDK (Messages API)."""

    targets = TARGETS

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("anthropic >= 0.40",)
