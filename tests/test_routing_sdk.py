"""Routing, escalation, context budgets and step caps with the real OpenAI and Anthropic clients.

The clients talk to local servers that speak the providers' APIs
(`tests/fakes`), so each test sees which model the request really carried and
whether a request was sent at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import tiktoken
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.instrumentation import tokens
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.steps import step_counter

import burnguard
from tests.fakes.harness import (  # noqa: F401
    Harness,
    anthropic_server_fixture,
    harness_fixture,
    openai_server_fixture,
)

ROUTING = parse_budget_yaml("""\
model_classes:
  premium:  [gpt-4.1, claude-opus-4-1]
  standard: [gpt-4.1-mini, claude-sonnet-4-5]
  economy:  [gpt-4.1-nano, claude-haiku-4-5]
downgrade:
  gpt-4.1: gpt-4.1-mini
  gpt-4.1-mini: gpt-4.1-nano
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
context_budgets:
  - {id: summarize-context, feature: summarize, max_input_tokens: 100}
  - {id: chat-context, feature: chat, max_input_tokens: 100, on_exceed: warn}
""")
MESSAGES = [{"role": "user", "content": "Extract the city from: 'I live in Paris.' Answer as JSON."}]
LONG = [{"role": "user", "content": "Summarize this report. " + "The quarter went well. " * 40}]
#: A byte-level tiktoken encoding: exact, so an estimate by it is told apart from the approximation.
BYTES = tiktoken.Encoding(
    name="test-bytes",
    pat_str=r"\S+|\s+",
    mergeable_ranks={bytes([i]): i for i in range(256)},
    special_tokens={},
)


@pytest.fixture(name="routed")
def routed_fixture(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """The harness with the routing file loaded and a private tokenizer cache."""
    monkeypatch.setattr(harness.runtime, "budgets", ROUTING)
    monkeypatch.setattr(tokens, "_encodings", {})
    for model in ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"):
        tokens.register_encoding(model, BYTES)
    yield harness
    step_counter.clear()  # the caps sessions declared here must not follow other tests


def cost(model: str, provider: str, span: Any) -> float:
    a = span.attributes
    price = PriceBook().price(
        model,
        provider,
        input_tokens=a["gen_ai.usage.input_tokens"],
        output_tokens=a["gen_ai.usage.output_tokens"],
    )
    assert price is not None and price > 0
    return price


# --- routing ---------------------------------------------------------------------------------
def test_routine_extraction_reaches_openai_with_the_economy_model(routed: Harness) -> None:
    with burnguard.attribute(tenant="acme", feature="extract"):
        routed.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1-nano"]
    a = routed.only_call().attributes
    assert a["gen_ai.request.model"] == "gpt-4.1-nano"
    assert a["burnguard.routed_from"] == "gpt-4.1"
    assert a["burnguard.route"] == "routine"
    assert a["burnguard.model_class"] == "economy"
    assert a["burnguard.fallback"] is True
    assert a["burnguard.cost.usd"] == pytest.approx(cost("gpt-4.1-nano", "openai", routed.only_call()))


def test_routine_classification_reaches_anthropic_with_its_own_economy_model(routed: Harness) -> None:
    with burnguard.attribute(feature="classify"):
        routed.anthropic().messages.create(model="claude-opus-4-1", max_tokens=50, messages=MESSAGES)
    assert routed.anthropic_server.models == ["claude-haiku-4-5"]
    a = routed.only_call().attributes
    assert a["burnguard.routed_from"] == "claude-opus-4-1"
    assert a["gen_ai.provider.name"] == "anthropic"


def test_a_high_stakes_call_keeps_the_premium_model(routed: Harness) -> None:
    with burnguard.attribute(feature="extract"), burnguard.stakes("high"):
        routed.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
        routed.anthropic().messages.create(model="claude-opus-4-1", max_tokens=50, messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1"]
    assert routed.anthropic_server.models == ["claude-opus-4-1"]
    for span in routed.calls():
        assert span.attributes["burnguard.stakes"] == "high"  # carried as baggage onto the span
        assert span.attributes["burnguard.route"] == "high-stakes"
        assert "burnguard.routed_from" not in span.attributes


def test_stakes_must_be_a_known_level() -> None:
    with (
        pytest.raises(ValueError, match="stakes must be one of low, normal, high"),
        burnguard.stakes("urgent"),
    ):
        pass


def test_a_budget_downgrade_walks_the_ladder_from_the_routed_model(routed: Harness) -> None:
    from tests.fakes.harness import make_signal

    routed.runtime.guard = guard = BudgetGuard(KafkaSettings(), Topics(), ROUTING)  # never started
    guard.apply(make_signal("downgrade"))
    with burnguard.attribute(tenant="acme"), burnguard.stakes("high"):
        routed.openai().chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1-mini"]  # routed up to gpt-4.1, then one step down
    a = routed.only_call().attributes
    assert a["burnguard.routed_from"] == "gpt-4.1-mini"
    assert a["burnguard.downgraded_from"] == "gpt-4.1"


# --- escalation ------------------------------------------------------------------------------
def is_json(reply: Any) -> Any:
    return json.loads(reply.choices[0].message.content)


def test_an_escalation_sends_two_requests_and_records_both(routed: Harness) -> None:
    routed.openai_server.replies.update(
        {"gpt-4.1-nano": "The city is Paris.", "gpt-4.1-mini": '{"city": "Paris"}'}
    )
    with burnguard.attribute(feature="extract"), burnguard.escalate_on(is_json):
        reply = routed.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris"}
    assert routed.openai_server.models == ["gpt-4.1-nano", "gpt-4.1-mini"]
    first, second = sorted(routed.calls(), key=lambda s: s.start_time)
    assert first.attributes["gen_ai.request.model"] == "gpt-4.1-nano"
    assert first.attributes["burnguard.routed_from"] == "gpt-4.1"
    assert "burnguard.escalated_from" not in first.attributes
    assert second.attributes["gen_ai.request.model"] == "gpt-4.1-mini"
    assert second.attributes["burnguard.escalated_from"] == "gpt-4.1-nano"
    assert "burnguard.routed_from" not in second.attributes  # the retry is not routed back down
    assert first.attributes["burnguard.cost.usd"] == pytest.approx(cost("gpt-4.1-nano", "openai", first))
    assert second.attributes["burnguard.cost.usd"] == pytest.approx(cost("gpt-4.1-mini", "openai", second))


def test_a_response_that_passes_the_check_is_not_escalated(routed: Harness) -> None:
    routed.openai_server.replies["gpt-4.1-nano"] = '{"city": "Paris"}'
    with burnguard.attribute(feature="extract"), burnguard.escalate_on(is_json):
        routed.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1-nano"]


def test_an_async_anthropic_escalation_retries_once_on_the_next_class(routed: Harness) -> None:
    routed.anthropic_server.replies["claude-haiku-4-5"] = "I cannot help with that."
    routed.anthropic_server.replies["claude-sonnet-4-5"] = "I cannot help with that either."

    def no_refusal(message: Any) -> bool:
        return not message.content[0].text.startswith("I cannot")

    async def ask() -> Any:
        client = routed.async_anthropic()
        with burnguard.attribute(feature="classify"), burnguard.escalate_on(no_refusal):
            return await client.messages.create(model="claude-opus-4-1", max_tokens=50, messages=MESSAGES)

    reply = asyncio.run(ask())
    assert reply.content[0].text == "I cannot help with that either."  # the retry's answer, checked no more
    assert routed.anthropic_server.models == ["claude-haiku-4-5", "claude-sonnet-4-5"]  # once, not twice
    escalated = [s for s in routed.calls() if "burnguard.escalated_from" in s.attributes]
    assert [s.attributes["burnguard.escalated_from"] for s in escalated] == ["claude-haiku-4-5"]


def test_no_escalation_while_budget_pressure_would_send_the_retry_back_down(routed: Harness) -> None:
    from tests.fakes.harness import make_signal

    routed.runtime.guard = guard = BudgetGuard(KafkaSettings(), Topics(), ROUTING)
    guard.apply(make_signal("downgrade"))
    with burnguard.attribute(tenant="acme"), burnguard.escalate_on(is_json):
        reply = routed.openai().chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1-nano"]  # downgraded once, and not sent again
    assert not is_json_safe(reply)
    assert [s.attributes.get("burnguard.escalated_from") for s in routed.calls()] == [None]


def is_json_safe(reply: Any) -> bool:
    try:
        is_json(reply)
    except ValueError:
        return False
    return True


def test_the_top_class_has_nowhere_to_escalate(routed: Harness) -> None:
    with burnguard.escalate_on(lambda reply: False):
        routed.openai().chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert routed.openai_server.models == ["gpt-4.1"]


# --- context budgets -------------------------------------------------------------------------
def test_a_prompt_over_the_context_budget_is_refused_before_any_request(routed: Harness) -> None:
    with burnguard.attribute(feature="summarize"), pytest.raises(burnguard.ContextBudgetExceeded) as refused:
        routed.openai().chat.completions.create(model="gpt-4.1", messages=LONG)
    assert routed.openai_server.requests == []
    expected = len(LONG[0]["content"].encode()) + 4 + 3  # byte-level tokens + message framing
    assert f"{expected:,} input tokens" in str(refused.value) and "at most 100" in str(refused.value)
    (span,) = routed.spans()
    a = span.attributes
    assert a["burnguard.refused"] == "context"
    assert a["burnguard.context.estimated_input_tokens"] == expected
    assert a["burnguard.context.estimator"] == "tiktoken:test-bytes"
    assert a["burnguard.cost.usd"] == 0.0


def test_anthropic_prompts_are_estimated_with_the_documented_approximation(routed: Harness) -> None:
    with burnguard.attribute(feature="summarize"), pytest.raises(burnguard.ContextBudgetExceeded):
        routed.anthropic().messages.create(model="claude-opus-4-1", max_tokens=50, messages=LONG)
    assert routed.anthropic_server.requests == []
    a = routed.spans()[0].attributes
    chars = len(LONG[0]["content"])
    assert a["burnguard.context.estimator"] == "approx:chars/4"
    assert a["burnguard.context.estimated_input_tokens"] == (chars + 3) // 4 + 4 + 3


def test_the_estimate_is_recorded_beside_the_providers_count(routed: Harness) -> None:
    with burnguard.attribute(feature="summarize"):
        routed.openai().chat.completions.create(
            model="gpt-4.1", messages=MESSAGES, extra_headers={"x-fake-input": "21"}
        )
    a = routed.only_call().attributes
    assert a["burnguard.context.estimated_input_tokens"] == len(MESSAGES[0]["content"].encode()) + 7
    assert a["gen_ai.usage.input_tokens"] == 21
    assert a["burnguard.context.max_input_tokens"] == 100


def test_a_warning_context_budget_lets_the_call_through_and_marks_it(routed: Harness) -> None:
    with burnguard.attribute(feature="chat"):
        routed.openai().chat.completions.create(model="gpt-4.1", messages=LONG)
    assert routed.openai_server.models == ["gpt-4.1"]
    assert routed.only_call().attributes["burnguard.context.exceeded"] is True


# --- step caps -------------------------------------------------------------------------------
def test_the_llm_call_after_the_session_cap_is_refused(routed: Harness) -> None:
    client = routed.openai()
    with burnguard.session("agent-run-1", max_llm_calls=2):
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
        routed.anthropic().messages.create(model="claude-opus-4-1", max_tokens=50, messages=MESSAGES)
        with pytest.raises(burnguard.StepCapExceeded, match="agent-run-1"):
            client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    assert len(routed.openai_server.requests) == 1 and len(routed.anthropic_server.requests) == 1
    refused = [s for s in routed.spans() if s.attributes.get("burnguard.refused") == "step_cap"]
    assert len(refused) == 1 and refused[0].attributes["session.id"] == "agent-run-1"
    # The same session in a later request: the count goes on.
    with burnguard.session("agent-run-1"), pytest.raises(burnguard.StepCapExceeded):
        client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)


def test_the_tool_call_after_the_session_cap_is_refused(routed: Harness) -> None:
    ran: list[str] = []

    @burnguard.tool
    def search(query: str) -> str:
        ran.append(query)
        return "result"

    with burnguard.session("agent-run-2", max_tool_calls=2):
        search("a")
        with burnguard.tool_call("fetch"):
            ran.append("fetch")
        with pytest.raises(burnguard.StepCapExceeded, match="2 tool calls"):
            search("b")
    assert ran == ["a", "fetch"]
    refused = [s for s in routed.spans() if s.attributes.get("burnguard.refused") == "step_cap"]
    assert [s.name for s in refused] == ["execute_tool search"]


def test_images_in_the_prompt_are_not_counted_as_text(routed: Harness) -> None:
    image = "data:image/png;base64," + "A" * 400_000
    parts = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    with burnguard.attribute(feature="summarize"):
        routed.openai().chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": parts}]
        )
        routed.anthropic().messages.create(
            model="claude-opus-4-1",
            max_tokens=50,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "A" * 400_000},
                        },
                    ],
                }
            ],
        )
    assert len(routed.calls()) == 2  # neither was refused by the 100-token context budget
    estimates = sorted(s.attributes["burnguard.context.estimated_input_tokens"] for s in routed.calls())
    assert estimates == [(24 + 3) // 4 + 7, 24 + 7]  # the text alone: approximated, byte-level tiktoken


def test_an_encoding_is_loaded_in_the_background_and_calls_never_wait_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    monkeypatch.setattr(tokens, "_encodings", {})
    release = threading.Event()

    def slow_download(model: str) -> Any:
        release.wait(10)  # tiktoken fetching a vocabulary over a slow network
        return BYTES

    monkeypatch.setattr(tokens, "_load_encoding", slow_download)
    prompt = {"messages": [{"role": "user", "content": "abcdefgh"}]}
    assert tokens.count_prompt_tokens("gpt-4.1", "openai", prompt) == (2 + 7, "approx:chars/4")
    release.set()
    assert tokens.wait_for_encoding("gpt-4.1") is BYTES
    assert tokens.count_prompt_tokens("gpt-4.1", "openai", prompt) == (8 + 7, "tiktoken:test-bytes")
    assert tokens.count_prompt_tokens("claude-opus-4-1", "anthropic", prompt)[1] == "approx:chars/4"
