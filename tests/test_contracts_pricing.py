"""PriceBook (docs/ARCHITECTURE.md §3): genai-prices' numbers, resolved once per model, overrides first."""

from __future__ import annotations

import math

import genai_prices
import pytest
from burnguard.contracts import pricing
from burnguard.contracts.pricing import ModelRates, PriceBook, default_price_book, provider_id
from genai_prices import Usage, calc_price

from tests.factories import span_usage


def expected(model: str, provider: str | None, **tokens: int) -> float:
    """What genai-prices says, with our token names mapped to its `Usage` fields."""
    usage = Usage(
        input_tokens=tokens.get("input_tokens", 0),
        output_tokens=tokens.get("output_tokens", 0),
        cache_read_tokens=tokens.get("cache_read_tokens", 0),
        cache_write_tokens=tokens.get("cache_creation_tokens", 0),
    )
    return float(calc_price(usage, model, provider_id=provider).total_price)


CASES = [
    # (model, OpenTelemetry provider name, genai-prices provider id, tokens)
    ("gpt-4.1", "openai", "openai", dict(input_tokens=1234, output_tokens=567)),
    ("gpt-4.1", "openai", "openai", dict(input_tokens=1234, output_tokens=567, cache_read_tokens=1000)),
    ("gpt-4.1-mini", "openai", "openai", dict(input_tokens=98765, output_tokens=4321)),
    ("gpt-4.1-mini", "", None, dict(input_tokens=10, output_tokens=1)),
    ("o3", "openai", "openai", dict(input_tokens=50_000, output_tokens=9_000)),
    ("claude-sonnet-4-5", "anthropic", "anthropic", dict(input_tokens=150_000, output_tokens=2_000)),
    ("claude-sonnet-4-5", "anthropic", "anthropic", dict(input_tokens=200_000, output_tokens=2_000)),
    ("claude-sonnet-4-5", "anthropic", "anthropic", dict(input_tokens=250_000, output_tokens=2_000)),
    (
        "claude-sonnet-4-5",
        "anthropic",
        "anthropic",
        dict(
            input_tokens=250_000, output_tokens=2_000, cache_read_tokens=100_000, cache_creation_tokens=20_000
        ),
    ),
    (
        "claude-opus-4-1",
        "anthropic",
        "anthropic",
        dict(input_tokens=30_000, output_tokens=1_500, cache_read_tokens=20_000, cache_creation_tokens=5_000),
    ),
    ("text-embedding-3-small", "openai", "openai", dict(input_tokens=8_000)),
    ("text-embedding-3-large", "openai", "openai", dict(input_tokens=123_456)),
]


@pytest.mark.parametrize(("model", "otel_provider", "genai_provider", "tokens"), CASES)
def test_price_equals_genai_prices(model: str, otel_provider: str, genai_provider, tokens: dict) -> None:
    want = expected(model, genai_provider, **tokens)
    got = PriceBook().price(model, otel_provider, **tokens)
    assert want > 0
    assert got is not None
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0), (got, want)


def test_sonnet_tier_applies_above_200k_input_tokens() -> None:
    book = PriceBook()
    below = book.price("claude-sonnet-4-5", "anthropic", input_tokens=200_000, output_tokens=0)
    above = book.price("claude-sonnet-4-5", "anthropic", input_tokens=200_001, output_tokens=0)
    # The cliff tier prices *all* tokens at the higher rate, so one more token roughly doubles the cost.
    assert above > 1.9 * below


def test_cache_tokens_are_cheaper_than_uncached_input() -> None:
    book = PriceBook()
    plain = book.price("claude-opus-4-1", "anthropic", input_tokens=30_000)
    cached = book.price("claude-opus-4-1", "anthropic", input_tokens=30_000, cache_read_tokens=20_000)
    written = book.price("claude-opus-4-1", "anthropic", input_tokens=30_000, cache_creation_tokens=20_000)
    assert cached < plain < written


def test_unknown_model_is_none() -> None:
    book = PriceBook()
    assert book.price("acme-llm-9000", "openai", input_tokens=1000, output_tokens=10) is None
    assert book.price("acme-llm-9000", "", input_tokens=1000) is None
    assert book.price("acme-llm-9000", "no-such-provider", input_tokens=1000) is None
    assert book.price("", "openai", input_tokens=1000) is None
    assert book.rates("acme-llm-9000", "openai") is None


def test_overrides_win_over_genai_prices() -> None:
    book = PriceBook({"gpt-4.1": {"input_mtok": 1.0, "output_mtok": 2.0, "cache_read_mtok": 0.25}})
    assert book.price("gpt-4.1", "openai", input_tokens=1_000_000, output_tokens=1_000_000) == pytest.approx(
        3.0
    )
    assert book.price("gpt-4.1", "", input_tokens=1_000_000) == pytest.approx(1.0)
    # 600k uncached at $1 + 400k cache reads at $0.25.
    assert book.price(
        "gpt-4.1", "openai", input_tokens=1_000_000, cache_read_tokens=400_000
    ) == pytest.approx(0.7)
    # Models without an override still come from genai-prices.
    assert book.price("o3", "openai", input_tokens=1000) == pytest.approx(
        expected("o3", "openai", input_tokens=1000), rel=1e-12
    )


def test_override_prices_an_unknown_model_and_cache_falls_back_to_input() -> None:
    book = PriceBook({"acme-llm-9000": {"input_mtok": 4.0, "output_mtok": 8.0}})
    assert book.price("acme-llm-9000", "acme", input_tokens=500_000, output_tokens=250_000) == pytest.approx(
        4.0
    )
    # No cache rates configured: cache tokens cost the input rate.
    assert book.price(
        "acme-llm-9000",
        "acme",
        input_tokens=500_000,
        cache_read_tokens=100_000,
        cache_creation_tokens=100_000,
    ) == pytest.approx(2.0)


def test_provider_name_mapping() -> None:
    assert provider_id("gcp.gemini") == "google"
    assert provider_id("gcp.vertex_ai") == "google"
    assert provider_id("aws.bedrock") == "aws"
    assert provider_id("azure.ai.openai") == "azure"
    assert provider_id("openai") == "openai"
    assert provider_id("some-new-provider") == "some-new-provider"
    assert provider_id("") is None


def test_gemini_priced_through_the_otel_provider_name() -> None:
    book = PriceBook()
    for tokens in (
        dict(input_tokens=3_000, output_tokens=100),
        dict(input_tokens=300_000, output_tokens=100),
    ):
        got = book.price("gemini-2.5-pro", "gcp.gemini", **tokens)
        assert got is not None
        assert math.isclose(got, expected("gemini-2.5-pro", "google", **tokens), rel_tol=1e-12)


def test_rates_are_resolved_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str | None]] = []
    real = genai_prices.calc_price

    def counting_calc_price(usage, model_ref, **kwargs):
        calls.append((model_ref, kwargs.get("provider_id")))
        return real(usage, model_ref, **kwargs)

    monkeypatch.setattr(pricing, "calc_price", counting_calc_price)
    book = PriceBook()
    first = book.rates("gpt-4.1", "openai")
    assert isinstance(first, ModelRates)
    assert calls == [("gpt-4.1", "openai")]
    for n in range(1000):
        book.price("gpt-4.1", "openai", input_tokens=n, output_tokens=n)
    assert book.rates("gpt-4.1", "openai") is first
    assert book._cache[("openai", "gpt-4.1")] is first
    assert len(calls) == 1

    # An unknown model is looked up once too (with the provider, then by model alone), then cached as None.
    for _ in range(100):
        assert book.price("acme-llm-9000", "openai", input_tokens=1) is None
    assert calls[1:] == [("acme-llm-9000", "openai"), ("acme-llm-9000", None)]
    assert ("openai", "acme-llm-9000") in book._cache
    assert book._cache[("openai", "acme-llm-9000")] is None


def test_default_price_book_is_shared() -> None:
    assert default_price_book() is default_price_book()
    assert isinstance(default_price_book(), PriceBook)


@pytest.mark.parametrize(("model", "provider", "_provider_id", "tokens"), CASES)
def test_a_span_without_a_cost_is_priced_as_the_book_prices_the_call(
    model: str, provider: str, _provider_id: str | None, tokens: dict[str, int]
) -> None:
    """`price_if_unpriced` reads the book's rates itself (no keyword call per span): the same cost."""
    book = PriceBook()
    usage = span_usage(request_model=model, provider=provider, **tokens)
    assert pricing.price_if_unpriced(usage, book) is False  # a known price: not charged as unpriced
    assert usage.cost_usd == book.price(model, provider, **tokens)
    assert math.isclose(usage.cost_usd, expected(model, _provider_id, **tokens), rel_tol=1e-9)
