"""Model prices: genai-prices, resolved once per model, plus configured overrides.

`genai_prices.calc_price` costs about 100 µs a call (it matches the model
reference against its whole catalogue every time). The span exporter and the
stream loop price every GenAI span, so `PriceBook` resolves each (provider,
model) once into plain per-token rates and prices spans with a few float
multiplications. Tiered ("cliff") prices keep genai-prices' semantics: the
tier is chosen by the call's total input tokens and applies to all tokens.

An unknown model is never guessed: `price()` returns None. It is not free
either: the stream and the sink charge it what the budget file's `unpriced:`
says (`PriceBook.for_config`), mark it (`UNPRICED_CHARGED`) and count it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from burnguard.contracts.usage import SpanUsage
from genai_prices import Usage, calc_price
from genai_prices.types import TieredPrices

if TYPE_CHECKING:
    from burnguard.contracts.budgets import BudgetConfig

_PER_MTOK = 1_000_000
#: The `extra` entry of a span charged by the `unpriced:` rule: what it was charged as.
UNPRICED_CHARGED = "burnguard.cost.charged_as"

#: OpenTelemetry `gen_ai.provider.name` values -> genai-prices provider ids.
_PROVIDER_IDS: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "mistral_ai": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "x_ai": "x-ai",
    "cohere": "cohere",
    "perplexity": "perplexity",
}


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per token, with optional cliff tiers keyed by the call's total input tokens."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def at(self, total_input_tokens: int) -> float:
        if not self.tiers:  # most models: no reversed() iterator per call (stage 1 prices per span)
            return self.base
        for start, price in reversed(self.tiers):
            if total_input_tokens > start:
                return price
        return self.base

    @classmethod
    def from_genai(cls, price: Decimal | TieredPrices | None) -> Rate | None:
        if price is None:
            return None
        if isinstance(price, TieredPrices):
            tiers = tuple((tier.start, float(tier.price) / _PER_MTOK) for tier in price.tiers)
            return cls(float(price.base) / _PER_MTOK, tiers)
        return cls(float(price) / _PER_MTOK)


@dataclass(frozen=True, slots=True)
class ModelRates:
    """Per-token rates of one model. A missing cache rate falls back to the input rate."""

    input: Rate
    output: Rate
    cache_read: Rate | None = None
    cache_write: Rate | None = None

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_creation_tokens: int = 0,
    ) -> float:
        """Cost in USD. `input_tokens` includes the cache tokens (docs/ARCHITECTURE.md §3)."""
        uncached = max(input_tokens - cache_read_tokens - cache_creation_tokens, 0)
        total = uncached * self.input.at(input_tokens) + output_tokens * self.output.at(input_tokens)
        if cache_read_tokens:
            rate = self.cache_read or self.input
            total += cache_read_tokens * rate.at(input_tokens)
        if cache_creation_tokens:
            rate = self.cache_write or self.input
            total += cache_creation_tokens * rate.at(input_tokens)
        return total


def rates_from_override(prices: Mapping[str, float]) -> ModelRates:
    """Rates from configuration, in USD per million tokens like genai-prices."""

    def rate(key: str) -> Rate | None:
        value = prices.get(key)
        return None if value is None else Rate(float(value) / _PER_MTOK)

    return ModelRates(
        input=rate("input_mtok") or Rate(0.0),
        output=rate("output_mtok") or Rate(0.0),
        cache_read=rate("cache_read_mtok"),
        cache_write=rate("cache_write_mtok"),
    )


def provider_id(provider_name: str) -> str | None:
    """The genai-prices provider id for an OpenTelemetry provider name, None to let it guess."""
    if not provider_name:
        return None
    return _PROVIDER_IDS.get(provider_name, provider_name)


def resolve_rates(model: str, provider: str = "") -> ModelRates | None:
    """Look the model up in genai-prices once; None when it has no price for it."""
    try:
        found = calc_price(Usage(input_tokens=0, output_tokens=0), model, provider_id=provider_id(provider))
    except LookupError:
        if provider:  # the provider name may be one genai-prices does not know; try by model alone
            return resolve_rates(model, "")
        return None
    model_price = found.model_price
    input_rate = Rate.from_genai(model_price.input_mtok)
    if input_rate is None:
        return None
    return ModelRates(
        input=input_rate,
        output=Rate.from_genai(model_price.output_mtok) or Rate(0.0),
        cache_read=Rate.from_genai(model_price.cache_read_mtok),
        cache_write=Rate.from_genai(model_price.cache_write_mtok),
    )


class PriceBook:
    """Thread-safe cache of resolved model rates, with configured overrides first."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        *,
        unpriced_as: str | None = None,
        unpriced_prices: Mapping[str, float] | None = None,
    ) -> None:
        """`unpriced_as` (a model) or `unpriced_prices` (USD per million tokens): what a call to a
        model without a known price is charged; neither: such a call stays unpriced."""
        self._overrides = {model: rates_from_override(p) for model, p in (overrides or {}).items()}
        self._cache: dict[tuple[str, str], ModelRates | None] = {}
        self._lock = threading.Lock()
        self._unpriced_as = unpriced_as
        self._unpriced_rates = rates_from_override(unpriced_prices) if unpriced_prices is not None else None

    @classmethod
    def for_config(cls, config: BudgetConfig) -> PriceBook:
        """The book a budget file asks for: its price overrides and its `unpriced:` rule."""
        unpriced = config.unpriced
        if unpriced.charge_as is not None:
            return cls(config.prices, unpriced_as=unpriced.charge_as)
        return cls(config.prices, unpriced_prices=unpriced.price_override())

    @property
    def unpriced_charge(self) -> tuple[str, ModelRates] | None:
        """(what it is charged as, the rates) for a model without a price; None: left unpriced."""
        if self._unpriced_as is not None:
            rates = self.rates(self._unpriced_as)
            return (self._unpriced_as, rates) if rates is not None else None
        if self._unpriced_rates is not None:
            return "unpriced default", self._unpriced_rates
        return None

    def rates(self, model: str, provider: str = "") -> ModelRates | None:
        key = (provider, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._overrides.get(model) if model in self._overrides else None
        if found is None and model:
            found = resolve_rates(model, provider)
        with self._lock:
            self._cache[key] = found
        return found

    def price(
        self,
        model: str,
        provider: str = "",
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_creation_tokens: int = 0,
    ) -> float | None:
        """Cost of one call in USD, or None when the model has no known price."""
        rates = self.rates(model, provider)
        if rates is None:
            return None
        return rates.cost(input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens)


def price_if_unpriced(usage: SpanUsage, prices: PriceBook) -> bool:
    """Price a decoded model call that arrived without a cost (e.g. from an OTel Collector).

    The stream job and the sink both do this, with the same code the app's
    exporter path uses, so budgets and history see the same spend. A model
    with no known price is charged by the book's `unpriced:` rule and marked
    in `extra` (`UNPRICED_CHARGED`); returns True then, so the caller can say
    which model needs a price.
    """
    if usage.cost_usd is not None or not usage.is_model_call:
        return False
    tokens = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_creation_tokens)
    if model := usage.model:
        rates = prices.rates(model, usage.provider)  # `PriceBook.price`, without its keyword call per span
        if rates is not None:
            usage.cost_usd = rates.cost(*tokens)
            return False
    charge = prices.unpriced_charge
    if charge is None:
        return False
    charged_as, rates = charge
    usage.cost_usd = rates.cost(*tokens)
    usage.extra[UNPRICED_CHARGED] = charged_as
    return True


_default_book: PriceBook | None = None


def default_price_book() -> PriceBook:
    """The process-wide book without overrides, shared so each model is resolved once."""
    global _default_book
    if _default_book is None:
        _default_book = PriceBook()
    return _default_book
