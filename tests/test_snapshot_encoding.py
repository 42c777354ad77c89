"""Budget usage snapshots encoded without the pydantic model: the same key, partition and bytes.

The snapshot timer writes `usage_json`'s parts / `usage_kafka_key` (contracts/snapshots.py)
instead of building a `BudgetUsage` per window, and remembers what a window's snapshots share;
these tests hold them to the model's own `to_json` and `kafka_key`, on generated fields (odd
floats, big ints, any text, offsets that are not whole minutes) and on the windows a real job
snapshots, first and again from what it remembered. The timer's tests run over both writers of
the amounts (`usage_values_impl`: `usage_value`, the native `UsageValues`), and the differential
tests hold the native one to `usage_value`'s bytes.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.snapshots import (
    BudgetUsage,
    usage_head_parts,
    usage_json,
    usage_kafka_key,
    usage_kafka_key_parts,
    usage_value,
)
from burnguard.contracts.windows import CALENDAR_WINDOWS
from burnguard.stream.accounting import WindowTotals, window_lengths
from burnguard.stream.app import BudgetJob, SnapshotRun
from burnguard.stream.partitioner import key_partition
from burnguard.stream.policy import window_at
from burnguard.stream.records import DeltaRow
from burnguard.stream.settings import StreamSettings
from burnguard.stream.snapshots import _new_usage_values
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from tests.factories import budget, budgets_yaml
from tests.fixtures.decoders import required_native_part

WINDOWS = ["day", "week", "month", "24h", "90m", "session", ""]
#: fixed offsets, also ones that are not whole minutes (pydantic writes them cut to the minute)
OFFSETS = [UTC, timezone(timedelta(hours=9)), timezone(-timedelta(hours=3, minutes=30))]
OFFSETS += [timezone(timedelta(hours=5, minutes=30, seconds=12)), timezone(-timedelta(seconds=1))]
moments = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(OFFSETS) | st.timezones(),
)
#: floats where writers tend to differ: exponents, the switch to them, subnormals, the largest
ODD_FLOATS = [1e16, 9999999999999998.0, 1e-4, 9.999999999999999e-05, 1e-5, 1e-7, 5e-324]
ODD_FLOATS += [2.2250738585072014e-308, 1.7976931348623157e308, 0.1 + 0.2, 1 / 3]
#: a spend is a float, or the int 0 of a rolling window whose buckets all expired (`Ring.total`)
amounts = (
    st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)
    | st.sampled_from(ODD_FLOATS)
    | st.integers(0, 2**53)
)


@settings(max_examples=600, deadline=None)
@given(
    names=st.tuples(st.text(min_size=1), st.text(), st.text(min_size=1), st.text(min_size=1)),
    window=st.sampled_from(WINDOWS),
    bounds=st.tuples(moments, moments, moments),
    spent=amounts,
    limit=st.floats(min_value=1e-9, max_value=1e12) | st.sampled_from(ODD_FLOATS),
    spans=st.integers(min_value=0, max_value=2**53) | st.integers(min_value=2**63, max_value=2**80),
)
def test_the_plain_encoding_is_the_models_byte_for_byte(
    names: tuple[str, str, str, str],
    window: str,
    bounds: tuple[datetime, datetime, datetime],
    spent: float,
    limit: float,
    spans: int,
) -> None:
    budget_id, scope, key, metric = names
    start, end, now = bounds
    model = BudgetUsage(
        budget=budget_id,
        scope=scope,
        key=key,
        metric=metric,
        window=window,
        window_start=start,
        window_end=end,
        spent=spent,
        limit=limit,
        ratio=spent / limit,
        spans=spans,
        updated_at=now,
    )
    fields = (metric, window, start, end, spent, limit, spans, now)
    assert usage_json(budget_id, scope, key, *fields) == model.to_json()
    assert usage_kafka_key(scope, key, budget_id, window, start) == model.kafka_key


def _documented_kafka_key(scope: str, key: str, budget_id: str, window: str, start: datetime) -> str:
    """`BudgetUsage.kafka_key` as its docstring and the module's describe it (written out here:
    the model's property is `usage_kafka_key`, made of the parts under test)."""
    base = f"{scope}:{key}@{budget_id}"
    return base if window and window not in CALENDAR_WINDOWS else f"{base}#{start.isoformat()}"


@settings(max_examples=600, deadline=None)
@given(
    names=st.tuples(st.text(min_size=1), st.text(), st.text(min_size=1), st.text(min_size=1)),
    window=st.sampled_from(WINDOWS),
    start=moments,
)
def test_the_parts_around_a_key_join_to_its_kafka_key_and_json_head(
    names: tuple[str, str, str, str], window: str, start: datetime
) -> None:
    """What a budget's windows with one start share (`usage_kafka_key_parts`, `usage_head_parts`),
    joined around any key as a window's first snapshot joins them: the documented Kafka key, and
    pydantic's JSON of the object up to `window` (the key's string written alone)."""
    budget_id, scope, key, metric = names
    before, after = usage_kafka_key_parts(scope, budget_id, window, start)
    assert before + key + after == _documented_kafka_key(scope, key, budget_id, window, start)
    head_before, head_after = usage_head_parts(budget_id, scope, metric, window)
    fields = {"v": 1, "budget": budget_id, "scope": scope, "key": key, "metric": metric, "window": window}
    assert head_before + to_json(key) + head_after == to_json(fields)[:-1]


BUDGETS = budgets_yaml(
    budget("daily-tokyo", 5.0, window="day", timezone="Asia/Tokyo"),
    budget("weekly", 50.0, window="week", metric="tokens"),
    budget("rolling", 2.0, window="24h", scope=["tenant", "user"]),
    budget("steps", 10.0, window="session", metric="calls", scope="session"),
)


@pytest.fixture
def job(tmp_path: Path) -> BudgetJob:
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"snapshot-{tmp_path.name}")
    return BudgetJob(settings, parse_budget_yaml(BUDGETS))


def _model_snapshot(job: BudgetJob, state_key: str, now: datetime) -> BudgetUsage:
    """What the timer built before: the model, from the same stored totals."""
    budget_id, rest = state_key.split("|", 1)
    key, window_start_ns = rest.rsplit("|", 1)
    budget = job._budgets[budget_id]
    totals = WindowTotals.from_state(job.totals.data[state_key])
    spent, start, end = window_at(budget, int(window_start_ns), totals, now)
    return BudgetUsage.model_construct(
        budget=budget.id,
        scope=budget.scope_name,
        key=key,
        metric=budget.metric,
        window=budget.window,
        window_start=start,
        window_end=end,
        spent=spent,
        limit=budget.limit,
        ratio=spent / budget.limit,
        spans=totals.spans,
        updated_at=now,
    )


@pytest.mark.usefixtures("usage_values_impl")
def test_the_timer_writes_the_models_key_partition_and_bytes_for_every_window_kind(job: BudgetJob) -> None:
    now_ns = time.time_ns()
    offset = 0
    for budget_id, spec in job._budgets.items():
        start_ns = spec.window_spec.start_ns(now_ns)
        for n, key in enumerate(["acme", "globex|u-7", "s-ü", 'q"\\\n\x01\x7f\u2028🙂']):
            offset += 1
            row = DeltaRow(budget_id, key, start_ns, 0.37 * (n + 1), 1, now_ns, now_ns, 0, None)
            job._apply(row, (0, offset), datetime.now(UTC))
    now = datetime.now(UTC)
    state_keys = [k for k in job.totals.data if k.count("|") >= 2]
    assert len(state_keys) == 16
    written = []
    for run in (SnapshotRun(now), SnapshotRun(now)):  # the second from what the first remembered
        for state_key in state_keys:
            snapshot = job._usage_snapshot(state_key, run)
            assert snapshot is not None
            written.append(snapshot)
    expected = [_model_snapshot(job, state_key, now) for _ in range(2) for state_key in state_keys]
    assert [(snapshot.kafka_key, snapshot.value) for snapshot in written] == [
        (model.kafka_key.encode(), model.to_json()) for model in expected
    ]
    assert [snapshot.partition for snapshot in written] == [
        key_partition(model.kafka_key.encode(), job.settings.partitions) for model in expected
    ]
    assert set(job.snapshots._keys) == set(state_keys)
    assert [snapshot.taken for snapshot in written] == sorted({snapshot.taken for snapshot in written})


@pytest.mark.usefixtures("usage_values_impl")
def test_a_rolling_window_whose_spend_has_all_expired_writes_the_models_bytes(job: BudgetJob) -> None:
    """Its spend is the sum of no buckets (the int 0): the model writes the float 0.0, so must the timer."""
    rolling = job._budgets["rolling"]
    _, bucket_ns = window_lengths(rolling.window_spec)
    then_ns = time.time_ns() - 3 * 86_400 * 10**9  # spent three days ago: out of the 24h window now
    row = DeltaRow("rolling", "acme|u-1", 0, 0.5, 1, then_ns, then_ns, bucket_ns, None)
    job._apply(row, (0, 1), datetime.now(UTC))
    now = datetime.now(UTC)
    state_key = "rolling|acme|u-1|0"
    snapshot = job._usage_snapshot(state_key, SnapshotRun(now))
    assert snapshot is not None
    model = _model_snapshot(job, state_key, now)
    assert (snapshot.kafka_key, snapshot.value) == (model.kafka_key.encode(), model.to_json())
    assert BudgetUsage.from_json(model.to_json()).spent == 0.0


# --- the native amounts against the reference --------------------------------------------------

HEAD, BOUNDS, STAMP = b'{"v":1,"budget":"b"', b',"window_start":null', b',"updated_at":"x"}'


def _native_writer(reference: Any = usage_value) -> Any:
    return _new_usage_values(lambda _: required_native_part("UsageValues")(reference))


@settings(max_examples=1500, deadline=None)
@given(
    spent=amounts | st.floats() | st.integers(-(2**70), 2**70),
    limit=st.floats() | st.sampled_from([0.0, -0.0, 0, 3, 2**60]) | st.sampled_from(ODD_FLOATS),
    spans=st.integers(min_value=0, max_value=2**53) | st.integers(min_value=2**63 - 2, max_value=2**80),
)
def test_the_native_amounts_are_the_references_bytes(spent: Any, limit: Any, spans: int) -> None:
    """Any spend, limit and count, also the ones handed to the reference (non-finite, a zero
    limit, ints past 2^53 or 64 bits): `usage_value`'s bytes, or its error."""
    try:
        expected: Any = usage_value(HEAD, BOUNDS, spent, limit, spans, STAMP)
    except Exception as exc:  # a zero limit
        expected = type(exc)
    try:
        written: Any = _native_writer()(HEAD, BOUNDS, spent, limit, spans, STAMP)
    except Exception as exc:
        written = type(exc)
    assert written == expected


@settings(max_examples=500, deadline=None)
@given(spent=amounts, limit=st.floats(min_value=1e-9, max_value=1e12) | st.sampled_from(ODD_FLOATS))
def test_the_native_amounts_are_written_natively(spent: float, limit: float) -> None:
    """A snapshot's usual amounts never reach the reference (a ratio past a float's range does)."""
    assume(math.isfinite(spent / limit))

    def reference(*parts: Any) -> bytes:
        raise AssertionError(f"handed to the reference: {parts!r}")

    spans = 7
    written = _native_writer(reference)(HEAD, BOUNDS, spent, limit, spans, STAMP)
    assert written == usage_value(HEAD, BOUNDS, spent, limit, spans, STAMP)
