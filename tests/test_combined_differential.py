"""Differential property test: stage 2 fed combined rows decides exactly as fed per-message rows.

Adversarial inputs written as delta rows (what `usage_rows` makes per message), so that amounts sit
on and around rungs, event times spread over rolling buckets that expire between steps (also ahead
of `now`), windows close, a predictive downgrade comes within reach, the call mix moves, and rows
name budgets that are gone or carry amounts no span has. Stage 1's real combining (`GroupRows`,
`BudgetJob._close_group`, `MicroBatch`) cuts them into groups at random; several senders (a
re-reading after a failed send, a successor, a zombie) send overlapping ranges, their records
interleaved at random as the usage partition would order them; stage 2's real `_account_one`
accounts them on a `BudgetJob` built but not started, at a fixed `now`.
The reference: each message's rows as its own sub-batch, read once, in offset order.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import Topics
from burnguard.contracts.windows import Window
from burnguard.stream import app as app_module
from burnguard.stream.accounting import ContextGrowth, WindowTotals
from burnguard.stream.app import BudgetJob
from burnguard.stream.changelog import plain_store
from burnguard.stream.duplicates import digest
from burnguard.stream.eviction import horizon_key, is_window_key
from burnguard.stream.partitioner import native_module
from burnguard.stream.records import GroupRows, MicroBatch, combined_row, encode_record
from burnguard.stream.settings import StreamSettings
from burnguard.stream.takeover import PartitionsLost
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fixtures.consumer_events import Event, Message, keep_sent
from tests.fixtures.decoders import usage_value
from tests.support.otlp_batches import otlp_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from span_load import BUDGETS_YAML, SpanMix

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

CONFIG = parse_budget_yaml(
    """\
model_classes: {premium: [gpt-4.1], standard: [gpt-4.1-mini], economy: [gpt-4.1-nano]}
budgets:
  - {id: day-ladder, scope: tenant, window: day, limit: 1.0,
     actions: [{at: 0.3, do: warn}, {at: 0.6, do: downgrade, to: standard}, {at: 1.0, do: throttle}]}
  - {id: two-downgrades, scope: tenant, window: day, limit: 1.0,
     actions: [{at: 0.3, do: downgrade, to: standard}, {at: 0.6, do: downgrade, to: economy}]}
  - {id: rolling, scope: tenant, window: 1h, limit: 1.0,
     actions: [{at: 0.3, do: warn}, {at: 0.6, do: downgrade}, {at: 1.0, do: throttle}]}
  - {id: forecast, scope: tenant, window: day, limit: 1.0, forecast: {downgrade: true, min_ratio: 0.2},
     actions: [{at: 0.9, do: warn}, {at: 1.0, do: throttle}]}
  - {id: rolling-forecast, scope: tenant, window: 2h, limit: 1.0,
     forecast: {downgrade: true, min_ratio: 0.2}, actions: [{at: 0.7, do: warn}, {at: 1.0, do: throttle}]}
  - {id: calls, scope: tenant, window: day, metric: calls, limit: 4,
     actions: [{at: 0.5, do: warn}, {at: 1.0, do: throttle}]}
  - {id: tools, scope: session, window: session, metric: tool_calls, limit: 3,
     actions: [{at: 0.5, do: warn}, {at: 1.0, do: throttle}]}
"""
)
#: Mid-morning UTC, a few seconds into a minute: yesterday's day window is closed.
NOW = datetime(2026, 12, 2, 9, 30, 7, tzinfo=UTC)
NOW_NS = int(NOW.timestamp()) * 1_000_000_000
_MINUTE = 60 * 1_000_000_000
_DAY = Window("day")
_BUCKETS = {"rolling": 60 * 1_000_000_000, "rolling-forecast": 120 * 1_000_000_000}
BUDGET_IDS = [b.id for b in CONFIG.budgets] + ["gone"]  # "gone": a budget removed since
#: Minutes from `now` where a rolling window's oldest bucket leaves, or a step lies past its reach.
_EDGES = [-121, -120, -119, -62, -61, -60, -59, 0, 1, 2, 3, 5, 8]
AMOUNTS = [0.0, 0.1, 0.2, 0.3, 1 / 3, 0.05, 0.25, 0.5, 0.7, 1e-12, 0.30000000000000004, 0.29999999999999993]


def _job(tmp_path: Path, name: str, config: Any = CONFIG, combine: bool = True) -> BudgetJob:
    """A job not started: stage 1's helpers make records, stage 2's signals are captured."""
    settings_ = StreamSettings(
        data_dir=tmp_path / name, app_id=f"diff-{name}", partitions=1, combine_messages=combine
    )
    job = BudgetJob(settings_, config)
    job.signals = []  # type: ignore[attr-defined]

    async def signal_out(signal: Signal) -> None:
        job.signals.append(signal)  # type: ignore[attr-defined]

    job._send_signal = signal_out  # type: ignore[method-assign]
    return job


@st.composite
def rows_of_a_message(draw: st.DrawFn) -> list[list[Any]]:
    """A message's delta rows, one per (budget, key, window) as `usage_rows` makes them."""
    rows: dict[tuple[str, str, int], list[Any]] = {}
    for _ in range(draw(st.integers(0, 4))):
        budget = draw(st.sampled_from(BUDGET_IDS))
        key = draw(st.sampled_from(["acme", "globex"]))
        minutes = draw(st.sampled_from(_EDGES) | st.integers(-200, 8))  # around bucket ends too
        last_ns = NOW_NS + minutes * _MINUTE + draw(st.integers(0, _MINUTE - 1))
        first_ns = last_ns - draw(st.sampled_from([0, 1, _MINUTE, 30 * _MINUTE]))
        bucket_ns = _BUCKETS.get(budget, 0)
        start = _DAY.start_ns(last_ns) if not bucket_ns and budget != "tools" else 0
        if budget in ("calls", "tools"):
            amount = float(draw(st.integers(0, 2)))
        else:
            cents = st.integers(0, 70).map(lambda cent: cent / 100)  # sums that round across a rung
            amount = draw(st.sampled_from([*AMOUNTS, -0.5]) | cents | st.floats(0, 0.8))
        mix = None if budget == "tools" else draw(st.none() | st.just([1.0, 1.0, 0.0, 0.125]))
        row = [budget, key, start, amount, 1, first_ns, last_ns, bucket_ns, mix]
        rows.setdefault((budget, key, start), row)
    return list(rows.values())


def _record_bytes(job: BudgetJob, batch: MicroBatch) -> list[bytes]:
    return [encode_record(record) for _, record in batch.records()]


Messages = list[list[list[Any]]]


def per_message_records(job: BudgetJob, messages: Messages, first: int, last: int) -> list[bytes]:
    """Stage 1 with combining off: each message's rows its own sub-batch (`_ingest_one`)."""
    batch = MicroBatch(app_module.BATCH_ROWS)
    for offset in range(first, last):
        rows = copy.deepcopy(messages[offset])
        for partition, sub_batch in list(job._batch_records(rows, [], (0, offset))):
            batch.add(partition, sub_batch)
    return _record_bytes(job, batch)


def combined_records(job: BudgetJob, messages: Messages, first: int, last: int) -> list[bytes]:
    """Stage 1 with combining on: the messages' rows summed per key with their steps (`GroupRows`);
    where the native module is built, its group and sub-batch writer send the same bytes."""
    group, batch = GroupRows(), MicroBatch(app_module.BATCH_ROWS)
    for offset in range(first, last):
        group.add(offset, copy.deepcopy(messages[offset]))
    job._close_group(0, group, batch)
    records = _record_bytes(job, batch)
    native = getattr(native_module(), "Groups", None)
    if native is not None:
        group, batch = native(combined_row), MicroBatch(app_module.BATCH_ROWS)
        for offset in range(first, last):
            group.add(offset, copy.deepcopy(messages[offset]))
        job._close_group(0, group, batch)
        assert [record for _, _, record in batch.encoded_records()] == records
    return records


#: Eviction horizons of the usage partition (0: never swept): a row for a window absent from the
#: table that the horizon says has expired is refused (`_forgotten`), per step.
_HORIZONS = [0, NOW_NS - 90 * _MINUTE, NOW_NS]


def _swept(job: BudgetJob, horizon: int) -> BudgetJob:
    """The job's usage partition 0 swept through `horizon`, as its last `sweep` record stores it."""
    if horizon:
        plain_store(job.totals)[horizon_key(0)] = horizon
    return job


def account(job: BudgetJob, records: list[bytes]) -> None:
    for record in records:
        asyncio.run(job._account_one(usage_value(record)))


def outcome(job: BudgetJob) -> tuple[Any, ...]:
    """Totals (bit for bit: spend, spans, event range, marks, burn-rate ring, buckets, mix), the
    published states, and each key's signals in order, everything they carry."""
    totals = {
        key: WindowTotals.from_state(value).to_state()
        for key, value in plain_store(job.totals).items()
        if is_window_key(key)
    }
    by_key: dict[str, list[str]] = {}
    for signal in job.signals:  # type: ignore[attr-defined]
        by_key.setdefault(signal.kafka_key, []).append(signal.to_json().decode())
    return json.dumps(totals, sort_keys=True), dict(plain_store(job.states)), by_key


@st.composite
def schedules(draw: st.DrawFn, messages: int) -> list[tuple[int, bool, int, int]]:
    """Deliveries (sender, combined?, first offset, end offset) in the order the usage partition holds them.

    Senders each send consecutive micro-batches of a range in offset order; a new sender (a
    re-reading after a failed send, a successor after a rebalance, or a zombie's rival) starts
    anywhere at or below the delivered prefix (below it everything was delivered: committed);
    a micro-batch may be lost (a failed send: its sender reads it again, cut anew). Each
    sender combines or not (a rolling change of the switch).
    """
    senders: list[list[Any]] = [[draw(st.booleans()), 0]]  # [combines, next offset]
    delivered: set[int] = set()
    out: list[tuple[int, bool, int, int]] = []
    prefix = 0
    while prefix < messages:
        live = [s for s in senders if s[1] < messages]
        if not live or draw(st.integers(0, 9)) >= 7:
            senders.append([draw(st.booleans()), draw(st.integers(0, prefix))])
            continue
        sender = draw(st.sampled_from(live))
        first = sender[1]
        end = min(messages, first + draw(st.integers(1, 8)))
        if draw(st.integers(0, 7)) == 7:
            continue  # the send failed: nothing delivered, the sender reads `first` again
        index = next(
            i for i, other in enumerate(senders) if other is sender
        )  # not `index`: lists compare equal
        out.append((index, sender[0], first, end))
        sender[1] = end
        delivered.update(range(first, end))
        while prefix in delivered:
            prefix += 1
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_cut_and_any_replays_decide_as_per_message_rows_read_once(
    tmp_path_factory: Any, monkeypatch: Any, data: st.DataObject
) -> None:
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    messages = data.draw(st.lists(rows_of_a_message(), min_size=1, max_size=24), label="messages")
    horizon = data.draw(st.sampled_from(_HORIZONS), label="eviction horizon")
    tmp_path = tmp_path_factory.mktemp("diff")
    reference = _swept(_job(tmp_path, "reference"), horizon)
    account(reference, per_message_records(reference, messages, 0, len(messages)))
    sender, tested = _job(tmp_path, "sender"), _swept(_job(tmp_path, "tested"), horizon)
    for _, combines, first, end in data.draw(schedules(len(messages)), label="deliveries"):
        make = combined_records if combines else per_message_records
        account(tested, make(sender, messages, first, end))
    assert outcome(tested) == outcome(reference)
    for name in ("replayed_deltas", "late_after_eviction", "agent_errors"):
        event(f"{name} > 0: {getattr(tested, name) > 0}")
    event(f"signals published: {min(len(tested.signals), 3)}+")  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_same_deliveries_combined_count_errors_and_replays_as_per_message(
    tmp_path_factory: Any, monkeypatch: Any, data: st.DataObject
) -> None:
    """Same senders, same micro-batches: combined or per message, the same counters too."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    messages = data.draw(st.lists(rows_of_a_message(), min_size=1, max_size=24), label="messages")
    deliveries = data.draw(schedules(len(messages)), label="deliveries")
    horizon = data.draw(st.sampled_from(_HORIZONS), label="eviction horizon")
    tmp_path = tmp_path_factory.mktemp("same")
    jobs = []
    for make in (per_message_records, combined_records):
        sender = _job(tmp_path, f"sender-{make.__name__}")
        tested = _swept(_job(tmp_path, f"tested-{make.__name__}"), horizon)
        for _, _, first, end in deliveries:
            account(tested, make(sender, messages, first, end))
        jobs.append(tested)
    alone, combined = jobs
    assert outcome(combined) == outcome(alone)
    counters = ("agent_errors", "replayed_deltas", "late_after_eviction")
    assert [getattr(combined, c) for c in counters] == [getattr(alone, c) for c in counters]
    windows = [value for key, value in plain_store(combined.totals).items() if is_window_key(key)]
    assert math.isfinite(sum(WindowTotals.from_state(value).spent for value in windows))


@pytest.mark.parametrize("window", ["session", "2h"])
def test_rows_bucketed_for_another_window_decide_as_per_message_rows(
    tmp_path: Path, monkeypatch: Any, window: str
) -> None:
    """A rolling 1h budget changed (same id, window start 0) to a session or a 2h window while its
    rows were on the usage topic: the rows' buckets are a 1h window's. Per message, a later
    minute pushes the spend of an hour ago out of the rows' ring, so the spend falls (`ok` is
    published) before the next message raises it; combined, the fast path took the spend as only
    growing (a session window has no ring reach to check) and kept `warn`."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    config = parse_budget_yaml(
        "budgets:\n"
        f"  - {{id: b, scope: session, window: {window}, limit: 1.0, actions: [{{at: 0.3, do: warn}}]}}\n"
    )
    minute = _BUCKETS["rolling"]  # the rows' bucket: a 1h window's
    hour_ago, next_minute = NOW_NS - 60 * _MINUTE, NOW_NS + _MINUTE
    messages = [
        [["b", "s1", 0, 0.35, 1, hour_ago, hour_ago, minute, None]],
        [["b", "s1", 0, 0.0, 1, next_minute, next_minute, minute, None]],
        [["b", "s1", 0, 0.1, 1, next_minute, next_minute, minute, None]],
    ]
    outcomes = []
    for make in (per_message_records, combined_records):
        job = _job(tmp_path, make.__name__, config)
        account(job, per_message_records(job, messages, 0, 1))
        account(job, make(job, messages, 1, 3))
        outcomes.append(outcome(job))
    alone, combined = outcomes
    assert [json.loads(s)["action"] for s in alone[2]["session:s1@b"]] == ["warn", "ok"]
    assert combined == alone


def _stage_one_job(tmp_path: Path, name: str, config: Any = CONFIG, combine: bool = True) -> BudgetJob:
    """A job whose stage 1 keeps what it hands the producer (`job.sent`: topic, partition, key, value,
    headers), assigned partition 0 with its digests primed and the dead-letter topic read back."""
    job = _job(tmp_path, name, config, combine)
    job.recent.primed.add(0)
    job.dead_letters.stale = False
    keep_sent(job)
    return job


def test_a_worker_expelled_while_it_stood_still_parks_nothing_its_successor_parks_again(
    tmp_path: Path,
) -> None:
    """A bad message is parked once. The successor read the dead-letter topic back when it was
    assigned the partition, before the stalled worker woke: it parks the message too. So the
    expelled worker's micro-batch, dead letters included, must not go out (the stall guard before
    each stage-1 send did that; per-message steps make its rows harmless, not its dead letters)."""
    malformed = [Event(Message(0, 0, time.time()), b"\x0a\xff not protobuf")]
    zombie, successor = _stage_one_job(tmp_path, "zombie"), _stage_one_job(tmp_path, "successor")

    async def expelled() -> bool:
        return False

    zombie.stall_guard.still_member = expelled  # type: ignore[method-assign]
    with contextlib.suppress(PartitionsLost):  # how the zombie's agent ends
        asyncio.run(zombie._ingest_batch(malformed))
    asyncio.run(successor._ingest_batch(malformed))
    deadletter = Topics().deadletter
    sent = [*zombie.sent, *successor.sent]  # type: ignore[attr-defined]
    parked = [record for record in sent if record[0] == deadletter]
    assert len(parked) == 1


@pytest.mark.parametrize("mixes", [("mix", None), (None, "mix")], ids=["mix-then-none", "none-then-mix"])
def test_a_key_with_and_without_a_call_mix_in_one_group_is_combined_as_per_message(
    tmp_path: Path, monkeypatch: Any, mixes: tuple[str | None, str | None]
) -> None:
    """A budget changed from cost to tool calls (or back), same id, while a micro-batch is read
    (the budgets reload runs whenever `_ingest_batch` yields): one key's rows in a group, one with
    a call mix and one without. Combined, `_close_group` raised on the row without (the micro-batch,
    acked when its agent stops, is lost), or dropped the mix of a row after one without."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    start = _DAY.start_ns(NOW_NS)
    messages = [
        [["day-ladder", "acme", start, 0.2, 1, NOW_NS, NOW_NS, 0, [1.0, 1.0, 0.0, 0.125] if mix else None]]
        for mix in mixes
    ]
    outcomes = []
    for make in (per_message_records, combined_records):
        job = _job(tmp_path, make.__name__)
        account(job, make(job, messages, 0, 2))
        outcomes.append(outcome(job))
    alone, combined = outcomes
    assert json.loads(alone[0])[f"day-ladder|acme|{start}"][-1] == [1.0, 1.0, 0.0, 0.125]
    assert combined == alone


def _rolling(window: str) -> Any:
    return parse_budget_yaml(
        "budgets:\n"
        f"  - {{id: b, scope: tenant, window: {window}, limit: 0.02, actions: [{{at: 0.5, do: warn}}]}}\n"
    )


def test_a_budgets_reload_within_a_micro_batch_combines_as_per_message(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The budgets reload runs whenever `_ingest_batch` yields: a rolling budget lengthened (1h to
    2h, same id and window start 0) between two messages of a micro-batch. Per message each row
    keeps its own bucket size; combined, one key's row gave every step the first row's."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    before, after = _rolling("1h"), _rolling("2h")
    events = [
        Event(Message(0, offset, NOW.timestamp()), otlp_batch("acme", [("chat", 2000, 500)], at=NOW - ago))
        for offset, ago in enumerate([timedelta(minutes=90), timedelta(minutes=1), timedelta(minutes=1)])
    ]
    usage = Topics().usage
    outcomes = []
    for combine in (False, True):
        stage_one = _stage_one_job(tmp_path, f"one-{combine}", before, combine)
        ingest_one = stage_one._ingest_one

        def reloaded_after(
            event: Any, batch: Any, groups: Any, job: BudgetJob = stage_one, read: Any = ingest_one
        ) -> None:
            read(event, batch, groups)
            job.config, job._budgets = after, {budget.id: budget for budget in after.budgets}

        stage_one._ingest_one = reloaded_after  # type: ignore[method-assign]
        asyncio.run(stage_one._ingest_batch(events))
        stage_two = _job(tmp_path, f"two-{combine}", after)
        account(stage_two, [value for topic, _, _, value, _ in stage_one.sent if topic == usage])  # type: ignore[attr-defined]
        outcomes.append(outcome(stage_two))
    alone, combined = outcomes
    assert combined == alone


def _per_message_and_combined(
    tmp_path: Path, config: Any, before: Messages, group: Messages
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Outcomes of `before` (per message), then `group` per message or as one combined group."""
    outcomes = []
    messages = before + group
    for make in (per_message_records, combined_records):
        job = _job(tmp_path, make.__name__, config)
        account(job, per_message_records(job, messages, 0, len(before)))
        account(job, make(job, messages, len(before), len(messages)))
        outcomes.append(outcome(job))
    return outcomes[0], outcomes[1]


def _actions(outcome_: tuple[Any, ...], kafka_key: str) -> list[str]:
    return [json.loads(signal)["action"] for signal in outcome_[2].get(kafka_key, [])]


def test_a_rung_reached_only_by_adding_the_steps_one_by_one_is_published(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Added one by one the steps reach 1.0 (throttle); their sum added to the spend rounds to
    0.9999999999999999: the one-decision path must leave room for rounding (`_ROUNDING_ROOM`)."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    start = _DAY.start_ns(NOW_NS)
    spent, steps = 0.6605680435026205, (0.01231085567623421, 0.32712110082114515)
    assert (spent + steps[0]) + steps[1] == 1.0 > spent + (steps[0] + steps[1])
    row = ["day-ladder", "acme", start, 0.0, 1, NOW_NS, NOW_NS, 0, None]
    before = [[[*row[:3], spent, *row[4:]]]]
    group = [[[*row[:3], amount, *row[4:]]] for amount in steps]
    alone, combined = _per_message_and_combined(tmp_path, CONFIG, before, group)
    assert _actions(alone, "tenant:acme@day-ladder") == ["downgrade", "throttle"]
    assert combined == alone


def test_a_step_that_pushes_counted_spend_out_of_the_rolling_ring_is_walked(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A step a bucket past `now` pushes the window's oldest counted bucket out of the ring: the
    spend falls below `warn` (ok is published), then the next step raises it again. Both ends
    decide `warn`, so only the ring's reach (`settles_alike`) sends the row step by step."""
    monkeypatch.setattr(app_module, "_now", lambda: NOW)
    bucket = _BUCKETS["rolling"]
    oldest = (NOW_NS - 60 * _MINUTE) // bucket * bucket  # the first bucket still counted at `now`
    ahead = oldest + 61 * bucket  # its slot in the ring
    row = ["rolling", "acme", 0, 0.0, 1, 0, 0, bucket, None]
    before = [
        [[*row[:3], 0.1, 1, oldest, oldest, bucket, None]],
        [[*row[:3], 0.25, 1, NOW_NS, NOW_NS, bucket, None]],
    ]
    group = [[[*row[:3], amount, 1, ahead, ahead, bucket, None]] for amount in (0.0, 0.1)]
    alone, combined = _per_message_and_combined(tmp_path, CONFIG, before, group)
    assert _actions(alone, "tenant:acme@rolling") == ["warn", "ok", "warn"]
    assert combined == alone


#: span_load's budgets, a rolling ladder, a forecast and a context guard, for stage 1 end to end.
STAGE_ONE_CONFIG = parse_budget_yaml(
    BUDGETS_YAML + "  - {id: tenant-rolling, scope: tenant, window: 2h, limit: 0.4,\n"
    "     actions: [{at: 0.5, do: warn}, {at: 0.8, do: downgrade, to: standard}, {at: 1.0, do: throttle}]}\n"
    "  - {id: user-forecast, scope: user, window: day, limit: 0.05,\n"
    "     forecast: {downgrade: true, min_ratio: 0.3},\n"
    "     actions: [{at: 0.9, do: warn}, {at: 1.0, do: throttle}]}\n"
    "context_guards:\n  - {id: long-context, max_input_tokens: 1000, growth_calls: 3}\n"
)


def _drawn_events(data: st.DataObject) -> tuple[int, list[Event]]:
    """A drawn count of span-load messages, one of them malformed and a later one a copy."""
    count = data.draw(st.integers(8, 40), label="messages")
    return count, _span_events(
        data.draw(st.integers(0, 1000), label="seed"),
        count,
        data.draw(st.integers(0, count - 1), label="malformed"),
        data.draw(st.integers(1, count - 1), label="copy"),
    )


def _span_events(
    seed: int, messages: int, malformed: int | None, copy_of_previous: int | None
) -> list[Event]:
    """span_load messages of partition 0: one replaced by calls of a model nobody prices, one by
    spans with a negative cost (rejected), placed by the seed and the positions; one by bytes that
    are no OTLP (`malformed`), one by a producer retry's copy of the message before it."""
    mix = SpanMix(seed=seed, tenants=2, users_per_tenant=2, batch_min=1, batch_max=4, calls_per_session=30)
    now = time.time()
    values = [mix.message()[1] for _ in range(messages)]
    unpriced, rejected = (seed + (malformed or 0)) % messages, (seed + 1 + (copy_of_previous or 0)) % messages
    values[unpriced] = otlp_batch("acme", [("chat", 1000, 100)], model="mystery-model")
    values[rejected] = otlp_batch("acme", [("chat", 10, 10)] * 2, extra={attr.COST_USD: -1.0})
    if malformed is not None:
        values[malformed] = b"\x0a\xff not protobuf"
    if copy_of_previous is not None:
        values[copy_of_previous] = values[copy_of_previous - 1]
    return [Event(Message(0, offset, now), value) for offset, value in enumerate(values)]


def _sender(tmp_path: Path, name: str, events: list[Event], start: int, combine: bool) -> BudgetJob:
    """A stage 1 assigned partition 0 at `start`, its digests primed with what came before (`_prime`)."""
    job = _stage_one_job(tmp_path, name, STAGE_ONE_CONFIG, combine)
    for earlier in events[:start]:
        job.recent.earlier_copy(
            0, digest(earlier.value), earlier.message.offset, int(earlier.message.timestamp * 1e9)
        )
    return job


def _stage_one(job: BudgetJob, events: list[Event]) -> list[bytes]:
    asyncio.run(job._ingest_batch(events))
    usage = job.settings.topics.usage
    sent, job.sent = job.sent, []  # type: ignore[attr-defined]
    return [value for topic, _, _, value, _ in sent if topic == usage]


def _with_contexts(job: BudgetJob) -> tuple[Any, ...]:
    return (
        *outcome(job),
        {key: ContextGrowth.from_state(v).to_state() for key, v in plain_store(job.contexts).items()},
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stage_one_senders_interleaved_decide_as_per_message_rows_read_once(
    tmp_path_factory: Any, monkeypatch: Any, data: st.DataObject
) -> None:
    """Stage 1 itself (`_ingest_batch`: decoding, pricing, copies, bad messages, context
    observations, `GroupRows`) as several senders whose records interleave: stage 2's totals,
    states, context growth and each key's signals are those of per-message rows read once."""
    now = datetime.now(UTC)
    monkeypatch.setattr(app_module, "_now", lambda: now)
    count, events = _drawn_events(data)
    tmp_path = tmp_path_factory.mktemp("stage-one")
    reference = _job(tmp_path, "reference", STAGE_ONE_CONFIG)
    account(reference, _stage_one(_sender(tmp_path, "alone", events, 0, False), events))
    senders: dict[int, BudgetJob] = {}
    tested = _job(tmp_path, "tested", STAGE_ONE_CONFIG)
    for index, combines, first, end in data.draw(schedules(count), label="deliveries"):
        if index not in senders:
            senders[index] = _sender(tmp_path, f"sender-{index}", events, first, combines)
        records = _stage_one(senders[index], events[first:end])
        steps = [row for record in records for batch in json.loads(record)["batches"] for row in batch[2]]
        event(
            f"combined rows with steps: {any(len(row) == 10 and isinstance(row[-1], list) for row in steps)}"
        )
        account(tested, records)
    assert _with_contexts(tested) == _with_contexts(reference)
    signals = reference.signals  # type: ignore[attr-defined]
    event(f"signals: {min(len(signals), 5)}+, replays: {tested.replayed_deltas > 0}")
    event(f"context guard signals: {any(signal.budget == 'long-context' for signal in signals)}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stage_one_combined_parks_warns_and_counts_as_per_message(
    tmp_path_factory: Any, monkeypatch: Any, data: st.DataObject
) -> None:
    """One sender, cut into micro-batches at random, combining or not: the same dead letters
    (each bad message once, with its reason), unpriced warnings and input counters."""
    now = datetime.now(UTC)
    monkeypatch.setattr(app_module, "_now", lambda: now)
    count, events = _drawn_events(data)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, count - 1), max_size=8), label="cuts")))
    tmp_path = tmp_path_factory.mktemp("parks")
    seen = []
    for combine in (False, True):
        job = _sender(tmp_path, f"sender-{combine}", events, 0, combine)
        for first, end in zip([0, *cuts], [*cuts, count], strict=True):
            asyncio.run(job._ingest_batch(events[first:end]))
        out = [
            (topic, key, value, headers)
            for topic, _, key, value, headers in job.sent
            if topic != job.settings.topics.usage
        ]  # type: ignore[attr-defined]
        unpriced = [
            json.loads(value)["spent"] for topic, _, value, _ in out if topic == job.settings.topics.signals
        ]
        parked = sorted(
            (key, value, tuple(headers))
            for topic, key, value, headers in out
            if topic != job.settings.topics.signals
        )
        seen.append((job.counters(), job.stats, parked, unpriced))
    assert seen[1] == seen[0]
    counters, _, parked, unpriced = seen[0]
    event(f"parked: {len(parked)}, unpriced: {bool(unpriced)}, copies: {counters['duplicate_messages']}")


def _split(job: BudgetJob) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(budgets' totals, states, signals by key; the context guard's growth, states, signals)."""
    totals, states, signals, contexts = _with_contexts(job)

    def guard(key: str) -> bool:
        return key.startswith("long-context|") or key.endswith("@long-context")

    def part(items: dict[str, Any], of_guard: bool) -> dict[str, Any]:
        return {key: value for key, value in items.items() if guard(key) == of_guard}

    budgets = (totals, part(states, False), part(signals, False))
    return budgets, (contexts, part(states, True), part(signals, True))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_two_source_partitions_combine_as_per_message_rows_read_partition_by_partition(
    tmp_path_factory: Any, monkeypatch: Any, data: st.DataObject
) -> None:
    """Exact per source partition (docs/ARCHITECTURE.md §7): a micro-batch of two partitions'
    messages, combined, decides its budgets as its messages per message in another possible
    reading order, each partition's messages of the micro-batch in turn (the one read first,
    first); its context guards (observations go per message) as in the order read."""
    now = datetime.now(UTC)
    monkeypatch.setattr(app_module, "_now", lambda: now)
    count = data.draw(st.integers(8, 40), label="messages")
    seed = data.draw(st.integers(0, 1000), label="seed")
    # no copy nor malformed message: each partition's group opens at its first message (the order below)
    values = [event.value for event in _span_events(seed, count, None, None)]
    partitions = data.draw(st.lists(st.integers(0, 1), min_size=count, max_size=count), label="partitions")
    offsets = [partitions[:index].count(partition) for index, partition in enumerate(partitions)]
    events = [
        Event(Message(p, o, time.time()), v) for p, o, v in zip(partitions, offsets, values, strict=True)
    ]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, count - 1), max_size=6), label="cuts")))
    batches = [events[first:end] for first, end in zip([0, *cuts], [*cuts, count], strict=True)]
    tmp_path = tmp_path_factory.mktemp("partitions")
    outcomes = []
    for name in ("read-order", "partition-by-partition", "combined"):
        sender = _sender(tmp_path, f"sender-{name}", events, 0, name == "combined")
        sender.recent.primed.add(1)
        stage_two = _job(tmp_path, f"stage-two-{name}", STAGE_ONE_CONFIG)
        for batch in batches:
            if name == "partition-by-partition":  # the same messages, one partition after the other
                order = list(dict.fromkeys(event.message.partition for event in batch))
                batch = sorted(batch, key=lambda event: order.index(event.message.partition))
            account(stage_two, _stage_one(sender, batch))
        outcomes.append(_split(stage_two))
    read_order, by_partition, combined = outcomes
    assert combined[0] == by_partition[0]
    assert combined[1] == read_order[1]
