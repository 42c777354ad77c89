"""A stage-1 micro-batch whose send fails is read again before anything after it counts.

`_ingest_batch` raises when the producer refuses its records (`KafkaTimeoutError` once aiokafka's
buffer stays full past the request timeout): Faust restarts the agent, which goes on with the
records after the failed micro-batch. Stage 2's replay marks (`WindowTotals.add`) keep per key the
highest source offset applied, so once a later message of the same key has counted, the failed
micro-batch's messages read later are taken as replays: lost. Real broker, real worker process
(`tests.support.failing_send_worker`: its third micro-batch's send fails once), exact totals.
The same holds when combining a micro-batch's rows raises (`BudgetJob._close_groups`): they
exist nowhere else, and the agent's restart would ack the micro-batch unsent; and when the broker
refuses a micro-batch's record after the hand-over (`stream/deliveries.py`).
"""

from __future__ import annotations

import pytest
from burnguard.stream.changelog import MAX_BATCH_BYTES
from burnguard.stream.settings import StreamSettings

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


#: The usage topic's `max.message.bytes` in the refusal test: above any record batch the worker
#: builds (`MAX_BATCH_BYTES`), below the hook's padded record (and the producer's request limit).
USAGE_REFUSED_ABOVE = MAX_BATCH_BYTES + 64 * 1024
REFUSED_PAD = USAGE_REFUSED_ABOVE + 64 * 1024


@pytest.mark.slow
def test_a_micro_batch_the_broker_refused_after_the_hand_over_is_read_again(pipeline: Pipeline) -> None:
    """The broker refuses a usage record (too large for the topic): only its delivery future says so,
    the producer's flush before Faust's commit does not. Before, the micro-batch was committed and
    its spans lost; now the commit waits for the delivery, and the refused micro-batch is read again
    before anything after it is sent."""
    pipeline.write_budgets(BUDGETS)
    pipeline.broker.create_topic(
        pipeline.topics.usage,
        partitions=StreamSettings.partitions,
        config={"max.message.bytes": str(USAGE_REFUSED_ABOVE)},
    )
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="1", REFUSE_AT="3", REFUSED_PAD=str(REFUSED_PAD))
    source = SpanSource(pipeline, batches=150, seed=7)
    worker = pipeline.start_worker(module="tests.support.failing_send_worker")
    source.send(150)
    wait_for_exact_totals(pipeline, source, timeout_s=90)
    pipeline.wait_for_log("worker", '"usage_records_refused": 1', 30, worker)  # the snapshot timer's log
    log = pipeline.log("worker")
    assert "test hook: this micro-batch's records are refused" in log, "no record was padded"
    assert "the broker refused 1 of a micro-batch's" in log, log[-3000:]
