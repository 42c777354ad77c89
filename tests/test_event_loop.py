"""The worker's event loop: uvloop by default, asyncio's own by choice, either counting exactly."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import pytest
from burnguard.stream.event_loop import loop_kind, use_event_loop
from burnguard.stream.settings import StreamSettings

from tests.fixtures.pipeline import Pipeline
from tests.test_e2e_exactly_once import BUDGETS, SpanSource, wait_for_exact_totals


@pytest.fixture
def default_policy_after() -> Iterator[None]:
    yield
    asyncio.set_event_loop_policy(None)


def loop_made_on_a_thread() -> str:
    """The kind of a loop made on another thread, as Faust's consumer thread makes its own."""
    kinds: list[str] = []

    def make() -> None:
        loop = asyncio.new_event_loop()
        kinds.append(loop_kind(loop))
        loop.close()

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    return kinds[0]


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BURNGUARD_EVENT_LOOP", raising=False)
    assert StreamSettings.from_env().event_loop == "uvloop"


@pytest.mark.parametrize("value, kind", [("asyncio", "asyncio"), (" UVLOOP ", "uvloop")])
def test_the_environment_chooses_the_loop(monkeypatch: pytest.MonkeyPatch, value: str, kind: str) -> None:
    monkeypatch.setenv("BURNGUARD_EVENT_LOOP", value)
    assert StreamSettings.from_env().event_loop == kind


def test_an_unknown_loop_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURNGUARD_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match=r"BURNGUARD_EVENT_LOOP must be one of uvloop, asyncio, not 'trio'"):
        StreamSettings.from_env()


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_every_loop_made_afterwards_is_of_the_chosen_kind(default_policy_after: None, kind: str) -> None:
    assert use_event_loop(kind) == kind
    loop = asyncio.new_event_loop()
    try:
        assert loop_kind(loop) == kind
    finally:
        loop.close()
    assert loop_made_on_a_thread() == kind


def test_without_uvloop_installed_the_worker_runs_on_asyncio_and_says_so(
    default_policy_after: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert use_event_loop("uvloop") == "asyncio"
    assert "uvloop is not installed" in caplog.text
    assert loop_made_on_a_thread() == "asyncio"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_the_worker_counts_exactly_on_either_loop(pipeline: Pipeline, kind: str) -> None:
    pipeline.write_budgets(BUDGETS)
    source = SpanSource(pipeline, batches=60, seed=11)
    pipeline.start_worker(env={"BURNGUARD_EVENT_LOOP": kind})
    source.send(60)
    wait_for_exact_totals(pipeline, source)
    assert f"event loop: {kind}" in pipeline.log("worker")
