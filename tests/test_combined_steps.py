"""Stage 2 applies a combined row (`records.GroupRows`) exactly as its messages' own rows.

In process, on `BudgetJob`s built but not started: stage 1 (`_ingest_batch`) makes the records,
stage 2 (`_account_one`) accounts them with its real tables, decisions and signals (captured
instead of produced), the clock fixed so that two runs decide at the same `now`.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.stream import app as app_module
from burnguard.stream.accounting import WindowTotals
from burnguard.stream.app import BudgetJob, _has_steps
from burnguard.stream.changelog import plain_store
from burnguard.stream.policy import settles_alike
from burnguard.stream.records import BatchRecord, GroupRows, batches_record
from burnguard.stream.settings import StreamSettings

from tests.factories import (
    LADDER_YAML,
    WARN_DOWNGRADE_THROTTLE,
    budget,
    budget_config,
    budgets_yaml,
    tenant_cost,
)
from tests.fixtures.consumer_events import Event, Message
from tests.fixtures.decoders import usage_value

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from span_load import BUDGETS_YAML, SpanMix

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

#: span_load's budgets (ladders on tenant, user, tenant+feature, session), with a rolling ladder
#: and a predictive downgrade added: each decides by other means than a calendar window's spend.
LADDERS_YAML = BUDGETS_YAML + (
    "  - {id: tenant-rolling, scope: tenant, window: 2h, limit: 0.4,\n"
    "     actions: [{at: 0.5, do: warn}, {at: 0.8, do: downgrade, to: standard}, {at: 1.0, do: throttle}]}\n"
    "  - {id: user-forecast, scope: user, window: day, limit: 0.05,\n"
    "     forecast: {downgrade: true, min_ratio: 0.3},\n"
    "     actions: [{at: 0.9, do: warn}, {at: 1.0, do: throttle}]}\n"
)
CONFIG = parse_budget_yaml(LADDERS_YAML)
NOW = datetime.now(UTC)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "_now", lambda: NOW)


def make_job(tmp_path: Path, name: str, combine: bool = True, config: Any = CONFIG) -> BudgetJob:
    """A job whose stage 1 keeps its usage records (`job.sent`) and stage 2 its signals (`job.signals`)."""
    settings = StreamSettings(data_dir=tmp_path / name, app_id=f"steps-{name}", combine_messages=combine)
    job = BudgetJob(settings, config)
    job.recent.primed.update({0})
    job.dead_letters.stale = False
    job.sent = []  # type: ignore[attr-defined]
    job.signals = []  # type: ignore[attr-defined]

    async def send() -> None:
        job.sent.extend(value for topic, _, _, value, _ in job.usage_records._pending if topic == usage)  # type: ignore[attr-defined]
        job.usage_records._pending = []

    async def signal_out(signal: Signal) -> None:
        job.signals.append(signal)  # type: ignore[attr-defined]

    usage = settings.topics.usage
    job.usage_records.send = send  # type: ignore[method-assign]
    job._send_signal = signal_out  # type: ignore[method-assign]
    return job


def account(job: BudgetJob, records: list[Any]) -> BudgetJob:
    for record in records:
        asyncio.run(job._account_one(usage_value(record) if isinstance(record, bytes) else record))
    return job


def events_of(mix: SpanMix, messages: int) -> list[Event]:
    now = time.time()
    return [Event(Message(0, offset, now), mix.message()[1]) for offset in range(messages)]


def ingest(job: BudgetJob, events: list[Event]) -> list[bytes]:
    asyncio.run(job._ingest_batch(events))
    sent, job.sent = job.sent, []  # type: ignore[attr-defined]
    return sent


def row_record(source_offset: int, rows: list[list[Any]]) -> dict[str, Any]:
    return json.loads(json.dumps(batches_record([BatchRecord(0, source_offset, rows, [])])))


def spent_of(job: BudgetJob, state_key: str) -> WindowTotals:
    return WindowTotals.from_state(plain_store(job.totals)[state_key])


def test_steps_at_or_below_the_mark_are_skipped_and_only_the_later_one_counts(tmp_path: Path) -> None:
    """The key's mark is at 12 (message 12 counted); a later sending combined 10, 11, 12 and 15."""
    job = make_job(tmp_path, "worker", config=parse_budget_yaml(budgets_yaml(tenant_cost(1.0e6))))
    account(job, [row_record(12, [["tenant-cost", "acme", 0, 0.5, 1, 100, 100, 0]])])
    # [offset, amount, spans, first event ns, last - first]
    steps = [[10, 1.0, 1, 50, 0], [11, 2.0, 1, 60, 0], [12, 0.5, 1, 100, 0], [15, 8.0, 2, 140, 10]]
    combined = ["tenant-cost", "acme", 0, 11.5, 5, 50, 150, 0, None, steps]
    account(job, [row_record(15, [combined])])
    totals = spent_of(job, "tenant-cost|acme|0")
    assert (totals.spent, totals.spans, totals.first_event_ns, totals.last_event_ns) == (8.5, 3, 100, 150)
    assert totals.applied == {"0": 15}
    assert job.replayed_deltas == 3
    account(job, [row_record(15, [combined])])  # the same row again: nothing
    assert spent_of(job, "tenant-cost|acme|0").spent == 8.5


def test_a_row_whose_amount_is_null_fails_its_record_loudly(tmp_path: Path) -> None:
    """What `encode_record` writes for a non-finite amount (`tests/test_usage_records.py`): stage 2
    raises on it, so `_account` dead-letters the record with the reason, and the window keeps no NaN."""
    job = make_job(tmp_path, "worker", config=parse_budget_yaml(budgets_yaml(tenant_cost(1.0e6))))
    account(job, [row_record(1, [["tenant-cost", "acme", 0, 0.5, 1, 100, 100, 0]])])
    with pytest.raises(TypeError):
        account(job, [row_record(2, [["tenant-cost", "acme", 0, None, 1, 110, 110, 0]])])
    assert spent_of(job, "tenant-cost|acme|0").spent == 0.5


def test_rows_of_every_earlier_format_are_still_accounted(tmp_path: Path) -> None:
    """Rows without steps (`batch` records, rows before the call mix) count as they always did."""
    job = make_job(tmp_path, "worker", config=parse_budget_yaml(budgets_yaml(tenant_cost(1.0e6))))
    old_batch = {
        "kind": "batch",
        "source_partition": 0,
        "source_offset": 3,
        "deltas": [["tenant-cost", "acme", 0, 1.0, 1, 10, 10, 0]],
        "contexts": [],
    }
    mixed = row_record(4, [["tenant-cost", "acme", 0, 2.0, 1, 20, 20, 0, [1.0, 0.0, 0.0, 0.0]]])
    one_message = row_record(9, [["tenant-cost", "acme", 0, 4.0, 1, 30, 30, 0, None, 6]])  # made by offset 6
    account(job, [old_batch, mixed, one_message, old_batch])
    totals = spent_of(job, "tenant-cost|acme|0")
    assert (totals.spent, totals.spans, totals.applied) == (7.0, 3, {"0": 6})


def signals_by_key(job: BudgetJob) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for signal in job.signals:  # type: ignore[attr-defined]
        by_key.setdefault(signal.kafka_key, []).append(signal.to_json().decode())
    return by_key


def states_of(job: BudgetJob) -> tuple[dict[str, Any], dict[str, Any]]:
    totals = {
        key: WindowTotals.from_state(value).to_state() for key, value in plain_store(job.totals).items()
    }
    return totals, dict(plain_store(job.states))


def cut_with_replays(tmp_path: Path, events: list[Event], rng: random.Random) -> list[bytes]:
    """Stage 1's records over `events` in random micro-batches, with random re-readings from an
    earlier offset (a failed send, a crash before the commit, a new owner), each cut anew."""
    records: list[bytes] = []
    job = make_job(tmp_path, "cut-0")
    done = 0
    while done < len(events):
        end = min(len(events), done + rng.randint(1, 30))
        records += ingest(job, events[done:end])
        if rng.random() < 0.3:  # read again from an earlier offset, by a new process or the same
            if rng.random() < 0.5:
                job = make_job(tmp_path, f"cut-{len(records)}")
            at = rng.randint(0, end - 1)
            while at < end:
                upto = min(end, at + rng.randint(1, 30))
                records += ingest(job, events[at:upto])
                at = upto
        done = end
    return records


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("rule", ["exact", "without-walking"])
def test_combined_rows_cut_and_replayed_at_random_decide_as_per_message_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, rule: str
) -> None:
    """Per-key totals, marks, published states and the sequence of signals (spend, reason, burn rate
    and all) are those of per-message rows, read once. `without-walking`: a combined row always
    applied with one decision (`settles_alike` answering yes) publishes other signals."""
    mix = SpanMix(seed=seed, tenants=3, users_per_tenant=3, batch_min=1, batch_max=4, calls_per_session=30)
    events = events_of(mix, 400)
    alone = make_job(tmp_path, "alone", combine=False)
    per_message = account(make_job(tmp_path, "stage-2-alone"), ingest(alone, events))
    records = cut_with_replays(tmp_path, events, random.Random(seed))
    if rule == "without-walking":
        monkeypatch.setattr(app_module, "settles_alike", lambda *args, **kwargs: True)
    combined = account(make_job(tmp_path, "stage-2-combined"), records)

    rows = [row for record in records for batch in json.loads(record)["batches"] for row in batch[2]]
    assert sum(_has_steps(row) for row in rows) > 100  # the cuts did sum messages
    assert combined.replayed_deltas > 100  # and re-sent some of them
    expected = signals_by_key(per_message)
    assert sum(map(len, expected.values())) > 20  # rungs crossed, in the calendar and rolling windows
    assert any("tenant-rolling" in key for key in expected)
    if rule == "exact":
        assert signals_by_key(combined) == expected
        assert states_of(combined) == states_of(per_message)
    else:
        assert signals_by_key(combined) != expected


THROTTLE_AT_LIMIT = [{"at": 1.0, "do": "throttle"}]
LADDER_CONFIG = budget_config(
    budget("daily", 1.0, window="day", actions=WARN_DOWNGRADE_THROTTLE),
    budget("rolling", 1.0, window="1h", actions=WARN_DOWNGRADE_THROTTLE),
    budget("forecast", 1.0, forecast={"downgrade": True, "min_ratio": 0.3}, actions=THROTTLE_AT_LIMIT),
    head=LADDER_YAML,
)
_NS = 1_000_000_000


def _budget(budget_id: str) -> Any:
    return next(b for b in LADDER_CONFIG.budgets if b.id == budget_id)


def test_settles_alike_answers_yes_only_where_no_step_can_change_the_action() -> None:
    """The one-decision path's condition (`policy.settles_alike`): rungs at both ends with room for
    rounding, a closed calendar window, a predictive downgrade in reach, a rolling ring's reach."""
    now_ns = int(NOW.timestamp() * _NS)
    daily, rolling, forecast = _budget("daily"), _budget("rolling"), _budget("forecast")
    start = daily.window_spec.start_ns(now_ns)
    spent = WindowTotals(spent=0.3, spans=3, first_event_ns=now_ns - 60 * _NS, last_event_ns=now_ns)
    assert settles_alike(daily, start, spent, NOW, "ok", 0.19)
    assert not settles_alike(daily, start, spent, NOW, "ok", 0.2)  # reaches warn at 0.5
    assert not settles_alike(daily, start, spent, NOW, "warn", 0.0)  # not the published action
    at_the_rung = WindowTotals(spent=0.5 - 1e-12, spans=1)
    assert not settles_alike(daily, start, at_the_rung, NOW, "ok", 0.0)  # within rounding of the rung: walked
    yesterday = daily.window_spec.start_ns(now_ns - 86_400 * _NS)
    assert settles_alike(daily, yesterday, spent, NOW, "ok", 5.0)  # a closed window decides ok
    assert not settles_alike(daily, yesterday, spent, NOW, "throttle", 5.0)
    assert settles_alike(forecast, start, WindowTotals(spent=0.1, spans=1), NOW, "ok", 0.1)
    assert not settles_alike(forecast, start, WindowTotals(spent=0.1, spans=1), NOW, "ok", 0.25)  # min_ratio
    bucket_ns = rolling.window_spec.bucket_ns
    ring = WindowTotals()
    ring.add(0, 1, 0.2, 1, now_ns - 60 * _NS, now_ns - 60 * _NS, bucket_ns)
    assert settles_alike(rolling, 0, ring, NOW, "ok", 0.1, [now_ns])
    assert not settles_alike(
        rolling, 0, ring, NOW, "ok", 0.1, [now_ns + 2 * 3600 * _NS]
    )  # pushes counted buckets out
    ahead = WindowTotals()
    ahead.add(0, 1, 0.2, 1, now_ns + 2 * 3600 * _NS, now_ns + 2 * 3600 * _NS, bucket_ns)
    assert not settles_alike(rolling, 0, ahead, NOW, "ok", 0.1, [now_ns])  # the ring's newest is out of reach


def rolling_row(amount: float, event_ns: int) -> list[Any]:
    return ["rolling", "acme", 0, amount, 1, event_ns, event_ns, 60 * _NS, [1.0, 0.0, 0.0, 0.0]]


def test_a_step_far_ahead_in_a_rolling_window_is_walked_as_per_message_rows(tmp_path: Path) -> None:
    """A step whose bucket pushes counted ones out of the ring (a clock ahead) lowers the spend in
    the middle of a row although the sum stays on the same rung: walked, it publishes the `ok` the
    per-message rows publish."""
    now_ns = int(NOW.timestamp() * _NS)
    first = row_record(1, [rolling_row(0.6, now_ns - 120 * _NS)])  # warn
    later = [(2, rolling_row(0.05, now_ns + 2 * 3600 * _NS)), (3, rolling_row(0.1, now_ns - 30 * _NS))]
    alone = account(make_job(tmp_path, "alone", config=LADDER_CONFIG), [first])
    account(alone, [row_record(offset, [row]) for offset, row in later])
    group = GroupRows()
    for offset, row in later:
        group.add(offset, [row])
    ((combined_row, _),) = group.rows()
    combined = account(
        make_job(tmp_path, "combined", config=LADDER_CONFIG), [first, row_record(3, [combined_row])]
    )
    assert [json.loads(s)["action"] for s in signals_by_key(alone)["tenant:acme@rolling"]] == ["warn", "ok"]
    assert signals_by_key(combined) == signals_by_key(alone)
    assert states_of(combined) == states_of(alone)
