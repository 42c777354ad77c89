"""A micro-batch's group (`stream/records.py`): the native `Groups` against `GroupRows`, the reference.

Random messages of random rows (keys shared by some messages and not others, rows with and without
a call mix, plain and unusual mixes, a null mix, amounts of -0.0, NaN and huge values, counts and
event times past an int64) go into both; the wire rows and weights must be the same, compared by
`repr` (floats to the bit, ints staying ints), the group's last offset too.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from burnguard.stream.records import GroupRows, combined_row, new_group_rows

from tests.fixtures.decoders import required_native_groups

BUDGETS = ["cost", "tokens", "tools", "calls"]
KEYS = ["acme", "beta", "acme|support", "", "ünï"]


def random_row(rng: random.Random, budget: str, key: str, start: int) -> list[Any]:
    """A row as `usage_rows` makes one, with now and then a value at an edge."""
    spans = rng.choice([1, 2, 17, 2**53 + 1, 2**70]) if rng.random() < 0.1 else rng.randrange(1, 40)
    amount = rng.choice([0.0, -0.0, float("nan"), 1e308, 0.1]) if rng.random() < 0.1 else rng.random()
    first = rng.choice([0, -(2**63), 2**63 - 1, 2**64]) if rng.random() < 0.05 else rng.randrange(10**18)
    last = first + rng.randrange(10**10)
    row: list[Any] = [budget, key, start, amount, spans, first, last, rng.choice([0, 60_000_000_000])]
    drawn = rng.random()
    if budget == "tools" or drawn < 0.1:
        return row
    if drawn < 0.15:
        row.append(None)
    elif drawn < 0.3:
        row.append([float(spans) - 1.0, 1.0, rng.choice([0.0, 1.0]), rng.random()])
    else:
        row.append([float(spans), 0.0, 0.0, 0.0])
    return row


def random_messages(rng: random.Random) -> list[tuple[int, list[list[Any]]]]:
    """A group's messages in offset order, each its rows (a slot at most once per message)."""
    offset = rng.randrange(10**6)
    messages = []
    for _ in range(rng.randrange(1, 12)):
        offset += rng.randrange(1, 4)
        slots = {
            (rng.choice(BUDGETS), rng.choice(KEYS), rng.choice([0, 3600, -5, 2**62, 2**64, -(2**70)]))
            for _ in range(6)
        }
        rows = [random_row(rng, *slot) for slot in sorted(slots)[: rng.randrange(0, len(slots) + 1)]]
        rng.shuffle(rows)
        messages.append((offset, rows))
    return messages


def wire_rows(group: Any, messages: list[tuple[int, list[list[Any]]]]) -> str:
    """The group's rows and weights and its last offset after these messages (copied: a group
    extends rows in place)."""
    for offset, rows in copy.deepcopy(messages):
        group.add(offset, rows)
    return repr((group.rows(), group.last_offset))


@pytest.mark.parametrize("seed", range(300))
def test_the_native_group_makes_the_references_wire_rows(seed: int) -> None:
    native = required_native_groups()
    messages = random_messages(random.Random(seed))
    assert wire_rows(native(combined_row), messages) == wire_rows(GroupRows(), messages)


def test_a_group_of_no_message_has_no_rows_and_no_last_offset(groups_impl: str) -> None:
    group = new_group_rows()
    assert (group.rows(), group.last_offset) == ([], -1)


def test_the_native_group_refuses_rows_usage_rows_never_makes_and_adds_none_of_the_message() -> None:
    group = required_native_groups()(combined_row)
    good = ["cost", "acme", 0, 0.5, 1, 10, 20, 0]
    for bad in (
        ["cost", 7, 0, 0.5, 1, 10, 20, 0],
        ["cost", "acme", 0.0, 0.5, 1, 10, 20, 0],
        ["cost"],
        ("a",),
    ):
        with pytest.raises((TypeError, ValueError)):
            group.add(3, [list(good), bad])
    assert (group.rows(), group.last_offset) == ([], -1)
