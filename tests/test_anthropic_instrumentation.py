"""burnguard's Anthropic instrumentation: the real `anthropic` client against a local Messages API."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest
from burnguard.contracts.pricing import PriceBook
from opentelemetry.trace import SpanKind, StatusCode

import burnguard
from tests.fakes.harness import (  # noqa: F401
    Harness,
    anthropic_server_fixture,
    harness_fixture,
    make_signal,
    openai_server_fixture,
)

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris? Answer briefly."}]
CACHE = {"x-fake-cached": "5000", "x-fake-cache-creation": "1200"}

pytestmark = pytest.mark.filterwarnings(
    "ignore:The model:DeprecationWarning"
)  # the SDK's model retirement notes


def cost(model: str, **usage: int) -> float:
    price = PriceBook().price(model, "anthropic", **usage)
    assert price is not None and price > 0
    return price


def create(client: Any, **kwargs: Any) -> Any:
    return client.messages.create(**{"model": MODEL, "max_tokens": 256, "messages": MESSAGES, **kwargs})


def assert_cached_usage(span: Any, model: str = MODEL) -> None:
    a = span.attributes
    assert span.name == f"chat {model}" and span.kind == SpanKind.CLIENT
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == model and a["gen_ai.response.model"] == model
    # Anthropic's input_tokens (100) exclude the cache tokens; the semconv count includes them.
    assert a["gen_ai.usage.input_tokens"] == 100 + 5000 + 1200
    assert a["gen_ai.usage.cache_read.input_tokens"] == 5000
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 1200
    assert a["gen_ai.usage.output_tokens"] == 25
    want = cost(
        model, input_tokens=6300, output_tokens=25, cache_read_tokens=5000, cache_creation_tokens=1200
    )
    assert a["burnguard.cost.usd"] == pytest.approx(want)
    assert "burnguard.usage.estimated" not in a


def test_create_with_cache_tokens(harness: Harness) -> None:
    message = create(harness.anthropic(), extra_headers=CACHE)
    assert message.usage.input_tokens == 100
    span = harness.only_call()
    assert_cached_usage(span)
    assert span.attributes["gen_ai.response.id"] == message.id
    assert span.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert span.attributes["burnguard.model_class"] == "standard"
    assert harness.anthropic_server.models == [MODEL]


def test_tool_use_blocks_are_counted(harness: Harness) -> None:
    message = create(harness.anthropic(), extra_headers={"x-fake-tool-calls": "2"})
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    a = harness.only_call().attributes
    assert a["burnguard.tool_calls"] == 2
    assert a["gen_ai.response.finish_reasons"] == ("tool_use",)


def test_stream_true_sync(harness: Harness) -> None:
    events = list(create(harness.anthropic(), stream=True, extra_headers={**CACHE, "x-fake-tool-calls": "1"}))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    span = harness.only_call()
    assert_cached_usage(span)
    assert span.attributes["burnguard.tool_calls"] == 1


def test_async_create_and_stream(harness: Harness) -> None:
    async def main() -> None:
        client = harness.async_anthropic()
        await create(client, extra_headers=CACHE)
        stream = await create(client, stream=True, extra_headers=CACHE)
        async for _ in stream:
            pass

    asyncio.run(main())
    plain, streamed = harness.calls()
    assert_cached_usage(plain)
    assert_cached_usage(streamed)


def test_stream_helper_sync_and_async(harness: Harness) -> None:
    with harness.anthropic().messages.stream(
        model=MODEL, max_tokens=256, messages=MESSAGES, extra_headers={**CACHE, "x-fake-tool-calls": "2"}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("Hello") and final.usage.output_tokens == 25

    async def main() -> Any:
        async with harness.async_anthropic().messages.stream(
            model=MODEL, max_tokens=256, messages=MESSAGES, extra_headers=CACHE
        ) as stream:
            return await stream.get_final_message()

    assert asyncio.run(main()).usage.cache_read_input_tokens == 5000
    sync_span, async_span = harness.calls()
    assert_cached_usage(sync_span)
    assert sync_span.attributes["burnguard.tool_calls"] == 2
    assert_cached_usage(async_span)


def test_with_raw_response(harness: Harness) -> None:
    raw = harness.anthropic().messages.with_raw_response.create(
        model=MODEL, max_tokens=256, messages=MESSAGES, extra_headers=CACHE
    )
    assert raw.parse().usage.output_tokens == 25
    assert_cached_usage(harness.only_call())


@pytest.mark.parametrize(
    ("status", "error"), [(429, anthropic.RateLimitError), (529, anthropic.InternalServerError)]
)
def test_provider_error_sets_error_type(harness: Harness, status: int, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        create(harness.anthropic(), extra_headers={"x-fake-status": str(status)})
    span = harness.only_call()
    assert span.attributes["error.type"] == type(raised.value).__qualname__
    assert span.status.status_code == StatusCode.ERROR


def test_stream_abandoned_half_way_keeps_the_usage_seen(harness: Harness) -> None:
    stream = create(harness.anthropic(), stream=True, extra_headers={**CACHE, "x-fake-chunks": "200"})
    seen = [next(stream) for _ in range(43)]  # message_start, block start, ping, 40 text deltas
    stream.close()
    a = harness.only_call().attributes
    assert a["gen_ai.usage.input_tokens"] == 6300  # from message_start: reported, not guessed
    assert a["gen_ai.usage.cache_read.input_tokens"] == 5000
    text = "".join(e.delta.text for e in seen if e.type == "content_block_delta")
    assert a["gen_ai.usage.output_tokens"] == pytest.approx(len(text) / 4, abs=1)
    assert a["burnguard.usage.estimated"] is True


def test_async_stream_abandoned_half_way(harness: Harness) -> None:
    async def main() -> None:
        stream = await create(harness.async_anthropic(), stream=True, extra_headers={"x-fake-chunks": "200"})
        count = 0
        async for _ in stream:
            count += 1
            if count == 10:
                break
        await stream.close()

    asyncio.run(main())
    a = harness.only_call().attributes
    assert a["gen_ai.usage.input_tokens"] == 100 and a["burnguard.usage.estimated"] is True


def test_throttled_tenant_raises_before_any_request(harness: Harness) -> None:
    harness.enforce(make_signal("throttle", key="acme"))
    client = harness.anthropic()
    with burnguard.attribute(tenant="acme"):
        with pytest.raises(burnguard.BudgetExceeded, match="tenant-daily"):
            create(client)
        with pytest.raises(burnguard.BudgetExceeded):
            create(client, stream=True)
        with pytest.raises(burnguard.BudgetExceeded):
            client.messages.stream(model=MODEL, max_tokens=256, messages=MESSAGES)

        async def main() -> None:
            await create(harness.async_anthropic())

        with pytest.raises(burnguard.BudgetExceeded):
            asyncio.run(main())
    assert harness.anthropic_server.requests == []


def test_downgrade_sends_the_cheaper_model(harness: Harness) -> None:
    harness.enforce(make_signal("downgrade", key="acme", downgrade_to="standard"))
    client = harness.anthropic()
    with burnguard.attribute(tenant="acme"):
        message = create(client, model="claude-opus-4-1")
        list(create(client, model="claude-opus-4-1", stream=True))
        with client.messages.stream(model="claude-opus-4-1", max_tokens=256, messages=MESSAGES) as stream:
            stream.get_final_message()
    assert message.model == MODEL
    assert harness.anthropic_server.models == [MODEL] * 3
    for span in harness.calls():
        assert span.attributes["gen_ai.request.model"] == MODEL
        assert span.attributes["burnguard.downgraded_from"] == "claude-opus-4-1"
        assert span.attributes["burnguard.cost.usd"] == pytest.approx(
            cost(MODEL, input_tokens=100, output_tokens=25)
        )
