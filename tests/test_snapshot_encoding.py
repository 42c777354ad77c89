"""Budget usage snapshots encoded without the pydantic model: the same key, partition and bytes.

The snapshot timer writes `usage_json` / `usage_kafka_key` (contracts/snapshots.py) instead of
building a `BudgetUsage` per window; these tests hold them to the model's own `to_json` and
`kafka_key`, on generated fields and on the windows a real job snapshots.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.snapshots import BudgetUsage, usage_json, usage_kafka_key
from burnguard.stream.accounting import WindowTotals, window_lengths
from burnguard.stream.app import BudgetJob
from burnguard.stream.partitioner import key_partition, record_partition
from burnguard.stream.policy import window_at
from burnguard.stream.records import DeltaRow
from burnguard.stream.settings import StreamSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import budget, budgets_yaml

WINDOWS = ["day", "week", "month", "24h", "90m", "session", ""]
moments = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(-timedelta(hours=3, minutes=30))]),
)
#: a spend is a float, or the int 0 of a rolling window whose buckets all expired (`Ring.total`)
amounts = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False) | st.integers(
    0, 2**53
)


@settings(max_examples=400, deadline=None)
@given(
    names=st.tuples(st.text(min_size=1), st.text(), st.text(min_size=1), st.text(min_size=1)),
    window=st.sampled_from(WINDOWS),
    bounds=st.tuples(moments, moments, moments),
    spent=amounts,
    limit=st.floats(min_value=1e-9, max_value=1e12),
    spans=st.integers(min_value=0, max_value=2**53),
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


def test_the_timer_writes_the_models_key_partition_and_bytes_for_every_window_kind(job: BudgetJob) -> None:
    now_ns = time.time_ns()
    offset = 0
    for budget_id, spec in job._budgets.items():
        start_ns = spec.window_spec.start_ns(now_ns)
        for n, key in enumerate(["acme", "globex|u-7", "s-ü"]):
            offset += 1
            row = DeltaRow(budget_id, key, start_ns, 0.37 * (n + 1), 1, now_ns, now_ns, 0, None)
            job._apply(row, (0, offset), datetime.now(UTC))
    written: list[tuple[str, int | None, bytes | None, bytes | None]] = []
    job.snapshots.add = lambda topic, partition, key, value, headers=None: written.append(  # type: ignore[method-assign]
        (topic, partition, key, value)
    )
    now = datetime.now(UTC)
    state_keys = [k for k in job.totals.data if k.count("|") >= 2]
    assert len(state_keys) == 12
    for state_key in state_keys:
        snapshot = job._usage_snapshot(state_key, now)
        assert snapshot is not None
        job._add_snapshot(snapshot)
        job._add_snapshot(snapshot)  # the second time, the partition comes from the cache
    expected = [_model_snapshot(job, state_key, now) for state_key in state_keys for _ in range(2)]
    assert [(key, value) for _, _, key, value in written] == [
        (model.kafka_key.encode(), model.to_json()) for model in expected
    ]
    assert [partition for _, partition, _, _ in written] == [
        key_partition(model.kafka_key.encode(), job.settings.partitions) for model in expected
    ]
    assert {topic for topic, _, _, _ in written} == {job.settings.topics.budget_usage}
    assert record_partition.cache_info().hits >= len(state_keys)


def test_a_rolling_window_whose_spend_has_all_expired_writes_the_models_bytes(job: BudgetJob) -> None:
    """Its spend is the sum of no buckets (the int 0): the model writes the float 0.0, so must the timer."""
    rolling = job._budgets["rolling"]
    _, bucket_ns = window_lengths(rolling.window_spec)
    then_ns = time.time_ns() - 3 * 86_400 * 10**9  # spent three days ago: out of the 24h window now
    row = DeltaRow("rolling", "acme|u-1", 0, 0.5, 1, then_ns, then_ns, bucket_ns, None)
    job._apply(row, (0, 1), datetime.now(UTC))
    now = datetime.now(UTC)
    state_key = "rolling|acme|u-1|0"
    assert job._usage_snapshot(state_key, now) == (
        (model := _model_snapshot(job, state_key, now)).kafka_key,
        model.to_json(),
    )
    assert BudgetUsage.from_json(model.to_json()).spent == 0.0
