"""A worker whose stage 1 falls behind its fetches pauses and resumes partitions; every span counts once.

Real broker and worker. When stage 1's channel queue passes Faust's pressure mark, the consumer
stops handing over the partition's records (`Consumer.on_buffer_full`) and starts again once the
queue has drained (`on_buffer_drop`). `DirectDelivery` (`stream/fetching.py`) puts stage 1's
events into that queue itself, with the conductor's pressure callbacks; built with the fetch's
partition name (aiokafka's `TopicPartition`, not Faust's `TP`) they crashed the worker at the first
resume (BENCHMARKS.md, "Faust's per-message delivery"), and no other test fills the queue.

The worker (`tests/support/small_queue_worker.py`) has a small stage 1 queue, so each fetch of the
backlog passes the mark, and logs each pause and resume; small fetches make each partition's
backlog many fetches, so its records after a pause are counted only if it was resumed.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.fixtures.pipeline import Pipeline
from tests.support.small_queue_worker import PAUSED, RESUMED
from tests.test_e2e_exactly_once import BUDGETS, SpanSource, expected_totals, latest_usage

BACKLOG_MESSAGES = 2_000
#: Bytes per `otlp_spans` partition per fetch: a partition's share of the backlog (~500 messages
#: of 1-4 spans, ~0.5 MB) takes several fetches.
FETCH_BYTES = 32 << 10
CHANGES = re.compile(rf"({PAUSED}|{RESUMED}) (\S+):(\d+) active=(True|False)")


def wait_for_exact_totals_while_running(
    pipeline: Pipeline, source: SpanSource, worker: subprocess.Popen, timeout_s: float
) -> None:
    """Until the snapshots hold `source`'s sums; failing at once when a total passes its sum (a
    span counted twice) or the worker ends (a crash would otherwise show only as the timeout)."""
    expected, deadline = expected_totals(source), time.monotonic() + timeout_s
    while (seen := {key: usage.spent for key, usage in latest_usage(pipeline).items()}) != expected:
        over = {
            key: (spent, expected.get(key)) for key, spent in seen.items() if spent > expected.get(key, 0)
        }
        assert not over, f"counted twice: {over}"
        log = pipeline.log("worker")
        assert worker.poll() is None, f"the worker ended ({worker.returncode}):\n{log[-4000:]}"
        assert time.monotonic() < deadline, f"totals never became exact: {seen} != {expected}\n{log[-4000:]}"
        time.sleep(0.5)


def pauses_and_resumes(log: str, topic: str) -> list[tuple[str, int, bool]]:
    """(what, partition, active after it) per logged change of `topic`'s partitions, in order."""
    return [
        (what, int(partition), active == "True")
        for what, logged_topic, partition, active in CHANGES.findall(log)
        if logged_topic == topic
    ]


@pytest.mark.slow
def test_partitions_paused_by_a_full_stage_1_queue_resume_and_every_span_counts_once(
    pipeline: Pipeline,
) -> None:
    pipeline.write_budgets(BUDGETS)
    source = SpanSource(pipeline, batches=BACKLOG_MESSAGES, seed=43)
    source.send(BACKLOG_MESSAGES, pause_s=0.0)  # a backlog before the worker starts
    worker = pipeline.start_worker(
        module="tests.support.small_queue_worker",
        env={"BURNGUARD_FETCH_SPANS_PARTITION_BYTES": str(FETCH_BYTES)},
    )
    wait_for_exact_totals_while_running(pipeline, source, worker, timeout_s=60)
    log = pipeline.log("worker")
    assert "Traceback" not in log, log[-4000:]
    changes = pauses_and_resumes(log, pipeline.topics.spans)
    paused = [(partition, active) for what, partition, active in changes if what == PAUSED]
    resumed = [(partition, active) for what, partition, active in changes if what == RESUMED]
    assert paused and resumed, f"no pause and resume of {pipeline.topics.spans}:\n{log[-4000:]}"
    # a paused partition's records are no longer handed over; a resumed one's are again
    assert not any(active for _, active in paused) and all(active for _, active in resumed)
    # every partition paused was resumed after its last pause, else its backlog would wait yet
    last = {partition: what for what, partition, _ in changes}
    assert set(last.values()) == {RESUMED}, last
