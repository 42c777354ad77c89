"""What a refresh round publishes again: a throttle only when due, every other restriction as before.

In process, on a `BudgetJob` that is built but not started (no broker needed): the clock is the
test's, a round's ticks go to stage 2 at once (as the usage topic would hand them over), and the
signals go to a list instead of the producer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from burnguard.contracts.signals import Signal
from burnguard.stream import app as app_module
from burnguard.stream.app import BudgetJob
from burnguard.stream.changelog import plain_store
from burnguard.stream.partitioner import usage_partition
from burnguard.stream.records import TICKS, BatchRecord, batches_record, keys_record
from burnguard.stream.settings import StreamSettings

from tests.factories import budget, budget_config, tenant_cost

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")

NOON = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=120)  # the defaults: a round every 30 s, a throttle renewed within 90 s of its expiry
WARN_THEN_THROTTLE = ({"at": 0.5, "do": "warn"}, {"at": 1.0, "do": "throttle"})


@dataclass
class Worker:
    """A job on the test's clock, with the signals it published (None: a tombstone) and the ticks it sent."""

    job: BudgetJob
    now: datetime = NOON
    published: list[Signal | None] = field(default_factory=list)
    sent: list[tuple[str, list[Any]]] = field(default_factory=list)
    offset: int = 0  # of the last stage-1 record, on source partition 0

    def spend(self, budget_id: str, key: str, amount: float, event: datetime | None = None) -> None:
        """One stage-1 record with one row: `amount` on the key, its span ended at `event` (now)."""
        event_ns = int((event or self.now).timestamp() * 1e9)
        window = self.job._budgets[budget_id].window_spec
        row = [budget_id, key, window.start_ns(event_ns), amount, 1, event_ns, event_ns, window.bucket_ns]
        self.offset += 1
        record = batches_record([BatchRecord(0, self.offset, [row], [])])
        asyncio.run(self.job._account_one(json.loads(json.dumps(record))))

    def round(self, at: datetime) -> list[str]:
        """A refresh round at `at`, its ticks accounted at once; the keys it ticked."""
        self.now = at
        self.sent.clear()
        asyncio.run(self.job._refresh())
        return self.deliver()

    def deliver(self) -> list[str]:
        """Stage 2 takes the ticks sent since the last delivery; their `budget|key`s."""
        ticked = [key for key, _ in self.sent]
        if ticked:
            record = keys_record(TICKS, [row for _, row in self.sent])
            asyncio.run(self.job._account_one(json.loads(json.dumps(record))))
        self.sent.clear()
        return ticked

    def signals(self) -> list[Signal | None]:
        """The signals published since the last call (None: a tombstone)."""
        taken = list(self.published)
        self.published.clear()
        return taken


def worker_of(job: BudgetJob, monkeypatch: pytest.MonkeyPatch) -> Worker:
    worker = Worker(job)
    monkeypatch.setattr(app_module, "_now", lambda: worker.now)

    def publish_at_once(key: bytes, value: bytes | None) -> bool:
        worker.published.append(Signal.from_json(value) if value else None)
        return True

    async def send_per_partition(kind: str, items: Any) -> None:
        if kind == TICKS:
            worker.sent.extend(items)

    monkeypatch.setattr(job.signal_records, "publish_at_once", publish_at_once)
    monkeypatch.setattr(job, "_send_per_partition", send_per_partition)
    return worker


@pytest.fixture
def new_job(tmp_path: Path) -> Callable[[], BudgetJob]:
    """A fresh job (a start): a daily throttle, a daily warn-then-throttle, an hourly rolling throttle."""
    config = budget_config(
        tenant_cost(1),
        budget("tenant-warned", 10, window="day", actions=WARN_THEN_THROTTLE),
        budget("user-hourly", 1, scope="user", window="1h"),
    )
    made = iter(range(100))

    def make() -> BudgetJob:
        name = f"refresh-{tmp_path.name}-{next(made)}"
        return BudgetJob(StreamSettings(data_dir=tmp_path / name, app_id=name), config)

    return make


@pytest.fixture
def worker(new_job: Callable[[], BudgetJob], monkeypatch: pytest.MonkeyPatch) -> Worker:
    return worker_of(new_job(), monkeypatch)


def actions(signals: list[Signal | None]) -> list[str | None]:
    return [signal.action if signal else None for signal in signals]


def test_a_fresh_throttle_waits_and_one_near_expiry_is_renewed(worker: Worker) -> None:
    """Published at noon, it expires at 12:02: rounds up to 12:00:30 leave it (three intervals or
    more left), the first after renews it, and the rounds after that leave the renewal."""
    worker.spend("tenant-cost", "acme", 2.0)
    [throttle] = worker.signals()
    assert throttle and throttle.action == "throttle" and throttle.expires_at == NOON + TTL
    for seconds in (1, 15, 30):
        assert worker.round(NOON + timedelta(seconds=seconds)) == []
    assert worker.signals() == []
    assert worker.round(NOON + timedelta(seconds=31)) == ["tenant-cost|acme"]
    [renewed] = worker.signals()
    assert renewed and renewed.action == "throttle" and renewed.expires_at == NOON + timedelta(seconds=151)
    assert worker.round(NOON + timedelta(seconds=61)) == []
    assert worker.round(NOON + timedelta(seconds=62)) == ["tenant-cost|acme"]
    assert actions(worker.signals()) == ["throttle"]


def test_a_warn_is_renewed_every_round(worker: Worker) -> None:
    """Its `spent` is the guards' local-accounting baseline: each round brings it up to date, as before."""
    worker.spend("tenant-warned", "acme", 6.0)
    assert actions(worker.signals()) == ["warn"]
    for seconds in (1, 31):
        assert worker.round(NOON + timedelta(seconds=seconds)) == ["tenant-warned|acme"]
        assert actions(worker.signals()) == ["warn"]


def test_a_roll_over_is_lifted_at_the_next_round(worker: Worker) -> None:
    worker.now = datetime(2026, 12, 3, 23, 59, 50, tzinfo=UTC)
    worker.spend("tenant-cost", "acme", 2.0)
    assert actions(worker.signals()) == ["throttle"]
    assert worker.round(datetime(2026, 12, 4, 0, 0, 5, tzinfo=UTC)) == ["tenant-cost|acme"]
    [lifted] = worker.signals()
    assert lifted and lifted.action == "ok" and lifted.window_start == datetime(2026, 12, 4, tzinfo=UTC)


def test_a_throttle_that_carries_on_into_the_next_window_is_published_for_it_at_the_next_round(
    worker: Worker,
) -> None:
    """The new window's first spend throttles again: the same action, so the delta publishes
    nothing, and the guards ignore the signal of the ended window. The next round publishes it."""
    worker.now = datetime(2026, 12, 3, 23, 59, 50, tzinfo=UTC)
    worker.spend("tenant-cost", "acme", 2.0)
    worker.now = datetime(2026, 12, 4, 0, 0, 1, tzinfo=UTC)
    worker.spend("tenant-cost", "acme", 3.0)
    assert actions(worker.signals()) == ["throttle"]
    assert worker.round(datetime(2026, 12, 4, 0, 0, 5, tzinfo=UTC)) == ["tenant-cost|acme"]
    [carried] = worker.signals()
    assert (
        carried and carried.action == "throttle" and carried.window_start == datetime(2026, 12, 4, tzinfo=UTC)
    )
    assert carried.spent == 3.0


def test_a_rolling_window_is_re_decided_each_round_and_lifted_when_its_spend_slides_out(
    worker: Worker,
) -> None:
    """An hourly window in minute buckets: the spend of 12:00:01 counts until 13:01:00."""
    worker.now = NOON + timedelta(hours=1, seconds=50)
    worker.spend("user-hourly", "ann", 2.0, event=NOON + timedelta(seconds=1))
    assert actions(worker.signals()) == ["throttle"]
    assert worker.round(worker.now + timedelta(seconds=5)) == ["user-hourly|ann"]
    assert worker.signals() == []  # re-decided: still a throttle, not due
    assert worker.round(worker.now + timedelta(seconds=10)) == ["user-hourly|ann"]
    assert actions(worker.signals()) == ["ok"]


def test_an_ok_is_retired_once_expired_and_its_key_forgotten(worker: Worker) -> None:
    worker.now = datetime(2026, 12, 3, 23, 59, 50, tzinfo=UTC)
    worker.spend("tenant-cost", "acme", 2.0)
    midnight = datetime(2026, 12, 4, 0, 0, 5, tzinfo=UTC)
    worker.round(midnight)
    assert actions(worker.signals()) == ["throttle", "ok"]
    assert worker.round(midnight + TTL - timedelta(seconds=1)) == []
    assert worker.round(midnight + TTL) == ["tenant-cost|acme"]
    assert worker.signals() == [None]
    assert "tenant-cost|acme" not in plain_store(worker.job.states)
    assert worker.job._throttles_expire == {}


def test_after_a_restart_every_throttle_is_renewed_once(
    worker: Worker, new_job: Callable[[], BudgetJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker.spend("tenant-cost", "acme", 2.0)
    worker.spend("tenant-cost", "globex", 2.0)
    successor = worker_of(new_job(), monkeypatch)  # recovers the tables, knows none of the publications
    for table in ("states", "totals"):
        plain_store(getattr(successor.job, table)).update(plain_store(getattr(worker.job, table)))
    assert sorted(successor.round(NOON + timedelta(seconds=1))) == ["tenant-cost|acme", "tenant-cost|globex"]
    assert actions(successor.signals()) == ["throttle", "throttle"]
    assert successor.round(NOON + timedelta(seconds=31)) == []


def test_after_a_rebalance_or_a_signal_given_up_every_throttle_is_renewed_once(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker.spend("tenant-cost", "acme", 2.0)
    assert worker.round(NOON + timedelta(seconds=1)) == []
    monkeypatch.setattr(worker.job.app.consumer, "assignment", lambda: set())
    asyncio.run(worker.job._on_rebalance_complete(worker.job.app))
    assert worker.round(NOON + timedelta(seconds=2)) == ["tenant-cost|acme"]
    assert worker.round(NOON + timedelta(seconds=3)) == []
    worker.job.signal_records.given_up += 1  # of any key: the round cannot tell which
    assert worker.round(NOON + timedelta(seconds=4)) == ["tenant-cost|acme"]
    assert worker.round(NOON + timedelta(seconds=5)) == []


def test_a_changed_budget_publishes_its_throttles_again_at_once(worker: Worker) -> None:
    """Its keys' signals carry the new limit, however fresh the last one was."""
    worker.spend("tenant-cost", "acme", 2.0)
    worker.signals()
    new = budget_config(
        tenant_cost(1.5),
        budget("tenant-warned", 10, window="day", actions=WARN_THEN_THROTTLE),
        budget("user-hourly", 1, scope="user", window="1h"),
    )
    worker.job.feed = SimpleNamespace(take_update=lambda: new)  # type: ignore[assignment]
    worker.now = NOON + timedelta(seconds=1)
    asyncio.run(worker.job._reload_budgets())
    assert worker.deliver() == ["tenant-cost|acme"]
    [renewed] = worker.signals()
    assert renewed and renewed.action == "throttle" and renewed.limit == 1.5


def test_an_evicted_key_is_forgotten(worker: Worker) -> None:
    worker.spend("tenant-cost", "acme", 2.0)
    assert "tenant-cost|acme" in worker.job._throttles_expire
    partition = usage_partition("tenant-cost|acme", worker.job.settings.partitions)
    asyncio.run(worker.job._evict_states(partition, set(), set()))
    assert worker.job._throttles_expire == {}
