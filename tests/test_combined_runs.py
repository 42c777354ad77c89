"""Stage 2 applies a combined row's steps in runs exactly as the step-by-step walk does.

`BudgetJob._apply_combined` adds the longest run of steps that deciding after each would leave
alone at once, then the step that ends it alone (`_apply`: decided, maybe published), then goes on
from the next step. The reference kept here is the walk it replaced: every step of every combined
row `_apply`'d in turn (`walked`), on a job whose rows are all added in Python. Both jobs account
the same records (built by stage 1's `GroupRows`, sent as stage 1 sends them) at the same clock;
after each record their signals (byte for byte, in order), changelog records (in order), table
state, snapshot marks and counters must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.signals import Signal
from burnguard.contracts.windows import Window
from burnguard.stream import app as app_module
from burnguard.stream import partitioner
from burnguard.stream.accounting import WindowTotals
from burnguard.stream.app import BudgetJob
from burnguard.stream.changelog import plain_store
from burnguard.stream.eviction import horizon_key
from burnguard.stream.records import BatchRecord, GroupRows, batches_record, encode_record, message_rows

from tests.fixtures.decoders import usage_value
from tests.test_combined_differential import _BUCKETS, BUDGET_IDS, _job

#: The tested job's rows added by the Python reference and by the native `TotalsRows` (which hands
#: each row it does not add to `_apply_combined`: tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

#: Ten minutes before midnight UTC: the day windows close while a load runs (the clock moves on).
NOW = datetime(2026, 12, 2, 23, 50, 7, tzinfo=UTC)
_NS = 1_000_000_000
_MINUTE = 60 * _NS
_DAY = Window("day")
#: Amounts around the rungs (sums that round across one), small ones, and one no span has.
AMOUNTS = [0.0, 0.05, 0.1, 0.1, 0.15, 0.2, 0.3, 1 / 3, 0.29999999999999993, 0.30000000000000004, 1e-12, 0.45]
BAD_AMOUNT = -0.5


class Clock:
    """The clock both jobs read (`app._now`), moved on between records."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def walked(job: BudgetJob) -> BudgetJob:
    """`job` applying every combined row as before runs: each step `_apply`'d, decided after each."""

    def walk(row: list[Any], steps: list[list[Any]], source: tuple[int, int], now: datetime) -> list[Signal]:
        signals = (job._apply(step, step_source, now) for step_source, step in message_rows(row, source))
        return [signal for signal in signals if signal is not None]

    job._apply_combined = walk  # type: ignore[method-assign]
    return job


@contextlib.contextmanager
def python_rows() -> Iterator[None]:
    """Stage 2's rows all added in Python while in the block (the reference's), whatever the fixture chose."""
    chosen = {name: partitioner.native_parts.get(name) for name in ("TotalsRows", "UsageRecord")}
    partitioner.native_parts.update(dict.fromkeys(chosen))
    try:
        yield
    finally:
        partitioner.native_parts.update(chosen)


def account(job: BudgetJob, record: bytes, reference: bool) -> None:
    if reference:
        with python_rows():
            asyncio.run(job._account_one(usage_value(record)))
    else:
        asyncio.run(job._account_one(usage_value(record)))


def snapshot(job: BudgetJob) -> tuple[Any, ...]:
    """What a record left: its signals and changelog records in order (taken), the tables, the
    snapshot marks and the counters."""
    signals, job.signals = job.signals, []  # type: ignore[attr-defined]
    totals = {
        key: WindowTotals.from_state(value).to_state() if isinstance(value, (list, WindowTotals)) else value
        for key, value in plain_store(job.totals).items()
    }
    return (
        [signal.to_json() for signal in signals],
        [(topic.removeprefix(job.app.conf.id), *rest) for topic, *rest in job.changes.take_records()],
        json.dumps(totals, sort_keys=True),
        dict(plain_store(job.states)),
        list(job.snapshots.waiting),
        (job.replayed_deltas, job.late_after_eviction, job.agent_errors),
    )


def message(rng: random.Random, budgets: list[str], now_ns: int) -> list[list[Any]]:
    """One message's delta rows (one per budget, key and window, as `usage_rows` makes them)."""
    rows: dict[tuple[str, str, int], list[Any]] = {}
    for _ in range(rng.randint(1, 3)):
        budget = rng.choice(budgets)
        key = (
            rng.choice(["acme", "globex"])
            if budget not in ("session-cost", "tools")
            else rng.choice(["s1", "s2"])
        )
        minutes = (
            rng.choice([0, 0, 0, 1, -1, -59, -60, -61, -119, -120, -200, -1500, 3, 70])
            if rng.random() < 0.5
            else 0
        )
        last_ns = now_ns + minutes * _MINUTE + rng.randrange(_MINUTE)
        first_ns = last_ns - rng.choice([0, 1, _MINUTE])
        bucket_ns = _BUCKETS.get(budget, 0)
        start = _DAY.start_ns(last_ns) if not bucket_ns and budget != "tools" else 0
        if budget in ("calls", "tools"):
            amount = float(rng.randint(0, 2))
        else:
            amount = rng.choice(AMOUNTS) if rng.random() < 0.7 else rng.uniform(0, 0.35)
        if rng.random() < 0.03:
            amount = BAD_AMOUNT
        mix = None if budget == "tools" else rng.choice([None, [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.125]])
        rows.setdefault(
            (budget, key, start), [budget, key, start, amount, 1, first_ns, last_ns, bucket_ns, mix]
        )
    return list(rows.values())


def group_record(messages: list[list[list[Any]]], partition: int, first: int, end: int) -> bytes:
    """Messages `first`..`end - 1` of a source partition as stage 1 combines them (`GroupRows`)."""
    group = GroupRows()
    for offset in range(first, end):
        group.add(offset, copy.deepcopy(messages[offset]))
    rows = [row for row, _ in group.rows()]
    return encode_record(batches_record([BatchRecord(partition, end - 1, rows, [])], combined=True))


def deliveries(rng: random.Random, messages: int) -> list[tuple[int, int]]:
    """Micro-batches of 2 to 20 messages, and re-readings from an earlier offset (a failed send, a
    crash before the commit): a key's mark then lies among a later row's steps."""
    out, done = [], 0
    while done < messages:
        end = min(messages, done + rng.randint(2, 20))
        out.append((done, end))
        if rng.random() < 0.25:
            again = rng.randint(max(0, done - 6), end - 1)
            out.append((again, min(messages, again + rng.randint(2, 20))))
        done = end
    return out


def run_load(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, dict[str, int]]:
    """A seeded load through the tested job and the walked one: (the same outcome after every
    record, what the load reached: signals, rows that published twice or more, runs added after a
    step applied alone, replays, late rows, bad amounts)."""
    rng = random.Random(seed)
    clock = Clock()
    monkeypatch.setattr(app_module, "_now", clock)
    tested, reference = _job(tmp_path, f"tested-{seed}"), walked(_job(tmp_path, f"walked-{seed}"))
    horizon = rng.choice([0, int(NOW.timestamp()) * _NS - 90 * _MINUTE])
    for job in (tested, reference):
        if horizon:
            plain_store(job.totals)[horizon_key(0)] = horizon  # swept: an old window absent is refused
    counts = counting_runs(tested, monkeypatch)
    streams: dict[int, list[list[list[Any]]]] = {}
    budgets = rng.sample(BUDGET_IDS, rng.randint(1, 3))  # a few, so that a row has many steps
    for _ in range(rng.randint(2, 5)):
        partition = rng.choice([0, 1])
        now_ns = int(clock.now.timestamp() * _NS)
        messages = streams.setdefault(partition, [])
        start = len(messages)
        messages += [message(rng, budgets, now_ns) for _ in range(rng.randint(6, 40))]
        for first, end in deliveries(rng, len(messages) - start):
            record = group_record(messages, partition, start + first, start + end)
            account(tested, record, reference=False)
            account(reference, record, reference=True)
            outcome = snapshot(tested)
            if outcome != snapshot(reference):
                return False, counts
            counts["signals"] += len(outcome[0])
            clock.now += timedelta(seconds=rng.choice([0, 0, 1, 30, 300, 1200]))
    counts.update(
        replayed=tested.replayed_deltas, late=tested.late_after_eviction, errors=tested.agent_errors
    )
    return True, counts


def counting_runs(job: BudgetJob, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts, as the job runs, of its rows with steps that published two signals or more and of
    the runs `_apply_at_once` added after a step `_apply_combined` applied alone."""
    counts = {"signals": 0, "rows publishing twice": 0, "split runs": 0}
    at_once, combined = job._apply_at_once, job._apply_combined

    def counted_at_once(
        row: list[Any], steps: list[list[Any]], at: int, partition: int, now: datetime
    ) -> int:
        end = at_once(row, steps, at, partition, now)
        counts["split runs"] += at > 0 and end > at
        return end

    def counted_combined(
        row: list[Any], steps: list[list[Any]], source: tuple[int, int], now: datetime, first: int = 0
    ) -> list[Signal]:
        signals = combined(row, steps, source, now, first)
        counts["rows publishing twice"] += len(signals) > 1
        return signals

    monkeypatch.setattr(job, "_apply_at_once", counted_at_once)
    monkeypatch.setattr(job, "_apply_combined", counted_combined)
    return counts


def seeded_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeds: range
) -> tuple[list[int], dict[str, int]]:
    """(the seeds whose outcome differed from the walk's, what the loads reached in all)."""
    differed, seen = [], {}
    for seed in seeds:
        same, counts = run_load(tmp_path, seed, monkeypatch)
        if not same:
            differed.append(seed)
        for name, count in counts.items():
            seen[name] = seen.get(name, 0) + count
    return differed, seen


@pytest.mark.parametrize("seeds", [range(0, 20), range(20, 40)], ids=["seeds-0-19", "seeds-20-39"])
def test_runs_of_steps_decide_as_the_step_by_step_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeds: range
) -> None:
    """Random loads of combined rows crossing rungs several times (calendar, rolling, session and
    predictive budgets), windows closing, rolling buckets leaving, replays, bad amounts, a removed
    budget, swept windows: the same outcome after every record as walking every step."""
    differed, seen = seeded_loads(tmp_path, monkeypatch, seeds)
    assert differed == []
    assert all(count > 0 for count in seen.values()), seen


def test_a_step_decided_one_step_late_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loads see it when the step that ends a run is added in the run (undecided), its decision
    left to the step after it."""
    settling_steps = app_module.settling_steps

    def one_late(*args: Any, **kwargs: Any) -> int:
        return settling_steps(*args, **kwargs) + 1

    monkeypatch.setattr(app_module, "settling_steps", one_late)
    differed, _ = seeded_loads(tmp_path, monkeypatch, range(0, 20))
    assert len(differed) > 5


_START = _DAY.start_ns(int(NOW.timestamp()) * _NS)
_NOW_NS = int(NOW.timestamp()) * _NS


def _row(budget: str, amount: float, event_ns: int = _NOW_NS, key: str = "acme") -> list[Any]:
    bucket_ns = _BUCKETS.get(budget, 0)
    start = _DAY.start_ns(event_ns) if not bucket_ns else 0
    return [budget, key, start, amount, 1, event_ns, event_ns, bucket_ns, None]


def _both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[list[list[Any]]], *groups: tuple[Any, ...]
) -> tuple[BudgetJob, list[Any], list[int]]:
    """`messages` of source partition 0 sent as the `groups` (first, end[, clock]) say, to a tested
    and a walked job, the same outcome after each: (the tested job, the signals it published since
    the first group, as JSON, and the offsets it `_apply`'d then)."""
    clock = Clock()
    monkeypatch.setattr(app_module, "_now", clock)
    tested, reference = _job(tmp_path, "tested"), walked(_job(tmp_path, "walked"))
    applied: list[int] = []
    apply = tested._apply

    def noted(row: Any, source: tuple[int, int], now: datetime) -> Signal | None:
        applied.append(source[1])
        return apply(row, source, now)

    monkeypatch.setattr(tested, "_apply", noted)
    signals = []
    for first, end, *now in groups:
        clock.now = now[0] if now else NOW
        applied.clear()
        record = group_record(messages, 0, first, end)
        account(tested, record, reference=False)
        account(reference, record, reference=True)
        outcome = snapshot(tested)
        assert outcome == snapshot(reference)
        signals = [json.loads(signal) for signal in outcome[0]]
    return tested, signals, applied


def test_a_row_climbing_three_rungs_publishes_at_each_crossing_step_and_adds_the_rest_in_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, totals_rows_impl: str
) -> None:
    """Sixteen steps of 0.07 from nothing: warn at 0.3 (the fifth), downgrade at 0.6 (the ninth),
    throttle at 1.0 (the fifteenth). Each signal carries the spend after its own step; only those
    three steps are `_apply`'d, the rest added in runs (or by the native rows, on the kept answer
    each decision leaves). Ten steps of 0.1 instead land on a rung (0.30000000000000004): within
    rounding of it, the next step is decided alone too in Python; the native rows hold it to the
    kept answer's exact bounds and add it."""
    messages = [[_row("day-ladder", 0.07)] for _ in range(16)]
    _, signals, applied = _both(tmp_path, monkeypatch, messages, (0, 16))
    assert [(s["action"], s["spent"]) for s in signals] == [
        ("warn", 0.35),
        ("downgrade", 0.63),
        ("throttle", 1.05),
    ]
    assert applied == [4, 8, 14]
    messages = [[_row("day-ladder", 0.1)] for _ in range(4)]
    _, signals, applied = _both(tmp_path / "on-the-rung", monkeypatch, messages, (0, 4))
    assert [(s["action"], s["spent"]) for s in signals] == [("warn", 0.3)]
    assert applied == ([2, 3] if totals_rows_impl == "python" else [2])


def test_steps_at_or_below_the_mark_are_skipped_then_the_crossing_step_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages 0-3 counted; a re-reading combines 2-7: steps 2 and 3 are replays (the key's mark
    lies among the row's steps), each skipped alone; 5 crosses `warn`, 4, 6 and 7 are added in runs."""
    amounts = [0.06, 0.06, 0.06, 0.06, 0.03, 0.05, 0.1, 0.1]
    messages = [[_row("day-ladder", amount)] for amount in amounts]
    job, signals, applied = _both(tmp_path, monkeypatch, messages, (0, 4), (2, 8))
    assert job.replayed_deltas == 2
    assert [(s["action"], s["spent"]) for s in signals] == [("warn", 0.32)]
    assert applied == [2, 3, 5]


def test_a_bad_amount_between_two_crossings_is_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    amounts = [0.2, 0.2, BAD_AMOUNT, 0.1, 0.2, 0.4]
    messages = [[_row("day-ladder", amount)] for amount in amounts]
    job, signals, _ = _both(tmp_path, monkeypatch, messages, (0, 6))
    assert job.agent_errors == 1
    assert [(s["action"], s["spent"]) for s in signals] == [
        ("warn", 0.4),
        ("downgrade", 0.7),
        ("throttle", 1.1),
    ]


def test_a_closed_window_restricted_publishes_ok_at_its_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Today's window throttled at 23:50; after midnight it has closed, and late rows still count in
    it: the row's first step decides `ok` and publishes it, the rest settle at once."""
    messages = [[_row("day-ladder", 1.2)]] + [[_row("day-ladder", 0.1)] for _ in range(4)]
    after_midnight = NOW + timedelta(minutes=11)
    _, signals, applied = _both(tmp_path, monkeypatch, messages, (0, 1), (1, 5, after_midnight))
    assert [(s["action"], s["spent"]) for s in signals] == [("ok", 1.3)]
    assert applied == [1]


def test_a_predictive_downgrade_is_published_at_the_step_that_brings_it_in_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forecast budget projects its limit within the day once the spend passes `min_ratio`
    (0.2) at this burn rate: the step that passes it publishes the predictive downgrade."""
    messages = [[_row("forecast", 0.08, _NOW_NS - 30 * _NS)] for _ in range(5)]
    _, signals, applied = _both(tmp_path, monkeypatch, messages, (0, 5))
    assert [(s["action"], s["spent"]) for s in signals] == [("downgrade", 0.24)]
    assert applied == [2, 3, 4]  # in reach of a forecast, every step is decided
