"""The worker's consumer asks the broker for a short fetch wait and the configured fetch size."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream import fetching
from burnguard.stream.app import BudgetJob
from burnguard.stream.settings import StreamSettings

from tests.factories import budgets_yaml, tenant_cost


def _worker_consumer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = StreamSettings.from_env()
    settings.data_dir = tmp_path / "stream"
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1.0))))
    thread = job.app.consumer._thread

    async def create() -> Any:
        # The aiokafka consumer Faust's thread creates at start (constructed only: no broker needed).
        return thread._create_worker_consumer(job.app.transport)

    return asyncio.run(create())


def test_defaults_replace_fausts_fetch_wait(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    consumer = _worker_consumer(monkeypatch, tmp_path, {})
    assert consumer._fetch_max_wait_ms == 20  # Faust's own is 1,500 ms
    assert consumer._max_partition_fetch_bytes == StreamSettings.fetch_partition_bytes


def test_environment_sets_wait_and_fetch_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"BURNGUARD_FETCH_MAX_WAIT_MS": "35", "BURNGUARD_FETCH_PARTITION_BYTES": str(3 << 20)}
    consumer = _worker_consumer(monkeypatch, tmp_path, env)
    assert consumer._fetch_max_wait_ms == 35
    assert consumer._max_partition_fetch_bytes == 3 << 20


@pytest.mark.parametrize("wait_ms", [0, -5, 1501])
def test_out_of_range_wait_is_refused(wait_ms: int) -> None:
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        fetching.FetchWaitTransport([], None, fetch_max_wait_ms=wait_ms)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "0"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "-5"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "nan"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "1501"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "soon"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "0"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "-1"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "1.5"),
    ],
)
def test_bad_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        StreamSettings.from_env()


def test_an_aiokafka_without_the_wait_attribute_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The wait is a private attribute of aiokafka's consumer: if it is renamed, the worker says so."""

    def without_wait(self: Any, transport: Any) -> object:
        return object()

    monkeypatch.setattr(fetching.driver.AIOKafkaConsumerThread, "_create_worker_consumer", without_wait)
    with pytest.raises(RuntimeError, match="_fetch_max_wait_ms"):
        _worker_consumer(monkeypatch, tmp_path, {})
