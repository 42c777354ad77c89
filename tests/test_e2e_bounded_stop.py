"""A worker's stop is bounded: an agent that never acks its events cannot hold it until SIGKILL.

Faust's stop waits, with no bound, until every message handed to an agent is acked
(`Consumer.wait_empty`). Seen once: a worker expelled while stalled, whose ingest agent had
crashed, hung ~30 s on SIGTERM until the test's SIGKILL. Here an ingest agent stays on one
micro-batch forever (`tests.support.stuck_agent_worker`): the stop must end within
`BURNGUARD_STOP_TIMEOUT_S`, with its own exit status and a log line, and the next worker reads
that micro-batch again, so the totals stay exact.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from burnguard.stream.liveness import EXIT_STOP_OVERRAN

from tests.fixtures.pipeline import Pipeline
from tests.test_e2e_exactly_once import BUDGETS, SpanSource, wait_for_exact_totals

STOP_TIMEOUT_S = 5


@pytest.mark.slow
def test_a_stop_held_by_an_agent_that_never_acks_ends_within_the_bound(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_STOP_TIMEOUT_S=str(STOP_TIMEOUT_S))
    source = SpanSource(pipeline, batches=8, seed=3)
    worker = pipeline.start_worker(module="tests.support.stuck_agent_worker")
    source.send(8, pause_s=0.3)
    pipeline.wait_for_log("worker", "test hook: this micro-batch never finishes", 60, worker)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    try:
        status = worker.wait(STOP_TIMEOUT_S + 20)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the stop was still waiting after {STOP_TIMEOUT_S + 20}s")
    assert status == EXIT_STOP_OVERRAN, pipeline.log("worker")[-3000:]
    assert time.monotonic() - started < STOP_TIMEOUT_S + 10
    assert f"the stop did not finish within {STOP_TIMEOUT_S}s" in pipeline.log("worker")
    pipeline.start_worker()
    wait_for_exact_totals(pipeline, source, timeout_s=60)
