"""The worker's signal log: one DEBUG line per signal, one INFO summary per snapshot run, by action.

In process, on a `BudgetJob` that is built but not started (no broker needed); the signals go to
a list instead of the producer, and the log records are the job's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream import app as app_module
from burnguard.stream.app import BudgetJob
from burnguard.stream.records import BatchRecord, batches_record
from burnguard.stream.settings import StreamSettings

from tests.factories import budgets_yaml, tenant_cost


@pytest.fixture
def job(tmp_path: Path) -> BudgetJob:
    settings = StreamSettings(data_dir=tmp_path / "stream", app_id=f"signal-log-{tmp_path.name}")
    return BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1))))


def _overspend(job: BudgetJob, tenants: list[str]) -> list[tuple[str, bytes | None]]:
    """Each tenant spends twice its limit in one stage-1 record; the signals the job published."""
    published: list[tuple[str, bytes | None]] = []

    def publish_at_once(key: bytes, value: bytes | None) -> bool:
        published.append((key.decode(), value))
        return True

    job.signal_records.publish_at_once = publish_at_once  # type: ignore[method-assign]
    now_ns = time.time_ns()
    window_ns = job._budgets["tenant-cost"].window_spec.start_ns(now_ns)
    rows = [["tenant-cost", tenant, window_ns, 2.0, 1, now_ns, now_ns, 0] for tenant in tenants]
    record = json.loads(json.dumps(batches_record([BatchRecord(0, 5, rows, [])])))
    asyncio.run(job._account_one(record))
    return published


def test_each_signal_is_a_debug_line_and_the_snapshot_run_logs_one_info_summary(
    job: BudgetJob, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=app_module.__name__)
    published = _overspend(job, ["acme", "globex", "initech"])
    assert len(published) == 3
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("signal ")]
    assert [level for level, _ in lines] == [logging.DEBUG] * 3
    assert [message.split(" -> ")[0] for _, message in lines] == [f"signal {key}" for key, _ in published]
    action = json.loads(published[0][1] or b"{}")["action"]
    assert all(f"-> {action} (" in message for _, message in lines)

    caplog.clear()
    job._log_signals()
    job._log_signals()  # nothing new since: no second line
    summaries = [r for r in caplog.records if r.getMessage().startswith("signals published")]
    assert [r.levelno for r in summaries] == [logging.INFO]
    assert summaries[0].getMessage() == f"signals published: {action} 3 (latest {published[-1][0]})"


def test_at_info_no_signal_line_is_formatted(job: BudgetJob, caplog: pytest.LogCaptureFixture) -> None:
    """The point of the change: at the default level a signal costs no log record at all."""
    caplog.set_level(logging.INFO, logger=app_module.__name__)
    assert len(_overspend(job, ["acme", "globex"])) == 2
    assert not [r for r in caplog.records if r.getMessage().startswith("signal ")]
    job._log_signals()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["signals published"]


@pytest.fixture
def started_levels(job: BudgetJob, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The log level of each worker `run_worker` starts (a stand-in for its `BoundedStopWorker`, on `job`).

    A real worker here would run in the test's own process, and its stop deadline or liveness
    watchdog could end that process.
    """
    started: list[str] = []

    class Worker:
        def __init__(self, app: object, *, stop_timeout_s: float, loglevel: str, quiet: bool) -> None:
            started.append(loglevel)

        def execute_from_commandline(self) -> None:
            return None

    monkeypatch.setattr(app_module, "BoundedStopWorker", Worker)
    monkeypatch.setattr(app_module, "create_job", lambda settings: job)
    monkeypatch.setattr(app_module, "freeze_startup_heap", lambda: None)
    monkeypatch.setattr(app_module, "tune_gc", lambda: None)
    return started


def test_the_worker_log_level_comes_from_the_environment(
    started_levels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`BURNGUARD_LOG_LEVEL=debug` (as the sink reads it) brings the per-signal lines back."""
    monkeypatch.setenv("BURNGUARD_LOG_LEVEL", "DEBUG")
    app_module.run_worker()
    monkeypatch.delenv("BURNGUARD_LOG_LEVEL")
    app_module.run_worker()
    assert started_levels == ["debug", "info"]


def test_a_clean_stop_logs_the_signals_since_the_last_summary(
    job: BudgetJob, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def nothing_to_write(flushed: bool = False) -> None:
        raise RuntimeError("no broker in this test")

    caplog.set_level(logging.INFO, logger=app_module.__name__)
    published = _overspend(job, ["acme"])
    monkeypatch.setattr(job, "_write_changes", nothing_to_write)
    asyncio.run(job._on_shutdown(job.app))
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("signals published")]
    assert len(summaries) == 1 and f"(latest {published[0][0]})" in summaries[0]


@pytest.mark.parametrize("value", ["verbose", "10", "dbg"])
def test_a_bad_worker_log_level_is_refused_naming_the_variable(
    started_levels: list[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Not mode's "Unable to configure handler 'default'" once the worker starts, with no hint of why."""
    monkeypatch.setenv("BURNGUARD_LOG_LEVEL", value)
    with pytest.raises(ValueError, match=f"BURNGUARD_LOG_LEVEL .*{value!r}"):
        app_module.run_worker()
    assert started_levels == []
    monkeypatch.setenv("BURNGUARD_LOG_LEVEL", " ")  # blank: the default, as for the numbers
    app_module.run_worker()
    assert started_levels == ["info"]


@pytest.mark.parametrize("value", ["verbose", "10"])
def test_a_bad_sink_log_level_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """The sink reads the same variable through the same check, before it connects to anything."""
    from burnguard.sinks import __main__ as sink_main

    monkeypatch.setenv("BURNGUARD_LOG_LEVEL", value)
    with pytest.raises(ValueError, match=f"BURNGUARD_LOG_LEVEL .*{value!r}"):
        sink_main.main([])
