"""The per-span key length rule covers every field in `KEY_FIELDS` (the fast check lists them again);
a message's clock correction at once (`correct_clocks`) is `correct_clock` span by span."""

from __future__ import annotations

import dataclasses

import pytest
from burnguard.contracts.span_checks import (
    DEFAULT_LIMITS,
    KEY_FIELDS,
    TOO_LONG,
    correct_clock,
    correct_clocks,
    span_problem,
)
from burnguard.contracts.usage import SpanUsage
from hypothesis import given
from hypothesis import strategies as st


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


@given(st.data(), st.sampled_from([0, 1_000]), st.integers(0, 300), st.integers(0, 300))
def test_correcting_a_messages_clocks_at_once_is_correcting_each_span(
    data: st.DataObject, record_ns: int, ahead_ns: int, behind_ns: int
) -> None:
    """Event times around a record time (0: none), at the skew's bounds and one past them most often."""
    low, high = record_ns - behind_ns, record_ns + ahead_ns
    bounds = [low - 1, low, high, high + 1]
    times = st.one_of(st.sampled_from([max(bound, 0) for bound in bounds]), st.integers(0, 2_000))
    pairs = data.draw(st.lists(st.tuples(times, times), max_size=8))

    def spans() -> list[SpanUsage]:
        return [dataclasses.replace(_span(), start_ns=start, end_ns=end) for start, end in pairs]

    each, together = spans(), spans()
    moved = sum(correct_clock(usage, record_ns, ahead_ns, behind_ns) for usage in each)
    latest = max((usage.end_ns or usage.start_ns for usage in each), default=0)
    assert correct_clocks(together, record_ns, ahead_ns, behind_ns) == (moved, latest)
    assert together == each
