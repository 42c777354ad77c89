"""Stage 2's native rows (`TotalsRows`, contracts/native/src/totals.rs) against the Python reference.

The same seeded random usage records (one-message rows, a group's rows with an offset or with
steps, replays, late and older rows, new windows and keys, rung crossings, rolling buckets moving,
call mixes, NaN / negative / infinite amounts, budgets not configured) go through two jobs, one
adding every row in Python (`_apply`, `_apply_combined`), one adding the common rows natively; the
table state, the signals (in order), the changelog records (in order), the windows waiting for a
snapshot and the counters must be the same.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from burnguard.stream import app as app_module
from burnguard.stream import partitioner
from burnguard.stream.accounting import Ring, WindowClock, WindowTotals, window_lengths
from burnguard.stream.app import BudgetJob, new_totals_rows
from burnguard.stream.changelog import plain_store
from burnguard.stream.eviction import horizon_key
from burnguard.stream.records import USAGE_RECORDS_CODEC, encode_record
from faust.serializers import codecs

from tests.factories import budget_config, tenant_cost
from tests.fixtures.decoders import required_native_part
from tests.test_combined_steps import CONFIG, NOW, make_job

_NS = 1_000_000_000
KEYS = {"tenant": ["tenant-0001", "tenant-0002"], "user": ["u1", "u2", "u3"], "session": ["s1", "s2"]}


def _key_of(budget: Any, rng: random.Random) -> str:
    """A key of the budget's scope (a few per scope, so that rows meet the same windows)."""
    scope = budget.scope_name
    return rng.choice(KEYS.get(scope, ["k1", "k2"])) if "," not in scope else "a|b"


def _amount(limit: float, rng: random.Random) -> float:
    """Mostly small shares of the limit (rungs are crossed after tens of rows), now and then a bad one."""
    roll = rng.random()
    if roll < 0.01:
        return rng.choice([math.nan, -0.5, math.inf, -0.0])
    return limit * rng.choice([0.0, 0.001, 0.004, 0.02, 0.07])


def _clocks(count: int, rng: random.Random) -> list[Any]:
    """Stage 2's clock at each record: mostly seconds apart, now and then an hour later (hourly
    windows close while rows for them still come)."""
    clocks, now = [], NOW
    for _ in range(count):
        now += timedelta(seconds=rng.choice([0, 0, 1, 20, 400, 3600]))
        clocks.append(now)
    return clocks


class Load:
    """Random records over a few budgets and keys, the event time drifting forward with late spans."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.budgets = [budget for budget in CONFIG.budgets if budget.metric in ("cost", "calls")][:12]
        self.clocks = {budget.id: WindowClock(budget.window_spec) for budget in self.budgets}
        self.event_ns = int((NOW - timedelta(hours=30)).timestamp() * _NS)
        self.offsets = {0: 0, 1: 0}
        self.sent: list[dict[str, Any]] = []

    def _times(self) -> tuple[int, int]:
        rng = self.rng
        self.event_ns += rng.choice([0, 1, 5, 30, 61, 300, 1800]) * _NS // 3
        late = rng.choice([0, 0, 0, 120, 900, 7200, 9000, 90000]) if rng.random() < 0.15 else 0
        last = self.event_ns - late * _NS
        return last - rng.randint(0, 90) * _NS, last

    def _row(self, offset: int, steps: bool) -> list[Any]:
        rng = self.rng
        budget = rng.choice(self.budgets)
        first, last = self._times()
        bucket_ns = window_lengths(budget.window_spec)[1]
        start = self.clocks[budget.id].start_ns(last)
        spans = rng.randint(1, 4)
        counts_calls = budget.metric == "calls"
        mix = [float(spans), float(rng.randint(0, 1)), 0.0, 0.0] if counts_calls else None
        amount = _amount(budget.limit, rng) if budget.metric == "cost" else float(spans)
        budget_id = budget.id if rng.random() > 0.01 else "no-such-budget"
        row = [budget_id, _key_of(budget, rng), start, amount, spans, first, last, bucket_ns, mix]
        if not steps:
            return row + ([offset] if rng.random() < 0.5 else [])
        parts = []
        for step_offset in sorted(rng.sample(range(offset - 6, offset + 1), rng.randint(2, 4))):
            step_first, step_last = self._times()
            step_spans = rng.randint(1, 3)
            step = [step_offset, _amount(budget.limit, rng), step_spans, step_first, step_last - step_first]
            if counts_calls and rng.random() < 0.3:
                step.append([float(step_spans), 1.0, 0.0, 0.0] if rng.random() < 0.8 else None)
            parts.append(step)
        if rng.random() < 0.5:  # a late row: its window is an earlier one than its steps'
            row[2] = self.clocks[budget.id].start_ns(parts[0][3] + parts[0][4])
        return [*row, parts]

    def record(self) -> dict[str, Any]:
        """A `groups` record of one or two sub-batches; now and then one sent before, again (a replay)."""
        rng = self.rng
        if self.sent and rng.random() < 0.05:
            return copy.deepcopy(rng.choice(self.sent))
        batches = []
        for partition in rng.sample([0, 1], rng.randint(1, 2)):
            self.offsets[partition] += rng.randint(1, 8)
            offset = self.offsets[partition]
            rows = [self._row(offset, rng.random() < 0.25) for _ in range(rng.randint(1, 12))]
            batches.append([partition, offset, rows, []])
        record = {"kind": "groups", "batches": batches}
        self.sent.append(record)
        return copy.deepcopy(record)


class Counted:
    """The native `TotalsRows`, counting the rows it added whole itself (`added`) and the rows it
    added in part, handing back the step after the ones it added alone (`partial`)."""

    def __init__(self, native: Any) -> None:
        self.native, self.added, self.partial = native, 0, 0
        self.seen: list[Any] = []

    def add(self, rows: list[Any], at: int, step: int, *rest: Any) -> tuple[int, int, bool, int]:
        end, stopped, alone, pending = self.native.add(rows, at, step, *rest)
        self.added += end - at - (step > 0 and end > at)  # a row it went on in was handed back before
        self.partial += alone and stopped > 0  # alone after a step: it added the one before
        return end, stopped, alone, pending

    def add_record(self, record: Any, *rest: Any) -> tuple[int, Any]:
        """Counts the record's rows, less one for each time a row is handed back at its first step
        or alone (a row handed back twice counts less: a lower bound), as added."""
        if record not in self.seen:
            self.seen.append(record)
            self.added += record.rows()
        pending, handed = self.native.add_record(record, *rest)
        if handed is not None and not handed[3]:
            step, alone = handed[4], handed[5]
            self.partial += alone and step > 0
            self.added -= step == 0 or alone
        return pending, handed


def run(
    job: BudgetJob, records: list[Any], clocks: list[Any], rows: Any, reading: Any = None
) -> dict[str, Any]:
    """Stage 2 over the records (each at its clock), with `rows` as the native rows; what it left.

    A record given as bytes is read by the usage topic's codec, with `reading` as the native
    `UsageRecord` (None: decoded into lists, the reference).
    """
    partitioner.native_parts["TotalsRows"] = rows
    partitioner.native_parts["UsageRecord"] = reading
    codec = codecs.get_codec(USAGE_RECORDS_CODEC)
    taken: list[Any] = []
    app_id = job.settings.app_id

    def take() -> None:  # the changelog records, their topic named without the job's app id
        taken.extend((topic.removeprefix(app_id), *rest) for topic, *rest in job.changes.take_records())

    async def go() -> None:
        for index, (record, now) in enumerate(zip(records, clocks, strict=True)):
            app_module._now = lambda now=now: now  # type: ignore[assignment]
            job.changes.partition = index % 2
            try:
                value = codec.loads(record) if type(record) is bytes else copy.deepcopy(record)
                await job._account_one(value)
            except Exception as exc:  # a record the reference fails must fail alike
                taken.append(("failed", type(exc).__name__))
            if index % 7 == 6:
                take()
        take()

    asyncio.run(go())
    totals = {
        key: value.to_state() if isinstance(value, WindowTotals) else value
        for key, value in plain_store(job.totals).items()
    }
    return {
        "totals": totals,
        "states": dict(plain_store(job.states)),
        "signals": [signal.model_dump() for signal in job.signals],  # type: ignore[attr-defined]
        "changelog": taken,
        "waiting": list(job.snapshots.waiting),
        "counters": (job.replayed_deltas, job.late_after_eviction, job.agent_errors),
    }


@pytest.mark.parametrize("seed", range(12))
def test_native_rows_leave_what_the_python_rows_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    native_class = required_native_part("TotalsRows")
    monkeypatch.setattr(app_module, "_now", app_module._now)
    monkeypatch.setitem(partitioner.native_parts, "TotalsRows", None)
    load = Load(seed)
    records = [load.record() for _ in range(250)]
    clocks = _clocks(len(records), random.Random(seed))
    counted = Counted(new_totals_rows(native_class))
    python = run(make_job(tmp_path, "python"), records, clocks, None)
    native = run(make_job(tmp_path, "native"), records, clocks, counted)
    for part in python:
        assert native[part] == python[part], part
    rows = sum(len(batch[2]) for record in records for batch in record["batches"])
    assert counted.added > rows // 5, (counted.added, rows)  # the native path took a good share
    assert counted.partial > 0, "rows handed back at a step after steps added natively"
    assert python["signals"], "the load crosses rungs"
    assert python["counters"][0] and python["counters"][2], "the load replays rows and has bad amounts"


def _odd(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A one-message row of a group made by an earlier message than the sub-batch's last; now and
    then a row of another shape or type than stage 1's (the native reading hands it back as its
    bytes), a key in other scripts, or one with an escape (the record is left whole to the
    reference), and a sub-batch with context observations."""
    for batch in record["batches"]:
        for at, row in enumerate(batch[2]):
            if len(row) == 10 and type(row[9]) is int:
                row[9] -= rng.randint(0, 5)  # a message before the sub-batch's last made it
            roll = rng.random()
            if roll < 0.03 and len(row) == 9:
                batch[2][at] = row[:8]  # a row written before the call mix
            elif roll < 0.05:
                row[4] = bool(row[4])  # a bool where an int is: Python sums it as 1
            elif roll < 0.06:
                row[1] = "é ☃ " + row[1]
            elif roll < 0.065:
                row[1] = 'quoted "' + row[1]
        if rng.random() < 0.1:
            batch[3] = [["long-context", f"s{rng.randint(1, 3)}", [rng.randint(1, 900)]]]
    return record


@pytest.mark.parametrize("seed", range(12))
def test_rows_read_from_the_records_bytes_leave_what_the_python_rows_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Stage 1's records as it sends them (`encode_record`), read by the usage topic's codec: the
    native `UsageRecord` and `TotalsRows.add_record` leave what the reference leaves reading the
    same bytes into lists (every row in Python), and what the native rows over those lists leave."""
    reading = required_native_part("UsageRecord")
    native_class = required_native_part("TotalsRows")
    monkeypatch.setattr(app_module, "_now", app_module._now)
    monkeypatch.setitem(partitioner.native_parts, "TotalsRows", None)
    monkeypatch.setitem(partitioner.native_parts, "UsageRecord", None)
    load, rng = Load(seed), random.Random(seed)
    payloads = [encode_record(_odd(load.record(), rng)) for _ in range(250)]
    clocks = _clocks(len(payloads), rng)
    taken = sum(reading.parse(payload) is not None for payload in payloads)
    counted = Counted(new_totals_rows(native_class))
    python = run(make_job(tmp_path, "python"), payloads, clocks, None)
    on_lists = Counted(new_totals_rows(native_class))
    lists = run(make_job(tmp_path, "lists"), payloads, clocks, on_lists)
    native = run(make_job(tmp_path, "bytes"), payloads, clocks, counted, reading)
    for part in python:
        assert native[part] == python[part], part
        assert lists[part] == python[part], part
    rows = sum(len(batch[2]) for payload in payloads for batch in json.loads(payload)["batches"])
    assert counted.added > rows // 5, (counted.added, on_lists.added, rows)  # the native path's share
    assert counted.partial > 0 and on_lists.partial > 0, (counted.partial, on_lists.partial)
    assert len(payloads) // 2 < taken < len(payloads), taken  # most records read natively, not all
    assert python["signals"] and python["counters"][0] and python["counters"][2]


def test_a_native_module_that_does_not_fit_leaves_the_python_rows_in_use() -> None:
    """An older build (another constructor), or classes without the slots it reads: no native rows."""

    class OlderTotalsRows:
        def __init__(self, *shapes: Any) -> None:
            raise TypeError("TotalsRows() takes 7 positional arguments")

    assert new_totals_rows(OlderTotalsRows) is None
    native = required_native_part("TotalsRows")
    with pytest.raises(KeyError, match="newest"):
        native(WindowTotals, WindowTotals, 60 * _NS, 4, 9, 10, 6, 7)  # a `Ring`'s slots are not there
    with pytest.raises(ValueError, match="unusable shapes"):
        native(WindowTotals, Ring, 60 * _NS, 4, 9, 10, 6, 6)  # both kept answers the same length
    assert new_totals_rows(native) is not None


def test_a_record_read_from_its_bytes_is_parked_as_the_record_it_decodes_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record stage 2 fails goes to the dead-letter topic as `json.dumps` of its value: for the
    native `UsageRecord`, of the record its bytes decode to, as when it was decoded into lists."""
    reading = required_native_part("UsageRecord")
    monkeypatch.setitem(partitioner.native_parts, "UsageRecord", reading)
    record = {"kind": "groups", "batches": [[0, 7, [["b", "k é", 0, 1.5, 1, 2, 3, 0, None, 5]], []]]}
    payload = encode_record(record)
    value = codecs.get_codec(USAGE_RECORDS_CODEC).loads(payload)
    assert type(value) is reading
    assert app_module._as_bytes(value) == app_module._as_bytes(record) == json.dumps(record).encode()


def test_a_kept_answer_does_not_hold_past_its_windows_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A calendar window's kept answer (throttle from 1.0 of the limit on) holds only while the window
    is open: a row for it that comes after its end is decided as the closed window (`ok`, the
    restriction lifted), natively as in Python. The random loads above do not reach this case."""
    native_class = required_native_part("TotalsRows")
    monkeypatch.setattr(app_module, "_now", app_module._now)
    monkeypatch.setitem(partitioner.native_parts, "TotalsRows", None)
    config = budget_config(tenant_cost(1.0, actions=[{"at": 1.0, "do": "throttle"}]))
    start = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    start_ns = int(start.timestamp() * _NS)
    event_ns = start_ns + 3600 * _NS

    def record(offset: int, amount: float) -> dict[str, Any]:
        row = ["tenant-cost", "tenant-0001", start_ns, amount, 1, event_ns, event_ns, None, None]
        return {"kind": "groups", "batches": [[0, offset, [row], []]]}

    records = [record(1, 1.2), record(2, 0.01), record(3, 0.01)]
    clocks = [start + timedelta(hours=2), start + timedelta(hours=3), start + timedelta(days=1, seconds=1)]
    counted = Counted(new_totals_rows(native_class))
    python = run(make_job(tmp_path, "python", config=config), records, clocks, None)
    native = run(make_job(tmp_path, "native", config=config), records, clocks, counted)
    assert [signal["action"] for signal in python["signals"]] == ["throttle", "ok"]
    assert native == python
    assert counted.added == 1  # the second row, inside its window's kept answer


def _tenant_row(start_ns: int, amount: float, event_ns: int, *origin: Any) -> list[Any]:
    """A row of `tenant-cost` for tenant-0001 (at one event time); `origin`: a group's row's
    steps or its message's offset."""
    return ["tenant-cost", "tenant-0001", start_ns, amount, 1, event_ns, event_ns, None, None, *origin]


def _warn_at_80_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """(the native rows counted, the config: a $1 `tenant-cost` that warns at 0.8, its window's
    start as a datetime and in ns) for the tests below."""
    native_class = required_native_part("TotalsRows")
    monkeypatch.setattr(app_module, "_now", app_module._now)
    monkeypatch.setitem(partitioner.native_parts, "TotalsRows", None)
    config = budget_config(tenant_cost(1.0, actions=[{"at": 0.8, "do": "warn"}]))
    start = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    return Counted(new_totals_rows(native_class)), config, start, int(start.timestamp() * _NS)


def test_a_window_added_at_once_leaves_its_kept_answer_for_the_native_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's row with steps that the native rows hand back (its window recovered as a list, not
    a `WindowTotals`) is added by the reference at once (`_apply_at_once`); it leaves the window's
    kept answer, so the window's next row is added natively (before, every later row of such a
    window was handed back too)."""
    counted, config, start, start_ns = _warn_at_80_percent(tmp_path, monkeypatch)
    event_ns = start_ns + 3600 * _NS
    steps = [[2, 0.1, 1, event_ns, 0], [3, 0.2, 1, event_ns, 5 * _NS]]
    combined = _tenant_row(start_ns, 0.3, event_ns, steps)
    later = _tenant_row(start_ns, 0.05, event_ns + 9 * _NS)
    records = [{"kind": "groups", "batches": [[0, 3, [combined], []], [0, 4, [later], []]]}]
    state_key = f"tenant-cost|tenant-0001|{start_ns}"
    recovered = [0.25, 1, event_ns, event_ns, {"0": 1}, None, None, None]  # as the changelog holds it

    def recovering(name: str) -> BudgetJob:
        job = make_job(tmp_path, name, config=config)
        plain_store(job.totals)[state_key] = list(recovered)
        return job

    clocks = [start + timedelta(hours=2)]
    python = run(recovering("python"), records, clocks, None)
    native = run(recovering("native"), records, clocks, counted)
    assert native == python
    assert python["totals"][state_key][0] == 0.25 + 0.1 + 0.2 + 0.05
    assert counted.added == 1  # the later row; the recovered window's row went to `_apply_at_once`


def test_a_new_windows_first_row_is_added_natively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row for a window not in the table (one message's, or a group's with steps) is added by the
    native rows to a new window (`BudgetJob._new_window`: its empty totals and their kept answer)
    while its spend stays inside that answer; one that crosses a rung is handed back (and
    publishes), as is one for a window already closed (no kept answer), and one for a window this
    partition forgot (`_forgotten`: counted as late), though the key's published state is a newer
    window's (which decides nothing for an older window's row)."""
    counted, config, start, start_ns = _warn_at_80_percent(tmp_path, monkeypatch)
    event_ns = start_ns + 3600 * _NS
    steps = [[2, 0.1, 1, event_ns, 0], [3, 0.2, 1, event_ns, 5 * _NS]]
    yesterday_ns, forgotten_ns = start_ns - 86400 * _NS, start_ns - 30 * 86400 * _NS
    records = [
        {"kind": "groups", "batches": [[0, 3, [_tenant_row(start_ns, 0.3, event_ns, steps)], []]]},
        {"kind": "groups", "batches": [[1, 5, [_tenant_row(start_ns, 0.2, event_ns)], []]]},
        {"kind": "groups", "batches": [[0, 6, [_tenant_row(yesterday_ns, 0.1, yesterday_ns + _NS)], []]]},
        {"kind": "groups", "batches": [[0, 4, [_tenant_row(start_ns + 86400 * _NS, 0.9, event_ns)], []]]},
        {"kind": "groups", "batches": [[0, 7, [_tenant_row(forgotten_ns, 0.1, forgotten_ns + _NS)], []]]},
    ]
    clocks = [start + timedelta(hours=2)] * len(records)

    def swept(name: str) -> BudgetJob:  # both partitions swept up to yesterday's start
        job = make_job(tmp_path, name, config=config)
        for partition in (0, 1):
            plain_store(job.totals)[horizon_key(partition)] = yesterday_ns
        return job

    python = run(swept("python"), records, clocks, None)
    native = run(swept("native"), records, clocks, counted)
    assert native == python
    assert python["counters"][1] == 1  # the forgotten window's row
    assert python["totals"][f"tenant-cost|tenant-0001|{start_ns}"][0] == 0.1 + 0.2 + 0.2
    assert [signal["action"] for signal in python["signals"]] == ["warn"]
    assert counted.added == 2  # the first two; yesterday's (closed) and one crossing 0.8: handed back


@pytest.mark.parametrize("from_bytes", [False, True], ids=["lists", "bytes"])
def test_a_row_crossing_rungs_hands_back_only_its_crossing_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_bytes: bool
) -> None:
    """A group's row of ten steps of 0.1 on a $1 budget that warns at 0.8, from 0.25 spent: the
    native rows add the steps up to the one crossing 0.8 (the sixth), hand back that step alone
    (`_apply`'d: it publishes `warn`), then add the other four on the kept answer that decision
    left; nothing goes through `_apply_combined`. Before, the whole row was handed back."""
    counted, config, start, start_ns = _warn_at_80_percent(tmp_path, monkeypatch)
    reading = required_native_part("UsageRecord") if from_bytes else None
    event_ns = start_ns + 3600 * _NS
    steps = [[offset, 0.1, 1, event_ns + offset * _NS, 0] for offset in range(2, 12)]
    first = {"kind": "groups", "batches": [[0, 1, [_tenant_row(start_ns, 0.25, event_ns)], []]]}
    climbing = {"kind": "groups", "batches": [[0, 11, [_tenant_row(start_ns, 1.0, event_ns, steps)], []]]}
    records: list[Any] = [first, climbing]
    if from_bytes:
        records = [encode_record(record) for record in records]
    clocks = [start + timedelta(hours=2)] * len(records)
    python = run(make_job(tmp_path, "python", config=config), records, clocks, None)
    job = make_job(tmp_path, "native", config=config)
    applied: list[int] = []
    apply = job._apply

    def noted(row: Any, source: tuple[int, int], now: Any) -> Any:
        applied.append(source[1])
        return apply(row, source, now)

    def not_walked(*args: Any) -> Any:
        raise AssertionError("a row the native rows stopped in went whole to `_apply_combined`")

    job._apply, job._apply_combined = noted, not_walked  # type: ignore[method-assign]
    native = run(job, records, clocks, counted, reading)
    assert native == python
    assert [(signal["action"], signal["spent"]) for signal in python["signals"]] == [("warn", 0.85)]
    assert applied == [7]  # 0.25 + 6 x 0.1 crosses 0.8 at the sixth step, offset 7
    assert counted.partial == 1  # the five steps before it; the four after it end the row natively
