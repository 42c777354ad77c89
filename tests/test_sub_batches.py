"""A group's sub-batches written natively (`records.group_sub_batches`, contracts/native/src/
sub_batches.rs) against the reference: `GroupRows`, `BudgetJob._close_group`'s rows, `MicroBatch`
and `encode_record`.

Random micro-batches of random messages (keys shared by some messages, unicode, quotes, backslashes
and control characters in budgets and keys, floats at msgspec's formatting edges, ints at an int64's,
rows with and without a call mix, groups of sizes around `BATCH_ROWS`, several usage partitions,
context observations before the groups' rows) go through both; the records sent (partition, kind,
bytes) must be the same. Values the native writer does not vouch for (a NaN, an int amount, an int
past an int64, a bool) fall back to the reference for their group, and a context observation msgspec
refuses (a lone surrogate) makes its record the stdlib's whole, with the same bytes either way.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream import app as app_module
from burnguard.stream import partitioner
from burnguard.stream.app import BudgetJob
from burnguard.stream.records import (
    BatchRecord,
    GroupRows,
    MicroBatch,
    combined_row,
    encode_record,
    group_sub_batches,
)
from burnguard.stream.settings import StreamSettings

from tests.fixtures.decoders import required_native_groups, required_native_part

CONFIG = parse_budget_yaml("budgets:\n  - {id: cost, scope: tenant, window: day, limit: 1.0}\n")
BUDGETS = ["cost", "tokens", "tools", "calls", "é-budget", 'q"uote']
KEYS = ["acme", "beta", "acme|support", "", "ünï", "😀", 'a"b\\c', "\x00\x1f\n\t\x08\x0c\r\x7f", "\u2028/<"]
#: Floats where msgspec's formatting changes (exponents, integer values, the smallest and largest).
FLOATS = [
    0.0,
    -0.0,
    0.1,
    0.30000000000000004,
    1.0,
    100.0,
    1e15,
    1e16,
    1e17,
    1e21,
    1e22,
    1.2345678901234568e16,
    1234567890123456.8,
    1e-4,
    1e-5,
    1e-7,
    2.5e-8,
    5e-324,
    1.7976931348623157e308,
    -1e300,
    2.0**70,
]
INTS = [0, 1, -1, 2**63 - 1, -(2**63), 10**18, 60_000_000_000]


def _float(rng: random.Random) -> float:
    return rng.choice(FLOATS) if rng.random() < 0.3 else rng.random() * rng.choice([1, 1e-6, 1e6])


def _int(rng: random.Random) -> int:
    return rng.choice(INTS) if rng.random() < 0.05 else rng.randrange(10**18)


def random_row(rng: random.Random, budget: str, key: str, start: int, odd: float) -> list[Any]:
    """A row as `usage_rows` makes one; with probability `odd`, a value the native writer refuses."""
    row: list[Any] = [budget, key, start, _float(rng), rng.randrange(1, 40), _int(rng), _int(rng), _int(rng)]
    drawn = rng.random()
    if drawn < 0.3:
        pass
    elif drawn < 0.4:
        row.append(None)
    elif drawn < 0.6:
        row.append([_float(rng), _float(rng), 0.0, _float(rng)])
    else:
        row.append([float(row[4]), 0.0, 0.0, 0.0])  # a plain mix
    if rng.random() < odd:
        field, value = rng.choice(
            [(3, float("nan")), (3, float("inf")), (3, 1), (4, 2**64), (6, 2**63), (7, True)]
        )
        row[field] = value
    return row


def random_groups(rng: random.Random, odd: float) -> dict[int, list[tuple[int, list[list[Any]]]]]:
    """Per source partition, its group's messages in offset order, each its rows (a slot at most
    once per message); a group's keys now few, now around `BATCH_ROWS` (as the test sets it)."""
    groups = {}
    for source in rng.sample(range(6), rng.randrange(1, 4)):
        keys = rng.choice([1, 3, 8, 20, 60])
        offset = rng.randrange(10**6)
        messages = []
        for _ in range(rng.randrange(1, 9)):
            offset += rng.randrange(1, 4)
            slots = {
                (
                    rng.choice(BUDGETS),
                    f"{rng.choice(KEYS)}{rng.randrange(keys)}",
                    rng.choice([0, 3600, -5, 2**62]),
                )
                for _ in range(rng.randrange(0, keys + 1))
            }
            messages.append((offset, [random_row(rng, *slot, odd) for slot in sorted(slots)]))
        groups[source] = messages
    return groups


def _job(tmp_path: Path, partitions: int) -> BudgetJob:
    settings = StreamSettings(
        data_dir=tmp_path, app_id="sub-batches", partitions=partitions, combine_messages=True
    )
    return BudgetJob(settings, CONFIG)


def sent(job: BudgetJob, groups: dict[int, Any], native: Any, contexts: list[BatchRecord]) -> list[Any]:
    """What `_ingest_batch` sends for these groups (`native`: the group class, or None for
    `GroupRows`), after a sub-batch of context observations per partition in `contexts`."""
    batch = MicroBatch(app_module.BATCH_ROWS)
    for context in contexts:
        batch.add(context.source_partition % job.settings.partitions, context)
    for source, messages in groups.items():
        group = GroupRows() if native is None else native(combined_row)
        for offset, rows in copy.deepcopy(messages):
            group.add(offset, rows)
        job._close_group(source, group, batch)
    if native is None:
        return [(partition, record["kind"], encode_record(record)) for partition, record in batch.records()]
    assert [(p, r["kind"]) for p, r in batch.records()] == [(p, k) for p, k, _ in batch.encoded_records()]
    return batch.encoded_records()


@pytest.fixture
def native_writer(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The native `group_sub_batches`, in use whatever BURNGUARD_NATIVE says."""
    writer = required_native_part("group_sub_batches")
    monkeypatch.setitem(partitioner.native_parts, "group_sub_batches", writer)
    return writer


@pytest.mark.parametrize("seed", range(120))
def test_the_native_sub_batches_are_the_references_bytes(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_writer: Any
) -> None:
    rng = random.Random(seed)
    batch_rows = rng.choice([1, 2, 5, 7, 16, 40, 1000])
    monkeypatch.setattr(app_module, "BATCH_ROWS", batch_rows)
    job = _job(tmp_path, rng.choice([1, 2, 3, 12]))
    groups = random_groups(rng, odd=0.0 if seed % 3 else 0.01)
    contexts = [
        BatchRecord(source, 5, [], [["guard", rng.choice(KEYS + ["\udc80"] * (seed % 7 == 0)), [1, 2]]])
        for source in rng.sample(range(6), rng.randrange(0, 3))
    ]
    native = required_native_groups()
    assert sent(job, groups, native, contexts) == sent(job, groups, None, contexts)


def test_sizes_around_batch_rows_cut_the_same(tmp_path: Path, native_writer: Any) -> None:
    """Groups of one message (weight 1 per key) and of many (a key's steps) at 999-1001 rows and steps."""
    job, native = _job(tmp_path, 3), required_native_groups()
    rng = random.Random(7)
    for keys in (999, 1000, 1001, 2001):
        one = {0: [(4, [random_row(rng, "cost", f"k{at}", 0, 0.0) for at in range(keys)])]}
        assert sent(job, one, native, []) == sent(job, one, None, [])
    for messages in (332, 333, 334, 500, 1500):  # one key summed: 1 + steps per row
        many = {1: [(at, [random_row(rng, "calls", "acme", 0, 0.0)]) for at in range(messages)]}
        many[1] += [(messages, [random_row(rng, "cost", f"k{at}", 0, 0.0) for at in range(3)])]
        assert sent(job, many, native, []) == sent(job, many, None, [])


def test_the_native_writer_vouches_for_usual_rows_and_refuses_the_rest(native_writer: Any) -> None:
    """It writes a group of the rows `usage_rows` makes; one unusual value in any row gives None
    (the reference then sends the group), and the group is as it was."""
    native = required_native_groups()
    good = ["cost", "acme", 0, 0.5, 1, 10, 20, 0, [1.0, 0.0, 0.0, 0.0]]
    group = native(combined_row)
    group.add(1, [list(good)])
    group.add(2, [list(good), ["cost", "beta", 0, 0.25, 1, 10, 20, 0]])
    assert group_sub_batches(group, 0, 3, 1000) is not None
    before = repr(group.rows())
    for field, value in [(3, float("nan")), (3, 1), (4, 2**64), (7, 1.0), (8, [1, 0, 0, 0])]:
        odd = native(combined_row)
        bad = list(good)
        bad[field] = value
        odd.add(1, [list(good)])
        odd.add(2, [bad])
        assert group_sub_batches(odd, 0, 3, 1000) is None
        assert odd.rows()  # the reference path still makes its rows
    assert group_sub_batches(GroupRows(), 0, 3, 1000) is None
    group2 = native(combined_row)
    group2.add(1, [list(good)])
    group2.add(2, [list(good), ["cost", "beta", 0, 0.25, 1, 10, 20, 0]])
    assert repr(group2.rows()) == before


def _stage_one_sends(load: Any, writer: Any, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The usage records' bytes stage 1 sends for the ingest bench's load (`bench/stream_ingest.py`)."""
    import stream_ingest

    monkeypatch.setitem(partitioner.native_parts, "group_sub_batches", writer)
    messages, _ = stream_ingest.make_load(load)
    sent: list[bytes] = []
    with tempfile.TemporaryDirectory() as scratch:
        stage1 = stream_ingest.Stage1(Path(scratch), messages)
        pending = stage1.job.usage_records

        async def send() -> None:
            sent.extend(record[3] for record in pending._pending)
            pending._pending = []

        monkeypatch.setattr(pending, "send", send)
        stage1.forget_digests()  # every partition primed: no broker to read digests from
        stage1.run(stage1.events())
    return sent


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((40, 260, 20, 10, 40), id="realistic"),
        pytest.param((10, 20, 50, 20, 20), id="small"),
    ],
)
def test_stage_one_sends_the_same_bytes_with_the_writer_as_without(
    sizes: tuple[int, ...], native_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest bench's loads (its `--compare` checks values only): with native groups, the records
    sent with the writer and with it off (the Python path for every group) are the same bytes."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    monkeypatch.setitem(partitioner.native_parts, "Groups", required_native_groups())
    import stream_ingest

    names = ("batch_min", "batch_max", "tenants", "users_per_tenant", "calls_per_session")
    load = argparse.Namespace(
        spans=15_000,
        plain_fraction=stream_ingest.SpanMix.plain_fraction,
        epoch_ns=time.time_ns(),
        **dict(zip(names, sizes, strict=True)),
    )
    written: list[Any] = []

    def writer(*args: Any) -> Any:
        written.append(native_writer(*args))
        return written[-1]

    with_writer = _stage_one_sends(load, writer, monkeypatch)
    assert written and None not in written  # every group written natively
    assert with_writer == _stage_one_sends(load, None, monkeypatch)
