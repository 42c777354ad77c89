"""How a span counts against a budget: its amount per metric, its scope key, the key's match.

The stream job counts spans into budget windows and the app-side guard estimates between
signals what its own calls added; if the two applied different rules, the guard would deny
keys the stream never throttles (or the reverse). So the rules live here once and both sides
use them: the stream's per-span loop (`stream.accounting`), the guard's local accounting
(`instrumentation.local_accounting`) and the guard's signal look-up (`instrumentation.guard`).
`tests/test_budget_rules.py` drives random spans and budgets through both sides and checks
they agree.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

from burnguard.contracts.usage import SpanUsage

#: The budget metrics, in the order of an `Amounts` tuple.
METRICS: tuple[str, ...] = ("cost_usd", "tokens", "input_tokens", "tool_calls", "calls")
METRIC_INDEX: dict[str, int] = {metric: index for index, metric in enumerate(METRICS)}
#: What one span adds to every metric at once (`METRICS` order), so each budget takes its own.
Amounts = tuple[float, float, float, float, float]
#: What a span that used nothing adds (a call refused before it was made).
NOTHING: Amounts = (0.0, 0.0, 0.0, 0.0, 0.0)
#: Separator of the parts of a combined scope key: `tenant+feature` -> `acme/summarize`.
KEY_SEPARATOR = "/"
#: The match that takes every key.
MATCH_ALL = "*"


def amounts(
    cost_usd: float | None,
    input_tokens: float,
    output_tokens: float,
    tool_calls: float,
    *,
    tool_call: bool,
    model_call: bool,
) -> Amounts:
    """What one span or call adds to each metric.

    A tool span is one tool call; a model call counts the tool calls it asked for. An unpriced
    call (`cost_usd` None) adds no cost but still counts as a call and with its tokens.
    """
    return (
        cost_usd or 0.0,
        float(input_tokens + output_tokens),
        float(input_tokens),
        1.0 if tool_call else float(tool_calls),
        1.0 if model_call else 0.0,
    )


def span_amounts(usage: SpanUsage) -> Amounts:
    """What a decoded span adds to each metric (`amounts` read from the span's fields)."""
    return amounts(
        usage.cost_usd,
        usage.input_tokens,
        usage.output_tokens,
        usage.tool_calls,
        tool_call=usage.is_tool_call,
        model_call=usage.is_model_call,
    )


def metric_value(metric: str, usage: SpanUsage) -> float:
    """How much one span adds to a budget's metric."""
    return span_amounts(usage)[METRIC_INDEX[metric]]


def join_key(parts: Sequence[str | None]) -> str | None:
    """The scope key of these dimension values, or None when one is missing or empty."""
    if len(parts) == 1:
        return parts[0] or None
    return KEY_SEPARATOR.join(parts) if all(parts) else None  # type: ignore[arg-type]


def key_of_values(values: Mapping[str, str], dimensions: Sequence[str]) -> str | None:
    """The scope key of a call whose dimension values are in `values` (the app side)."""
    if len(dimensions) == 1:
        return values.get(dimensions[0]) or None
    return join_key([values.get(dimension) for dimension in dimensions])


def key_of_span(usage: SpanUsage, dimensions: Sequence[str]) -> str | None:
    """The scope key of a decoded span (the stream side)."""
    return join_key([usage.dimension(dimension) for dimension in dimensions])


class ScopeReader(NamedTuple):
    """One scope (one or two dimensions) compiled to read a span's key with one attribute getter.

    A tuple, so the per-span loop unpacks it in one step.
    """

    get: Callable[[Any], Any]
    combined: bool
    dimensions: tuple[str, ...]


def scope_reader(dimensions: Sequence[str]) -> ScopeReader:
    return ScopeReader(attrgetter(*dimensions), len(dimensions) == 2, tuple(dimensions))


def span_keys(readers: Sequence[ScopeReader], usage: Any) -> list[str | None]:
    """A span's key under each scope (`key_of_span` for many scopes; the stream's per-span step).

    One loop over the scopes rather than a call per scope: it runs once for every span counted.
    """
    keys: list[str | None] = []
    for get, combined, _ in readers:
        if combined:
            first, second = get(usage)
            keys.append(f"{first}{KEY_SEPARATOR}{second}" if first and second else None)
        else:
            keys.append(get(usage) or None)
    return keys


class KeyMatcher:
    """A budget's `match` (a key or an fnmatch glob, case-sensitive), its verdict remembered per key."""

    __slots__ = ("_matches", "pattern")

    #: Remembered verdicts before the memory is cleared: keys are user ids, sessions, ...
    MAX_REMEMBERED = 100_000

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._matches: dict[str, bool] = {}

    def matches(self, key: str) -> bool:
        if key == self.pattern:
            return True
        matches = self._matches.get(key)
        if matches is None:
            if len(self._matches) > self.MAX_REMEMBERED:
                self._matches.clear()
            matches = self._matches[key] = fnmatch.fnmatchcase(key, self.pattern)
        return matches


def compile_match(pattern: str) -> KeyMatcher | None:
    """The matcher of a budget's `match`; None for `*`, which takes every key without a test."""
    return None if pattern == MATCH_ALL else KeyMatcher(pattern)


def matched_key(key: str | None, matcher: KeyMatcher | None) -> str | None:
    """`key` when it exists and the budget's match takes it, else None."""
    if key is None or (matcher is not None and not matcher.matches(key)):
        return None
    return key
