"""burnguard's OpenAI instrumentation with the real `openai` client against a local OpenAI API server."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import openai
import pytest
from burnguard.contracts.pricing import PriceBook
from burnguard.instrumentation.openai import OpenAIInstrumentor
from opentelemetry.trace import SpanKind, StatusCode

import burnguard
from tests.fakes.harness import (  # noqa: F401
    Harness,
    anthropic_server_fixture,
    harness_fixture,
    make_signal,
    openai_server_fixture,
)

MESSAGES = [{"role": "user", "content": "What is the weather in Paris? Answer briefly."}]
INCLUDE_USAGE = {"include_usage": True}


def cost(model: str, **usage: int) -> float:
    price = PriceBook().price(model, "openai", **usage)
    assert price is not None and price > 0
    return price


def assert_call(span: Any, model: str, *, input_tokens: int, output_tokens: int, **extra: Any) -> None:
    a = span.attributes
    assert span.name == f"{a['gen_ai.operation.name']} {model}"
    assert span.kind == SpanKind.CLIENT
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.response.model"] == model
    assert a["gen_ai.usage.input_tokens"] == input_tokens
    assert a["gen_ai.usage.output_tokens"] == output_tokens
    for name, value in extra.items():
        assert a.get(name) == value, (name, a.get(name))


# --- chat completions ---------------------------------------------------------------------
def test_chat_create(harness: Harness) -> None:
    reply = harness.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello")
    span = harness.only_call()
    assert_call(span, "gpt-4.1", input_tokens=120, output_tokens=30)
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.response.id"] == reply.id
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["burnguard.model_class"] == "premium"
    assert a["burnguard.cost.usd"] == pytest.approx(cost("gpt-4.1", input_tokens=120, output_tokens=30))
    assert "burnguard.usage.estimated" not in a and "burnguard.tool_calls" not in a
    assert span.status.status_code == StatusCode.UNSET
    assert harness.openai_server.models == ["gpt-4.1"]


def test_chat_cached_and_reasoning_tokens(harness: Harness) -> None:
    headers = {
        "x-fake-input": "2000",
        "x-fake-output": "300",
        "x-fake-cached": "1500",
        "x-fake-reasoning": "200",
    }
    harness.openai().chat.completions.create(model="o3", messages=MESSAGES, extra_headers=headers)
    a = harness.only_call().attributes
    assert a["gen_ai.usage.input_tokens"] == 2000  # OpenAI's prompt_tokens already include the cached ones
    assert a["gen_ai.usage.cache_read.input_tokens"] == 1500
    assert a["gen_ai.usage.reasoning.output_tokens"] == 200
    want = cost("o3", input_tokens=2000, output_tokens=300, cache_read_tokens=1500)
    assert a["burnguard.cost.usd"] == pytest.approx(want)
    assert want < cost("o3", input_tokens=2000, output_tokens=300)  # the cache discount is applied


def test_chat_tool_calls_are_counted(harness: Harness) -> None:
    reply = harness.openai().chat.completions.create(
        model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-tool-calls": "2"}
    )
    assert len(reply.choices[0].message.tool_calls) == 2
    a = harness.only_call().attributes
    assert a["burnguard.tool_calls"] == 2
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)


def test_chat_stream_with_usage(harness: Harness) -> None:
    stream = harness.openai().chat.completions.create(
        model="gpt-4.1-mini",
        messages=MESSAGES,
        stream=True,
        stream_options=INCLUDE_USAGE,
        extra_headers={"x-fake-tool-calls": "3", "x-fake-cached": "64", "x-fake-reasoning": "7"},
    )
    assert harness.calls() == []  # the span stays open while the stream is read
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == 120
    a = harness.only_call().attributes
    assert a["gen_ai.usage.input_tokens"] == 120 and a["gen_ai.usage.output_tokens"] == 30
    assert a["gen_ai.usage.cache_read.input_tokens"] == 64
    assert a["gen_ai.usage.reasoning.output_tokens"] == 7
    assert a["burnguard.tool_calls"] == 3
    assert "burnguard.usage.estimated" not in a
    assert a["gen_ai.response.id"] == chunks[0].id


def test_chat_stream_without_usage_is_estimated_not_zero(harness: Harness) -> None:
    stream = harness.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Hello")
    a = harness.only_call().attributes
    assert a["burnguard.usage.estimated"] is True
    assert a["gen_ai.usage.input_tokens"] >= 10  # the prompt's ~45 characters, a few tokens of overhead
    assert a["gen_ai.usage.output_tokens"] == pytest.approx(len(text) / 4, abs=1)
    assert a["burnguard.cost.usd"] > 0


def test_async_chat_create_and_stream(harness: Harness) -> None:
    async def main() -> list[Any]:
        client = harness.async_openai()
        await client.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-output": "7"}
        )
        stream = await client.chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
        )
        return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert chunks[-1].usage is not None
    plain, streamed = harness.calls()
    assert_call(plain, "gpt-4.1", input_tokens=120, output_tokens=7)
    assert_call(streamed, "gpt-4.1", input_tokens=120, output_tokens=30)
    assert "burnguard.usage.estimated" not in streamed.attributes


def test_stream_helper_sync_and_async(harness: Harness) -> None:
    client = harness.openai()
    with client.chat.completions.stream(
        model="gpt-4.1", messages=MESSAGES, stream_options=INCLUDE_USAGE
    ) as s:
        final = s.get_final_completion()
    assert final.usage.completion_tokens == 30 and final.choices[0].message.content.startswith("Hello")

    async def main() -> Any:
        aclient = harness.async_openai()
        async with aclient.chat.completions.stream(
            model="gpt-4.1-mini", messages=MESSAGES, extra_headers={"x-fake-tool-calls": "1"}
        ) as s:
            return await s.get_final_completion()

    afinal = asyncio.run(main())
    assert afinal.choices[0].message.tool_calls[0].function.name == "get_weather"
    sync_span, async_span = harness.calls()
    assert_call(sync_span, "gpt-4.1", input_tokens=120, output_tokens=30)
    assert async_span.attributes["burnguard.tool_calls"] == 1
    assert async_span.attributes["burnguard.usage.estimated"] is True  # no include_usage asked


def test_chat_parse(harness: Harness) -> None:
    parsed = harness.openai().chat.completions.parse(model="gpt-4.1", messages=MESSAGES)
    assert parsed.choices[0].message.content.startswith("Hello")
    assert_call(harness.only_call(), "gpt-4.1", input_tokens=120, output_tokens=30)


def test_with_raw_response(harness: Harness) -> None:
    client = harness.openai()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse().usage.total_tokens == 150
    raw_stream = client.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    assert raw_stream.http_response.status_code == 200
    assert len(harness.calls()) == 1  # the streamed one is open until read
    assert sum(1 for _ in raw_stream.parse()) > 3
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4.1", messages=MESSAGES
    ) as response:
        assert response.parse().usage.prompt_tokens == 120
    calls = harness.calls()
    assert len(calls) == 3
    for span in calls:
        assert_call(span, "gpt-4.1", input_tokens=120, output_tokens=30)


# --- Responses API ---------------------------------------------------------------------------
def test_responses_create(harness: Harness) -> None:
    headers = {"x-fake-cached": "20", "x-fake-reasoning": "12"}
    response = harness.openai().responses.create(model="gpt-4.1", input="Hi there", extra_headers=headers)
    assert response.output_text.startswith("Hello")
    span = harness.only_call()
    assert_call(span, "gpt-4.1", input_tokens=120, output_tokens=30)
    a = span.attributes
    assert a["gen_ai.usage.cache_read.input_tokens"] == 20 and a["gen_ai.usage.reasoning.output_tokens"] == 12
    assert a["gen_ai.response.id"] == response.id
    assert a["burnguard.cost.usd"] == pytest.approx(
        cost("gpt-4.1", input_tokens=120, output_tokens=30, cache_read_tokens=20)
    )


def test_responses_tool_calls_stream_and_helper(harness: Harness) -> None:
    client = harness.openai()
    client.responses.create(model="gpt-4.1", input="weather?", extra_headers={"x-fake-tool-calls": "2"})
    events = list(client.responses.create(model="gpt-4.1", input="Hi", stream=True))
    assert events[-1].type == "response.completed"
    with client.responses.stream(model="gpt-4.1", input="Hi", extra_headers={"x-fake-tool-calls": "3"}) as s:
        final = s.get_final_response()
    assert [item.type for item in final.output] == ["function_call"] * 3
    tools, streamed, helper = harness.calls()
    assert tools.attributes["burnguard.tool_calls"] == 2
    assert_call(streamed, "gpt-4.1", input_tokens=120, output_tokens=30)
    assert "burnguard.usage.estimated" not in streamed.attributes
    assert helper.attributes["burnguard.tool_calls"] == 3
    assert helper.attributes["gen_ai.usage.input_tokens"] == 120


def test_async_responses(harness: Harness) -> None:
    async def main() -> None:
        client = harness.async_openai()
        await client.responses.create(model="gpt-4.1-mini", input="Hi")
        stream = await client.responses.create(model="gpt-4.1-mini", input="Hi", stream=True)
        async for _ in stream:
            pass
        async with client.responses.stream(model="gpt-4.1-mini", input="Hi") as s:
            await s.get_final_response()

    asyncio.run(main())
    calls = harness.calls()
    assert len(calls) == 3
    for span in calls:
        assert_call(span, "gpt-4.1-mini", input_tokens=120, output_tokens=30)


# --- embeddings ---------------------------------------------------------------------------------
def test_embeddings_sync_and_async(harness: Harness) -> None:
    result = harness.openai().embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8

    async def main() -> None:
        await harness.async_openai().embeddings.create(model="text-embedding-3-small", input="one")

    asyncio.run(main())
    sync_span, async_span = harness.calls()
    for span, tokens in ((sync_span, 16), (async_span, 8)):
        a = span.attributes
        assert span.name == "embeddings text-embedding-3-small"
        assert a["gen_ai.operation.name"] == "embeddings"
        assert a["gen_ai.usage.input_tokens"] == tokens
        assert a["burnguard.cost.usd"] == pytest.approx(cost("text-embedding-3-small", input_tokens=tokens))


# --- errors and abandoned streams ---------------------------------------------------------------
@pytest.mark.parametrize(("status", "error"), [(429, openai.RateLimitError), (400, openai.BadRequestError)])
def test_provider_error_sets_error_type(harness: Harness, status: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        harness.openai().chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-status": str(status)}
        )
    span = harness.only_call()
    assert span.attributes["error.type"] == error.__name__
    assert span.status.status_code == StatusCode.ERROR
    assert (
        "gen_ai.usage.output_tokens" not in span.attributes
        or span.attributes["gen_ai.usage.output_tokens"] == 0
    )


def test_async_provider_error(harness: Harness) -> None:
    async def main() -> None:
        await harness.async_openai().responses.create(
            model="gpt-4.1", input="Hi", extra_headers={"x-fake-status": "429"}
        )

    with pytest.raises(openai.RateLimitError):
        asyncio.run(main())
    assert harness.only_call().attributes["error.type"] == "RateLimitError"


def test_stream_abandoned_half_way_and_closed(harness: Harness) -> None:
    stream = harness.openai().chat.completions.create(
        model="gpt-4.1",
        messages=MESSAGES,
        stream=True,
        stream_options=INCLUDE_USAGE,
        extra_headers={"x-fake-chunks": "200"},
    )
    seen = [next(stream) for _ in range(41)]  # the role chunk and 40 of 200 text pieces
    stream.close()
    a = harness.only_call().attributes
    assert a["burnguard.usage.estimated"] is True  # the usage chunk never arrived
    text = "".join(c.choices[0].delta.content or "" for c in seen)
    assert a["gen_ai.usage.output_tokens"] == pytest.approx(len(text) / 4, abs=1)
    assert 0 < a["gen_ai.usage.output_tokens"] < 200
    assert a["gen_ai.usage.input_tokens"] > 0


def test_stream_abandoned_without_close_ends_when_dropped(harness: Harness) -> None:
    def read_a_little() -> None:
        stream = harness.openai().chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "100"}
        )
        for i, _ in enumerate(stream):
            if i == 5:
                break

    read_a_little()
    gc.collect()
    a = harness.only_call().attributes
    assert a["burnguard.usage.estimated"] is True and a["gen_ai.usage.output_tokens"] > 0


# --- content capture ------------------------------------------------------------------------------
def test_message_content_is_not_captured_by_default(harness: Harness) -> None:
    harness.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    for span in harness.spans():
        values = " ".join(str(v) for v in span.attributes.values())
        assert "Paris" not in values and "Hello from" not in values
        assert "gen_ai.input.messages" not in span.attributes
        assert not span.events


def test_message_content_captured_when_opted_in(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    client = harness.openai()
    client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    list(client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True))
    for span in harness.calls():
        assert "Paris" in span.attributes["gen_ai.input.messages"]
        assert "Hello from the fake model" in span.attributes["gen_ai.output.messages"]


# --- enforcement -------------------------------------------------------------------------------------
def test_throttled_tenant_raises_before_any_request(harness: Harness) -> None:
    harness.enforce(make_signal("throttle", key="acme"))
    client = harness.openai()
    with burnguard.attribute(tenant="acme"):
        with pytest.raises(burnguard.BudgetExceeded, match="tenant-daily"):
            client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
        with pytest.raises(burnguard.BudgetExceeded):
            client.chat.completions.create(model="gpt-4.1", messages=MESSAGES, stream=True)
        with pytest.raises(burnguard.BudgetExceeded):
            client.responses.create(model="gpt-4.1", input="Hi")
        with (
            pytest.raises(burnguard.BudgetExceeded),
            client.chat.completions.stream(model="gpt-4.1", messages=MESSAGES),
        ):
            pass

        async def main() -> None:
            await harness.async_openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)

        with pytest.raises(burnguard.BudgetExceeded):
            asyncio.run(main())
    assert harness.openai_server.requests == []
    with burnguard.attribute(tenant="globex"):  # another tenant is not throttled
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert harness.openai_server.models == ["gpt-4.1"]


def test_downgrade_sends_the_cheaper_model(harness: Harness) -> None:
    harness.enforce(make_signal("downgrade", key="acme", downgrade_to="standard"))
    client = harness.openai()

    async def main() -> None:
        stream = await harness.async_openai().chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
        )
        async for _ in stream:
            pass

    with burnguard.attribute(tenant="acme"):
        reply = client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
        list(client.responses.create(model="gpt-4.1", input="Hi", stream=True))
        asyncio.run(main())
    assert reply.model == "gpt-4.1-mini"
    assert harness.openai_server.models == ["gpt-4.1-mini"] * 3
    for span in harness.calls():
        a = span.attributes
        assert span.name == "chat gpt-4.1-mini"
        assert a["gen_ai.request.model"] == "gpt-4.1-mini"
        assert a["burnguard.downgraded_from"] == "gpt-4.1"
        assert a["burnguard.model_class"] == "standard"
        assert a["burnguard.cost.usd"] == pytest.approx(
            cost("gpt-4.1-mini", input_tokens=120, output_tokens=30)
        )


def test_uninstrument_restores_the_client(harness: Harness) -> None:
    OpenAIInstrumentor().uninstrument()
    try:
        harness.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
        assert harness.calls() == []
    finally:
        OpenAIInstrumentor().instrument(tracer_provider=harness.runtime.tracer_provider)
