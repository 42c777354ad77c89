"""OpenTelemetry instrumentation of the `openai` SDK, with burnguard's enforcement.

`OpenAIInstrumentor().instrument()` (or the `burnguard_openai` entry point,
picked up by `opentelemetry-instrument`) wraps, sync and async:

- `chat.completions.create` (JSON and `stream=True`) and `chat.completions.parse`;
  `chat.completions.stream(...)` goes through `create` and is covered with it;
- `responses.create` (JSON and streaming) and `responses.parse`;
  `responses.stream(...)` goes through `create`;
- `embeddings.create`.

`with_raw_response` and `with_streaming_response` keep returning what the SDK
returns; the call's span ends when their body is parsed or closed. Usage comes
from the API; a stream that carries none (no `stream_options.include_usage`),
or is abandoned before it arrives, gets an estimate marked
`burnguard.usage.estimated=true`, never a silent zero.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from burnguard.contracts import attributes as attr
from burnguard.instrumentation._sdk import (
    Accumulator,
    Spec,
    Usage,
    async_wrapper,
    sync_wrapper,
)
from burnguard.instrumentation.instrumentor import BurnguardInstrumentor, Target
from burnguard.instrumentation.tokens import estimate_tokens, text_chars

logger = logging.getLogger(__name__)
_PROVIDER = "openai"


def _provider_of(resource: Any) -> str:
    client = getattr(resource, "_client", None)
    return "azure.ai.openai" if "Azure" in type(client).__name__ else _PROVIDER


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


# --- chat completions ------------------------------------------------------------------
def _chat_usage(usage: Any) -> Usage:
    prompt = getattr(usage, "prompt_tokens_details", None)
    completion = getattr(usage, "completion_tokens_details", None)
    return Usage(
        input_tokens=_int(getattr(usage, "prompt_tokens", 0)),
        output_tokens=_int(getattr(usage, "completion_tokens", 0)),
        cache_read_tokens=_int(getattr(prompt, "cached_tokens", 0)),
        reasoning_tokens=_int(getattr(completion, "reasoning_tokens", 0)),
    )


def _chat_extract(response: Any) -> Usage:
    raw = getattr(response, "usage", None)
    usage = _chat_usage(raw) if raw is not None else Usage(estimated=True)
    tool_calls = 0
    reasons = []
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        tool_calls += len(getattr(message, "tool_calls", None) or ())
        if getattr(message, "function_call", None) is not None:
            tool_calls += 1
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    usage.tool_calls = tool_calls
    usage.finish_reasons = tuple(reasons)
    usage.response_model = getattr(response, "model", None)
    usage.response_id = getattr(response, "id", None)
    return usage


def _chat_output_text(response: Any) -> str | None:
    parts = []
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        parts.append(getattr(message, "content", None) or "")
        for call in getattr(message, "tool_calls", None) or ():
            function = getattr(call, "function", None)
            parts.append(getattr(function, "arguments", None) or "")
    return "".join(parts)


def _chat_input(kwargs: dict[str, Any]) -> int:
    messages = kwargs.get("messages") or ()
    try:
        count = len(messages)
    except TypeError:
        count = 0
    return estimate_tokens(text_chars(messages) + text_chars(kwargs.get("tools"))) + 4 * count + 3


class ChatAccumulator(Accumulator):
    def add(self, chunk: Any) -> None:
        if self.response_id is None:
            self.response_id = getattr(chunk, "id", None)
            self.response_model = getattr(chunk, "model", None)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.reported = _chat_usage(usage)
        for choice in getattr(chunk, "choices", None) or ():
            delta = choice.delta
            if delta is not None:
                self.add_text(delta.content)
                self.add_text(getattr(delta, "refusal", None))
                for call in delta.tool_calls or ():
                    self.tool_call_keys.add((choice.index, call.index))
                    if call.function is not None and call.function.arguments:
                        self.output_chars += len(call.function.arguments)
                function_call = getattr(delta, "function_call", None)
                if function_call is not None:
                    self.tool_call_keys.add((choice.index, "function_call"))
                    self.output_chars += len(function_call.arguments or "")
            if choice.finish_reason:
                self.finish_reasons.append(choice.finish_reason)


# --- Responses API -----------------------------------------------------------------------
def _is_tool_call(item: Any) -> bool:
    kind = getattr(item, "type", "") or ""
    return kind.endswith("_call")  # function_call, custom_tool_call, web_search_call, computer_call, ...


def _responses_extract(response: Any) -> Usage:
    raw = getattr(response, "usage", None)
    if raw is None:
        usage = Usage(estimated=True)
    else:
        usage = Usage(
            input_tokens=_int(getattr(raw, "input_tokens", 0)),
            output_tokens=_int(getattr(raw, "output_tokens", 0)),
            cache_read_tokens=_int(getattr(getattr(raw, "input_tokens_details", None), "cached_tokens", 0)),
            reasoning_tokens=_int(
                getattr(getattr(raw, "output_tokens_details", None), "reasoning_tokens", 0)
            ),
        )
    usage.tool_calls = sum(1 for item in getattr(response, "output", None) or () if _is_tool_call(item))
    usage.response_model = getattr(response, "model", None)
    usage.response_id = getattr(response, "id", None)
    status = getattr(response, "status", None)
    if status:
        usage.finish_reasons = (status,)
    return usage


def _responses_output_text(response: Any) -> str | None:
    parts = []
    for item in getattr(response, "output", None) or ():
        for content in getattr(item, "content", None) or ():
            parts.append(getattr(content, "text", None) or "")
        parts.append(getattr(item, "arguments", None) or "")
    return "".join(parts)


def _responses_input(kwargs: dict[str, Any]) -> int:
    chars = (
        text_chars(kwargs.get("input"))
        + text_chars(kwargs.get("instructions"))
        + text_chars(kwargs.get("tools"))
    )
    return estimate_tokens(chars) + 3


_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
_OUTPUT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


class ResponsesAccumulator(Accumulator):
    def add(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind in _OUTPUT_DELTAS:
            delta = getattr(event, "delta", None)
            if kind == "response.output_text.delta":
                self.add_text(delta)
            elif isinstance(delta, str):
                self.output_chars += len(delta)
        elif kind == "response.output_item.added":
            item = getattr(event, "item", None)
            if _is_tool_call(item):
                self.tool_call_keys.add(getattr(item, "id", None) or getattr(event, "output_index", None))
        elif kind in _RESPONSE_DONE:
            response = getattr(event, "response", None)
            if response is not None and getattr(response, "usage", None) is not None:
                self.reported = _responses_extract(response)
        elif kind == "response.created":
            response = getattr(event, "response", None)
            self.response_model = getattr(response, "model", None)
            self.response_id = getattr(response, "id", None)


# --- embeddings --------------------------------------------------------------------------
def _embeddings_extract(response: Any) -> Usage:
    raw = getattr(response, "usage", None)
    if raw is None:
        return Usage(estimated=True, response_model=getattr(response, "model", None))
    return Usage(
        input_tokens=_int(getattr(raw, "prompt_tokens", 0)), response_model=getattr(response, "model", None)
    )


def _embeddings_input(kwargs: dict[str, Any]) -> int:
    value = kwargs.get("input")
    if isinstance(value, list) and value and isinstance(value[0], int):
        return len(value)  # already tokens
    if isinstance(value, list) and value and isinstance(value[0], list):
        return sum(len(v) for v in value)
    return estimate_tokens(text_chars(value))


def _messages(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("messages") if "messages" in kwargs else kwargs.get("input")


CHAT = Spec(
    _PROVIDER,
    attr.OP_CHAT,
    extract=_chat_extract,
    estimate_input=_chat_input,
    accumulator=ChatAccumulator,
    input_messages=_messages,
    output_text=_chat_output_text,
    provider_of=_provider_of,
)
RESPONSES = Spec(
    _PROVIDER,
    attr.OP_CHAT,
    extract=_responses_extract,
    estimate_input=_responses_input,
    accumulator=ResponsesAccumulator,
    input_messages=_messages,
    output_text=_responses_output_text,
    provider_of=_provider_of,
)
EMBEDDINGS = Spec(
    _PROVIDER,
    attr.OP_EMBEDDINGS,
    extract=_embeddings_extract,
    estimate_input=_embeddings_input,
    provider_of=_provider_of,
)

_CHAT_MODULE = "openai.resources.chat.completions.completions"
_RESPONSES_MODULE = "openai.resources.responses.responses"
_EMBEDDINGS_MODULE = "openai.resources.embeddings"
TARGETS: tuple[Target, ...] = (
    Target(_CHAT_MODULE, "Completions", "create", CHAT, sync_wrapper),
    Target(_CHAT_MODULE, "AsyncCompletions", "create", CHAT, async_wrapper),
    Target(_CHAT_MODULE, "Completions", "parse", CHAT, sync_wrapper),
    Target(_CHAT_MODULE, "AsyncCompletions", "parse", CHAT, async_wrapper),
    Target(_RESPONSES_MODULE, "Responses", "create", RESPONSES, sync_wrapper),
    Target(_RESPONSES_MODULE, "AsyncResponses", "create", RESPONSES, async_wrapper),
    Target(_RESPONSES_MODULE, "Responses", "parse", RESPONSES, sync_wrapper),
    Target(_RESPONSES_MODULE, "AsyncResponses", "parse", RESPONSES, async_wrapper),
    Target(_EMBEDDINGS_MODULE, "Embeddings", "create", EMBEDDINGS, sync_wrapper),
    Target(_EMBEDDINGS_MODULE, "AsyncEmbeddings", "create", EMBEDDINGS, async_wrapper),
)


class OpenAIInstrumentor(BurnguardInstrumentor):
    """burnguard's instrumentation of the `openai` SDK (chat completions, Responses, embeddings)."""

    targets = TARGETS

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("openai >= 1.66",)
