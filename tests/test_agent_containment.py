"""No record crashes an agent: odd record values, a failing key in a refresh, a non-finite amount.

In process, on a `BudgetJob` that is built but not started (no broker needed):
these are the paths the issue saw raise inside Faust's agents.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import Budget, parse_budget_yaml
from burnguard.stream import app as app_module
from burnguard.stream.accounting import WindowTotals
from burnguard.stream.app import BudgetJob, _as_bytes, freeze_startup_heap
from burnguard.stream.changelog import plain_store
from burnguard.stream.records import DELTA_ROW_FIELDS, BatchRecord, DeltaRow, batches_record
from burnguard.stream.settings import StreamSettings
from burnguard.stream.takeover import PartitionsLost
from faust.types import TP

from tests.factories import budgets_yaml, tenant_cost

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

BUDGETS = budgets_yaml(tenant_cost(1))


@pytest.fixture
def job(tmp_path: Path) -> BudgetJob:
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"containment-{tmp_path.name}")
    return BudgetJob(settings, parse_budget_yaml(BUDGETS))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"raw", b"raw"),
        (None, None),
        ("text", b"text"),
        ({"kind": "ticks", "keys": [["b", "k"]]}, b'{"kind": "ticks", "keys": [["b", "k"]]}'),
        ([1, 2.5], b"[1, 2.5]"),
        ({1, 2}, b"{1, 2}"),  # JSON cannot hold a set: its repr
    ],
)
def test_any_record_value_can_be_dead_lettered(value: Any, expected: bytes | None) -> None:
    assert _as_bytes(value) == expected


def test_a_key_that_fails_in_a_refresh_is_logged_with_its_key_and_the_others_go_on(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settled: list[str] = []

    async def settle(budget: Budget, key: str, now: Any) -> None:
        if key == "poisoned":
            raise ValueError("cannot convert float NaN to integer")
        settled.append(key)

    monkeypatch.setattr(job, "_settle", settle)
    record = {
        "kind": "ticks",
        "keys": [["tenant-cost", "a"], ["tenant-cost", "poisoned"], ["tenant-cost", "b"]],
    }
    with caplog.at_level(logging.ERROR):
        asyncio.run(job._account_one(json.loads(json.dumps(record))))
    assert settled == ["a", "b"]
    assert job.agent_errors == 1
    assert "tenant-cost key 'poisoned'" in caplog.text


def test_a_record_that_is_not_an_object_is_refused_with_a_clear_error(job: BudgetJob) -> None:
    with pytest.raises(TypeError, match="JSON object"):
        asyncio.run(job._account_one(["not", "a", "record"]))


@pytest.mark.parametrize("amount", [math.nan, math.inf, -1.0])
def test_a_non_finite_or_negative_amount_never_reaches_the_totals(job: BudgetJob, amount: float) -> None:
    row = ["tenant-cost", "acme", 0, amount, 1, 1, 1, 0]
    assert job._apply(DeltaRow.from_wire(row), (0, 1), datetime.now(UTC)) is None
    assert job.agent_errors == 1
    assert not job.totals.data.get("tenant-cost|acme|0")


def test_a_dead_letter_that_cannot_be_written_is_logged_not_raised(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(event: Any, reason: str) -> bool:
        raise RuntimeError("producer is stopping")

    class Message:
        topic, partition, offset = "burnguard.usage", 2, 41

    class Event:
        message, key, value = Message(), b"k", {"kind": "ticks"}

    monkeypatch.setattr(job, "_dead_letter", broken)
    with caplog.at_level(logging.ERROR):
        asyncio.run(job._park_failed(Event(), "accounting failed"))
    assert "could not dead-letter burnguard.usage[2]@41" in caplog.text


def test_a_micro_batch_record_counts_each_message_once_by_its_own_source_offset(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1's `batches` record keeps each message's source: a replay cut at other points counts
    exactly what was not counted yet, per key."""

    async def no_producer(signal: Any) -> None:
        return None

    monkeypatch.setattr(job, "_send_signal", no_producer)
    row = ["tenant-cost", "acme", 0, 1.0, 1, 1, 1, 0]
    other = ["tenant-cost", "globex", 0, 10.0, 1, 1, 1, 0]

    def record(*sources: int) -> dict[str, Any]:
        batches = [BatchRecord(0, offset, [row, other] if offset % 2 else [row], []) for offset in sources]
        return json.loads(json.dumps(batches_record(batches)))

    asyncio.run(job._account_one(record(5, 6)))
    asyncio.run(job._account_one(record(6, 7, 8)))  # a replay from offset 6, cut elsewhere
    acme = WindowTotals.from_state(job.totals.data["tenant-cost|acme|0"])
    globex = WindowTotals.from_state(job.totals.data["tenant-cost|globex|0"])
    assert (acme.spent, acme.spans, acme.applied) == (4.0, 4, {"0": 8})  # offsets 5, 6, 7, 8 once each
    assert (globex.spent, globex.applied) == (20.0, {"0": 7})  # offsets 5 and 7
    assert job.replayed_deltas == 1


def test_stage_2_reads_the_tables_through_the_dict_their_store_keeps(job: BudgetJob) -> None:
    """`plain_store` skips the store's Python-level mapping methods; it must read what the store holds."""
    row = ["tenant-cost", "acme", 0, 1.0, 1, 1, 1, 0]
    assert job._apply(DeltaRow.from_wire(row), (0, 1), datetime.now(UTC)) is None
    assert plain_store(job.totals) is job.totals.data.data
    assert WindowTotals.from_state(plain_store(job.totals)["tenant-cost|acme|0"]).spent == 1.0
    job.changes.delete(job.totals, "tenant-cost|acme|0")
    assert "tenant-cost|acme|0" not in plain_store(job.totals)


def test_rows_with_and_without_the_call_mix_count_alike_in_a_batch(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A current row goes to `_apply` as the list it is; one of 8 fields (before the mix) as a `DeltaRow`."""

    async def no_producer(signal: Any) -> None:
        return None

    monkeypatch.setattr(job, "_send_signal", no_producer)
    assert len(DeltaRow._fields) == DELTA_ROW_FIELDS
    older = ["tenant-cost", "acme", 0, 1.0, 1, 1, 1, 0]
    current = [*older, [1.0, 0.0, 0.0, 0.0]]
    batches = [BatchRecord(0, offset, [row], []) for offset, row in ((5, older), (6, current), (7, current))]
    asyncio.run(job._account_one(json.loads(json.dumps(batches_record(batches)))))
    totals = WindowTotals.from_state(job.totals.data["tenant-cost|acme|0"])
    assert (totals.spent, totals.spans, totals.applied) == (3.0, 3, {"0": 7})
    assert totals.mix == [2.0, 0.0, 0.0, 0.0]


def test_the_start_up_heap_is_frozen_and_later_garbage_still_collected() -> None:
    """`run_worker` freezes what exists at start-up; a cycle made afterwards is still collected."""

    class Node:
        me: Any = None

    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        node = Node()
        node.me = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_a_revoke_whose_write_the_stall_guard_held_back_stops_the_worker(
    job: BudgetJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes the guard would not write (the group expelled the worker while it stood still) must not
    stay pending past the revoke: a later write would put them into changelogs another worker owns."""

    async def no_producer(signal: Any) -> None:
        return None

    async def expelled() -> bool:
        return False

    monkeypatch.setattr(job, "_send_signal", no_producer)
    monkeypatch.setattr(job.stall_guard, "still_member", expelled)
    monkeypatch.setattr(app_module, "membership_lost", lambda consumer: False)  # not yet seen at the revoke
    batch = BatchRecord(0, 5, [["tenant-cost", "acme", 0, 1.0, 1, 1, 1, 0]], [])
    asyncio.run(job._account_one(json.loads(json.dumps(batches_record([batch])))))
    assert job.changes.pending()
    with pytest.raises(PartitionsLost):
        asyncio.run(job._on_revoked(job.app, {TP("burnguard.usage", 0)}))
