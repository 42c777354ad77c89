"""Every span counted exactly once: across SIGKILL of a worker, and across a rebalance between two.

A producer sends a known set of OTLP batches while workers are killed and
started; at the end, the budget usage snapshots must equal the known sums —
no loss, no double count. The workers commit rarely (every 5 s), so a killed
worker always leaves processed-but-uncommitted messages that its successor
replays: the dedupe by source offset is what keeps the totals exact.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest
from burnguard.contracts.snapshots import BudgetUsage
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from tests.factories import budget, budgets_yaml, tenant_tokens
from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

BUDGETS = budgets_yaml(
    tenant_tokens(1.0e12),
    budget("feature-calls", 1.0e12, scope=["tenant", "feature"], window="month", metric="calls"),
)
REPLAYS_LOGGED = re.compile(r"(\d+) replayed deltas recognised")
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]
FEATURES = ["chat", "search"]


#: (n, event): a sender waits for the event after its first n batches.
Hold = tuple[int, threading.Event]


class SpanSource:
    """Sends `batches` OTLP messages of 1-4 spans each, remembering the expected sums."""

    def __init__(self, pipeline: Pipeline, batches: int, seed: int) -> None:
        self.pipeline = pipeline
        self.random = random.Random(seed)
        self.batches = batches
        self.tokens: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.sent = 0
        self.producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")

    def send(self, count: int, pause_s: float = 0.01, hold: Hold | None = None) -> None:
        """Send `count` batches `pause_s` apart, waiting as `hold` says."""
        for index in range(count):
            if hold is not None and index == hold[0]:
                hold[1].wait()
            tenant = self.random.choice(TENANTS)
            spans = []
            for _ in range(self.random.randint(1, 4)):
                feature = self.random.choice(FEATURES)
                tokens_in, tokens_out = self.random.randint(1, 5000), self.random.randint(1, 800)
                spans.append((feature, tokens_in, tokens_out))
                self.tokens[tenant] += tokens_in + tokens_out
                self.calls[f"{tenant}/{feature}"] += 1
            payload = otlp_batch(tenant, spans)
            self.producer.send(self.pipeline.topics.spans, key=tenant.encode(), value=payload)
            self.sent += 1
            time.sleep(pause_s)
        self.producer.flush()

    def send_in_background(self, count: int, hold: Hold | None = None) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(count,), kwargs={"hold": hold}, daemon=True)
        thread.start()
        return thread


def wait_for_deltas(pipeline: Pipeline, timeout_s: float = 60) -> None:
    """Until the usage topic holds deltas: the worker has counted spans (read and written out)."""
    consumer = KafkaConsumer(bootstrap_servers=pipeline.broker.bootstrap)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(pipeline.topics.usage) or set()
            assigned = [TopicPartition(pipeline.topics.usage, partition) for partition in partitions]
            if assigned and sum(consumer.end_offsets(assigned).values()) > 0:
                return
            time.sleep(0.1)
    finally:
        consumer.close()
    raise AssertionError(f"no usage deltas within {timeout_s}s:\n{takeovers(pipeline)}")


def latest_usage(pipeline: Pipeline) -> dict[str, BudgetUsage]:
    return {f"{usage.budget}:{usage.key}": usage for _, usage in pipeline.usage_snapshots()}


def expected_totals(source: SpanSource) -> dict[str, float]:
    expected = {f"tenant-tokens:{t}": float(n) for t, n in source.tokens.items()}
    expected.update({f"feature-calls:{k}": float(n) for k, n in source.calls.items()})
    return expected


def wait_for_exact_totals(pipeline: Pipeline, source: SpanSource, timeout_s: float = 120) -> None:
    expected = expected_totals(source)
    deadline = time.monotonic() + timeout_s
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = {key: usage.spent for key, usage in latest_usage(pipeline).items()}
        if seen == expected:
            return
        over = {k: (v, expected.get(k)) for k, v in seen.items() if v > expected.get(k, 0)}
        assert not over, f"counted twice: {over}"
        time.sleep(1)
    missing = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
    raise AssertionError(
        f"totals never became exact (seen, expected): {missing}\nworkers' takeovers:\n{takeovers(pipeline)}"
    )


def takeovers(pipeline: Pipeline) -> str:
    """The worker log's lines about takeovers, rewinds, skips and stalls: what a failure is read from."""
    wanted = re.compile(r"Ready|rewound|got offset|could not (seek|rewind)|deleted \(retention\)|liveness:")
    return "\n".join(line for line in pipeline.log("worker").splitlines() if wanted.search(line))


def with_slow_commits(pipeline: Pipeline, combine: str = "true") -> Pipeline:
    """Commits seconds apart (much uncommitted progress to lose or count twice), combining as given."""
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="5", BURNGUARD_SESSION_TIMEOUT_S="8")
    pipeline.env["BURNGUARD_COMBINE_MESSAGES"] = combine
    return pipeline


@pytest.fixture(params=["false", "true"], ids=["alone", "combined"])
def slow_commits(pipeline: Pipeline, request: pytest.FixtureRequest) -> Pipeline:
    """Each message's rows alone (the rolling-upgrade switch), and summed per key over a micro-batch
    with their steps (the default)."""
    return with_slow_commits(pipeline, request.param)


@pytest.mark.slow
def test_sigkill_mid_stream_neither_loses_nor_double_counts(slow_commits: Pipeline) -> None:
    pipeline = slow_commits
    source = SpanSource(pipeline, batches=400, seed=7)
    # Arranged, not timed: the first worker's commit timer never ticks (it commits only what a
    # delivered changelog write covers, `_commit_written`) and it is killed once it has written
    # deltas, mid-stream (the producer holds its last 300 batches until then): what it counted past
    # its commit is left for its successor to replay. (A kill timed 3 s after the start could follow
    # a commit of all it had counted.)
    first = pipeline.start_worker(env={"BURNGUARD_COMMIT_INTERVAL_S": "3600"})
    killed = threading.Event()
    sender = source.send_in_background(400, hold=(100, killed))
    wait_for_deltas(pipeline)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    killed.set()
    pipeline.start_worker()
    sender.join(120)
    wait_for_exact_totals(pipeline, source)
    assert "replayed deltas recognised" in pipeline.log("worker"), "the kill left nothing to replay"


@pytest.mark.slow
def test_rebalance_between_two_workers_and_a_killed_one_keeps_totals_exact(pipeline: Pipeline) -> None:
    """With the default combining only: rows sent alone are a group of one step, and the SIGKILL test
    runs both ways."""
    pipeline = with_slow_commits(pipeline)
    source = SpanSource(pipeline, batches=300, seed=11)
    first = pipeline.start_worker()
    source.send(100)
    pipeline.start_worker()  # the group rebalances: the second worker takes over partitions
    source.send(100)
    first.send_signal(signal.SIGKILL)  # its partitions move to the survivor after the session timeout
    first.wait(10)
    source.send(100)
    wait_for_exact_totals(pipeline, source, timeout_s=150)


@pytest.mark.slow
def test_a_broker_restart_mid_stream_neither_loses_nor_double_counts(private_pipeline: Pipeline) -> None:
    pipeline = private_pipeline
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="5", BURNGUARD_SESSION_TIMEOUT_S="8")
    source = SpanSource(pipeline, batches=200, seed=13)
    worker = pipeline.start_worker()
    source.send(100)
    broker = pipeline.broker
    broker.stop()
    time.sleep(2)
    broker.start()  # same data directory, same ports
    source.send(100)
    wait_for_exact_totals(pipeline, source, timeout_s=150)
    assert worker.poll() is None, "the worker died with the broker instead of reconnecting"


@pytest.mark.slow
def test_single_delta_records_of_the_previous_version_count_once(slow_commits: Pipeline) -> None:
    """After an upgrade the usage topic can still hold one-delta records: they count, their replays not."""
    pipeline = slow_commits
    pipeline.start_worker()
    now_ns = time.time_ns()
    day_start_ns = now_ns // (86_400 * 10**9) * 86_400 * 10**9
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")

    def legacy(offset: int, amount: float) -> bytes:
        delta = dict(budget="tenant-tokens", key="acme", window_start_ns=day_start_ns, amount=amount, spans=1)
        delta.update(first_event_ns=now_ns, last_event_ns=now_ns, source_partition=0, source_offset=offset)
        return json.dumps({**delta, "bucket_ns": 0}).encode()

    for offset, amount in [(10, 100.0), (11, 20.0), (11, 20.0), (10, 100.0)]:  # the last two are replays
        producer.send(pipeline.topics.usage, key=b"tenant-tokens|acme", value=legacy(offset, amount))
    producer.flush()
    producer.close()
    deadline, spent, replays_seen = time.monotonic() + 60, None, False
    while time.monotonic() < deadline and not (spent == 120.0 and replays_seen):
        usage = latest_usage(pipeline).get("tenant-tokens:acme")
        spent = usage.spent if usage else None
        # the two replays above, and more if the rewind after a rebalance read the records again
        replays_seen = any(int(n) >= 2 for n in REPLAYS_LOGGED.findall(pipeline.log("worker")))
        time.sleep(1)
    assert spent == 120.0
    assert replays_seen, "the two replays were not recognised as such"


@pytest.mark.slow
def test_a_clean_stop_writes_the_pending_table_changes_and_commits_what_they_cover(
    pipeline: Pipeline,
) -> None:
    """With changes pending for the whole run (a long flush interval), a stop still leaves no lag.

    The commit waits for the changes' write (`stream/changelog.py`); on a clean
    stop the worker writes them and commits. Its successor recovers them from
    the changelog and the totals stay exact.
    """
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="0.5", BURNGUARD_CHANGELOG_FLUSH_MS="10000")
    source = SpanSource(pipeline, batches=60, seed=17)
    first = pipeline.start_worker()
    source.send(40, pause_s=0.0)
    wait_for_exact_totals(pipeline, source, timeout_s=60)  # snapshots do not wait for the changelog
    assert pipeline.stop(first) == 0
    usage = pipeline.topics.usage
    consumer = KafkaConsumer(bootstrap_servers=pipeline.broker.bootstrap)
    ends = {
        tp.partition: end for tp, end in consumer.end_offsets(consumer_partitions(consumer, usage)).items()
    }
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=pipeline.broker.bootstrap)
    group = pipeline.env["BURNGUARD_STREAM_APP_ID"]
    offsets = admin.list_group_offsets(group).get(group, {})
    admin.close()
    committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == usage}
    assert any(ends.values()), "nothing reached the usage topic"
    assert {p: committed.get(p, 0) for p, end in ends.items() if end} == {p: e for p, e in ends.items() if e}
    pipeline.start_worker()
    source.send(20, pause_s=0.0)
    wait_for_exact_totals(pipeline, source, timeout_s=60)


def consumer_partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    return [
        TopicPartition(topic, partition) for partition in sorted(consumer.partitions_for_topic(topic) or ())
    ]


def committed_offsets(pipeline: Pipeline, topic: str) -> dict[int, int]:
    """The stream group's committed offset per partition of `topic` (none: not listed)."""
    admin = KafkaAdminClient(bootstrap_servers=pipeline.broker.bootstrap)
    group = pipeline.env["BURNGUARD_STREAM_APP_ID"]
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {
        tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0
    }


@pytest.mark.slow
def test_a_changelog_the_broker_refuses_stops_the_worker_before_a_commit_passes_it(
    pipeline: Pipeline,
) -> None:
    """The window totals' changelog refuses every record (`max.message.bytes`): no usage offset is committed.

    aiokafka's flush, which Faust runs before each commit, does not fail on a
    refused record; committing anyway would leave totals that no recovery
    sees. The worker stops instead, and its successor replays from the start.
    """
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="0.5", BURNGUARD_CHANGELOG_FLUSH_MS="200")
    changelog = f"{pipeline.env['BURNGUARD_STREAM_APP_ID']}-window-totals-changelog"
    pipeline.broker.create_topic(changelog, partitions=4, compact=True, config={"max.message.bytes": "64"})
    worker = pipeline.start_worker()
    SpanSource(pipeline, batches=20, seed=5).send(20, pause_s=0.0)
    try:
        status = worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        status = None
    log = pipeline.log("worker")
    assert committed_offsets(pipeline, pipeline.topics.usage) == {}, log[-3000:]
    assert status not in (None, 0), (
        f"the worker went on (or ended well, {status}) after its changelog refused a record:\n{log[-3000:]}"
    )
    assert "a changelog record was not written" in log, log[-4000:]


def end_offsets(pipeline: Pipeline, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=pipeline.broker.bootstrap)
    try:
        ends = consumer.end_offsets(consumer_partitions(consumer, topic))
    finally:
        consumer.close()
    return {tp.partition: end for tp, end in ends.items() if end}


@pytest.mark.slow
@pytest.mark.parametrize("flush_ms", ["0", "1000"])
def test_once_the_stream_is_quiet_the_commits_reach_the_end_of_the_usage_topic(
    pipeline: Pipeline, flush_ms: str
) -> None:
    """A write's cover counts once its records are delivered: that must not wait for a next write."""
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="0.5", BURNGUARD_CHANGELOG_FLUSH_MS=flush_ms)
    source = SpanSource(pipeline, batches=30, seed=23)
    pipeline.start_worker()
    source.send(30, pause_s=0.0)
    wait_for_exact_totals(pipeline, source, timeout_s=60)
    wait_for_commits_at_the_end(pipeline, timeout_s=20)


@pytest.mark.slow
def test_a_bursts_last_records_are_committed_once_written_not_at_the_commit_timers_tick(
    pipeline: Pipeline,
) -> None:
    """The write of the burst's last changes is the commit point (`BudgetJob._commit_written`).

    With the commit timer a minute away (its first tick too), both topics' commits still reach
    their ends within seconds of the totals: before, they waited for that tick.
    """
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(BURNGUARD_COMMIT_INTERVAL_S="60", BURNGUARD_CHANGELOG_FLUSH_MS="500")
    source = SpanSource(pipeline, batches=30, seed=29)
    pipeline.start_worker()
    source.send(30, pause_s=0.0)
    wait_for_exact_totals(pipeline, source, timeout_s=60)
    wait_for_commits_at_the_end(pipeline, timeout_s=15, topics=(pipeline.topics.usage, pipeline.topics.spans))


def wait_for_commits_at_the_end(pipeline: Pipeline, timeout_s: float, topics: tuple[str, ...] = ()) -> None:
    """Until the group's commits reach the end of each of `topics` (the usage topic by default)."""
    deadline = time.monotonic() + timeout_s
    for topic in topics or (pipeline.topics.usage,):
        while (committed := committed_offsets(pipeline, topic)) != (ends := end_offsets(pipeline, topic)):
            assert time.monotonic() < deadline, f"commits {committed} of {topic} never reached {ends}"
            time.sleep(0.5)


@pytest.mark.slow
def test_a_worker_expelled_while_stalled_leaves_the_totals_exact(pipeline: Pipeline) -> None:
    """A worker stalled past its session (SIGSTOP) is expelled; its partitions go to a second worker.

    When it resumes, its pending table changes are older than what the second
    worker wrote since: written then, a recovery would read them last. The
    second worker is killed after committing, and a third recovers from the
    changelogs: the totals must still be exact.
    """
    pipeline.write_budgets(BUDGETS)
    pipeline.env.update(
        BURNGUARD_COMMIT_INTERVAL_S="0.5",
        BURNGUARD_SESSION_TIMEOUT_S="6",
        BURNGUARD_CHANGELOG_FLUSH_MS="10000",
    )
    source = SpanSource(pipeline, batches=60, seed=31)
    first = pipeline.start_worker()
    source.send(20, pause_s=0.0)
    wait_for_exact_totals(pipeline, source, timeout_s=60)
    first.send_signal(signal.SIGSTOP)
    try:
        second = pipeline.start_worker(timeout=90)
        source.send(20, pause_s=0.0)
        wait_for_exact_totals(pipeline, source, timeout_s=60)
        wait_for_commits_at_the_end(pipeline, timeout_s=40)
    finally:
        first.send_signal(signal.SIGCONT)
    pipeline.wait_for_log("worker", "member_id was not recognized", 30, second)  # aiokafka: expelled
    time.sleep(2)
    if first.poll() is None:
        pipeline.stop(first)
    second.send_signal(signal.SIGKILL)
    second.wait(10)
    pipeline.start_worker()
    source.send(20, pause_s=0.0)  # every key changes again: its snapshot is what the changelog held, and more
    wait_for_exact_totals(pipeline, source, timeout_s=60)
