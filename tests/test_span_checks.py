"""The per-span key length rule covers every field in `KEY_FIELDS` (the fast check lists them again)."""

from __future__ import annotations

import dataclasses

import pytest
from burnguard.contracts.span_checks import DEFAULT_LIMITS, KEY_FIELDS, TOO_LONG, span_problem
from burnguard.contracts.usage import SpanUsage


def _span() -> SpanUsage:
    return SpanUsage("t" * 32, "s" * 16, "", "chat", 1, 2, "chat", request_model="gpt-4o", tenant="acme")


def test_a_good_span_passes() -> None:
    assert span_problem(_span(), DEFAULT_LIMITS) is None


@pytest.mark.parametrize("name", KEY_FIELDS)
def test_each_key_field_too_long_is_rejected_naming_it(name: str) -> None:
    most = DEFAULT_LIMITS.max_key_chars
    at_limit = dataclasses.replace(_span(), **{name: "k" * most})
    assert span_problem(at_limit, DEFAULT_LIMITS) is None
    over = dataclasses.replace(_span(), **{name: "k" * (most + 1)})
    problem = span_problem(over, DEFAULT_LIMITS)
    assert problem is not None
    assert problem[0] == TOO_LONG
    assert problem[1].startswith(f"{name} is {most + 1} characters long")
