"""A stage-1 micro-batch whose send fails is read again before anything after it counts.

`_ingest_batch` raises when the producer refuses its records (`KafkaTimeoutError` once aiokafka's
buffer stays full past the request timeout): Faust restarts the agent, which goes on with the
records after the failed micro-batch. Stage 2's replay marks (`WindowTotals.add`) keep per key the
highest source offset applied, so once a later message of the same key has counted, the failed
micro-batch's messages read later are taken as replays: lost. Real broker, real worker process
(`tests.support.failing_send_worker`: its third micro-batch's send fails once), exact totals.
The same holds when combining a micro-batch's rows raises (`BudgetJob._close_groups`): they
exist nowhere else, and the agent's restart would ack the micro-batch unsent.
"""

from __future__ import annotations

import pytest

from tests.fixtures.pipeline import Pipeline
from tests.test_e2e_exactly_once import BUDGETS, SpanSource, wait_for_exact_totals


@pytest.mark.slow
def test_a_micro_batch_whose_send_failed_is_read_again_before_later_messages_count(
    pipeline: Pipeline,
) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="5", BURNGUARD_SESSION_TIMEOUT_S="8")
    source = SpanSource(pipeline, batches=150, seed=5)
    pipeline.start_worker(module="tests.support.failing_send_worker")
    source.send(150)
    wait_for_exact_totals(pipeline, source, timeout_s=90)
    assert "test hook: this micro-batch's send fails" in pipeline.log("worker"), "no send failed"


@pytest.mark.slow
def test_a_micro_batch_whose_rows_could_not_be_combined_is_read_again(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="5", BURNGUARD_SESSION_TIMEOUT_S="8", FAIL_COMBINE_AT="3")
    source = SpanSource(pipeline, batches=150, seed=5)
    pipeline.start_worker(module="tests.support.failing_send_worker")
    source.send(150)
    wait_for_exact_totals(pipeline, source, timeout_s=90)
    assert "test hook: this group's rows fail" in pipeline.log("worker"), "no group failed"
    assert "could not combine the micro-batch's rows: it is read again" in pipeline.log("worker")
