"""What the `signal-states` table writes: a state change, not a refresh that leaves it as it was.

In process, on a `BudgetJob` that is built but not started (no broker needed).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.stream.app import BudgetJob
from burnguard.stream.changelog import plain_store
from burnguard.stream.records import DeltaRow
from burnguard.stream.settings import StreamSettings

from tests.factories import budgets_yaml, tenant_cost

#: Stage 2's rows added by the Python reference and by the native `TotalsRows` (tests/fixtures/decoders.py).
pytestmark = pytest.mark.usefixtures("totals_rows_impl")


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BudgetJob:
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"signal-states-{tmp_path.name}")
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1))))
    job.sent = []  # type: ignore[attr-defined]

    async def collect(signal: Signal) -> None:
        job.sent.append(signal)  # type: ignore[attr-defined]

    monkeypatch.setattr(job, "_send_signal", collect)
    return job


def state_records(job: BudgetJob) -> list[tuple[bytes, Any]]:
    """The pending changelog records of `signal-states`, taken."""
    topic = job.states.changelog_topic.get_topic_name()
    return [(key, value) for name, _, key, value in job.changes.take_records() if name == topic]


def test_a_refresh_publishes_the_signal_again_but_writes_no_state_record(job: BudgetJob) -> None:
    """The refresh's state is the one already stored (same action, same window): at wire speed a
    third of the signals were refreshes, each with a changelog record that repeated the last."""
    now = datetime.now(UTC)
    start_ns = job._budgets["tenant-cost"].window_spec.start_ns(int(now.timestamp() * 1e9))
    now_ns = int(now.timestamp() * 1e9)
    row = DeltaRow("tenant-cost", "acme", start_ns, 2.0, 1, now_ns, now_ns, 0, None)
    signal = job._apply(row, (0, 1), now)
    assert signal is not None and signal.action == "throttle"
    assert len(state_records(job)) == 1

    asyncio.run(job._settle(job._budgets["tenant-cost"], "acme", now))
    assert [signal.action for signal in job.sent] == ["throttle"]  # type: ignore[attr-defined]
    assert state_records(job) == []
    assert plain_store(job.states)["tenant-cost|acme"] == {"action": "throttle", "window_start_ns": start_ns}
