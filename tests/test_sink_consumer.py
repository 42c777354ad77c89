"""The sink's Kafka consumer against the session's real broker and the real chDB engine.

Delivery through Kafka, price following, ClickHouse outages, failed commits,
rebalances and kafka-python's group-membership failures (injected with the
library's own code), and the sink as its own process: stop, restart, kill.
The writer's tests without Kafka are in `test_sink_writer.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts.budgets import (
    DEFAULT_UNPRICED_INPUT_MTOK,
    DEFAULT_UNPRICED_OUTPUT_MTOK,
    parse_budget_yaml,
    to_records,
)
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.pricing import default_price_book
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.deploy.kafka import KafkaBroker
from burnguard.sinks import consumer as sink_module
from burnguard.sinks import membership, queries
from burnguard.sinks.clickhouse import ClickHouseWriter, KafkaOrigin, connect
from burnguard.sinks.consumer import SpanSink
from burnguard.sinks.schema import SPANS_TABLE, migrate
from clickhouse_connect.driver.client import Client
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import RebalanceInProgressError
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from tests.fixtures.pipeline import read_to_end
from tests.fixtures.sink import (  # noqa: F401  (fixtures by name)
    TENANTS,
    budget_signal,
    chdb_dsn_fixture,
    chdb_outage,
    open_chdb,
)

GARBAGE = b"\x0a\xff\xffnot an OTLP request"
# After a chDB outage the sink opens the directory and migrates before it can insert and
# commit: seconds when idle, about 30 s (engine load plus migration) on a loaded 2-core machine.
AFTER_OUTAGE_S = 120.0
# How long an insert attempt takes to fail, and a join to get under way, on a loaded machine:
# longer than the sink's short polls and retry waits, shorter than its `rebalance_poll_s`.
INSERT_ATTEMPT_S = 1.5
JOIN_DELAY_S = 1.0


@dataclass
class Stream:
    """One test's topics on the session broker, a producer, and what was produced."""

    broker: KafkaBroker
    topics: Topics
    group: str
    producer: KafkaProducer
    spend: dict[str, float]
    spans: int = 0
    good_messages: int = 0

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.broker.bootstrap)

    def send_spans(self, count: int, start: int = 0) -> None:
        """`count` messages of OTLP protobuf, each with one priced chat, one tool and one HTTP span."""
        for i in range(start, start + count):
            tenant = TENANTS[i % len(TENANTS)]
            cost = round(0.01 * (i + 1), 4)
            payload = otlp_request(
                {"name": "chat gpt-4.1", "attributes": _chat(tenant, cost=cost)},
                {"name": "execute_tool search", "attributes": _tool(tenant)},
                {"name": "GET /health", "attributes": {"http.request.method": "GET"}},
            )
            self.producer.send(self.topics.spans, key=tenant.encode(), value=payload)
            self._count(tenant, cost, spans=2)

    def send_to_be_priced(self) -> float:
        """A Collector-style span without burnguard.cost.usd, and one of a model nobody prices."""
        attributes = _chat("globex", cost=None)
        payload = otlp_request(
            {"name": "chat gpt-4.1", "attributes": attributes},
            {"name": "chat mystery", "attributes": {**_chat("globex", None), "gen_ai.request.model": "zz-9"}},
        )
        self.producer.send(self.topics.spans, value=payload)
        price = default_price_book().price("gpt-4.1", "openai", input_tokens=1200, output_tokens=300)
        assert price is not None and price > 0
        # the model nobody prices is charged by the default `unpriced:` rule, and stays marked unpriced
        charged = (1200 * DEFAULT_UNPRICED_INPUT_MTOK + 300 * DEFAULT_UNPRICED_OUTPUT_MTOK) / 1e6
        self._count("globex", price + charged, spans=2)
        return price

    def send_garbage(self) -> None:
        self.producer.send(self.topics.spans, key=b"acme", value=GARBAGE)

    def send_signals(self, signals: list[Signal]) -> None:
        for s in signals:
            self.producer.send(self.topics.signals, key=s.kafka_key.encode(), value=s.to_json())
        self.producer.send(self.topics.signals, key=b"tenant:gone@tenant-daily", value=None)  # tombstone

    def _count(self, tenant: str, cost: float, spans: int) -> None:
        self.spend[tenant] = self.spend.get(tenant, 0.0) + cost
        self.spans += spans
        self.good_messages += 1

    def lag(self) -> int:
        """Messages the sink group has not committed yet, over both topics."""
        # A group member that never subscribes only fetches the group's offsets; it never joins.
        consumer = KafkaConsumer(
            bootstrap_servers=self.broker.bootstrap, group_id=self.group, enable_auto_commit=False
        )
        try:
            partitions = [
                TopicPartition(topic, p)
                for topic in (self.topics.spans, self.topics.signals)
                for p in consumer.partitions_for_topic(topic) or ()
            ]
            ends = consumer.end_offsets(partitions)
            return sum(end - (consumer.committed(tp) or 0) for tp, end in ends.items())
        finally:
            consumer.close(autocommit=False)

    def wait_consumed(self, timeout: float = 90.0, alive: Callable[[], bool] = lambda: True) -> None:
        self.producer.flush()
        wait_for(lambda: self.lag() == 0, timeout, "the sink to commit everything", alive)


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] = lambda: True
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"the sink died while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _chat(tenant: str, cost: float | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "burnguard.tenant": tenant,
        "burnguard.feature": "summarize",
    }
    if cost is not None:
        attributes["burnguard.cost.usd"] = cost
    return attributes


def _tool(tenant: str) -> dict[str, Any]:
    return {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search", "burnguard.tenant": tenant}


def otlp_request(*specs: dict[str, Any]) -> bytes:
    """An OTLP protobuf ExportTraceServiceRequest of real SDK spans, as the kafkaexporter sends it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout-api"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("workflow"):  # the root is not a GenAI span: not stored
        for spec in specs:
            with tracer.start_as_current_span(spec["name"], attributes=spec["attributes"]) as span:
                if spec.get("error"):
                    span.set_status(Status(StatusCode.ERROR))
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


@pytest.fixture
def stream(kafka_broker: KafkaBroker) -> Iterator[Stream]:
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(
        spans=f"otlp_spans.{suffix}",
        signals=f"burnguard.signals.{suffix}",
        budgets=f"burnguard.budgets.{suffix}",
    )
    kafka_broker.create_topic(topics.spans, partitions=2)
    kafka_broker.create_topic(topics.signals, partitions=1, compact=True)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    try:
        yield Stream(kafka_broker, topics, f"burnguard-sink-{suffix}", producer, {})
    finally:
        producer.close()


@contextmanager
def sink_thread(stream: Stream, dsn: str, **options: Any) -> Iterator[SpanSink]:
    sink = SpanSink(stream.kafka, stream.topics, dsn, group_id=stream.group, flush_interval_s=0.2, **options)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), name="sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the sink did not stop"


def stored(dsn: str) -> tuple[int, int, dict[str, float]]:
    """(spans under FINAL, rows without FINAL, spend per tenant) read after the sink let go."""
    with open_chdb(dsn) as client:
        return (
            queries.span_count(client),
            queries.span_count(client, final=False),
            queries.spend_by_tenant(client),
        )


def test_end_to_end_through_kafka(stream: Stream, chdb_dsn: str) -> None:
    stream.send_spans(9)
    stream.send_garbage()
    stream.send_to_be_priced()
    sent = [
        budget_signal("acme", "warn", 36.0, 1),
        budget_signal("acme", "downgrade", 43.0, 2),
        budget_signal("globex", "ok", 2, 3),
    ]
    stream.send_signals(sent)

    with sink_thread(stream, chdb_dsn) as sink:
        stream.wait_consumed()
        assert sink.malformed == 1
        assert sink.insert_failures == 0
    assert sink.spans_written == stream.spans
    assert sink.signals_written == len(sent)

    with open_chdb(chdb_dsn) as client:
        assert queries.span_count(client) == stream.spans
        assert queries.span_count(client, final=False) == stream.spans  # a clean run writes each span once
        assert queries.spend_by_tenant(client) == pytest.approx(stream.spend)
        assert queries.signals(client) == sent
        operations = client.query(
            f"SELECT operation, count(), sum(priced) FROM {SPANS_TABLE} FINAL GROUP BY operation ORDER BY 1"
        ).result_rows
        assert operations == [("chat", 11, 10), ("execute_tool", 9, 0)]
        messages = client.command(f"SELECT uniqExact(kafka_partition, kafka_offset) FROM {SPANS_TABLE}")
        assert messages == stream.good_messages


def test_spans_are_priced_with_the_price_overrides_the_workers_follow(stream: Stream, chdb_dsn: str) -> None:
    def apply(input_mtok: float) -> None:
        config = parse_budget_yaml(f"prices:\n  my-finetune: {{input_mtok: {input_mtok}, output_mtok: 12}}\n")
        for key, value in to_records(config).items():
            stream.producer.send(stream.topics.budgets, key=key.encode(), value=value)
        stream.producer.flush()

    def send_finetune_call() -> None:
        attributes = {**_chat("acme", None), "gen_ai.request.model": "my-finetune"}
        stream.producer.send(
            stream.topics.spans, value=otlp_request({"name": "chat ft", "attributes": attributes})
        )
        stream.spans += 1
        stream.good_messages += 1

    stream.broker.create_topic(stream.topics.budgets, partitions=1, compact=True)
    apply(input_mtok=3)
    send_finetune_call()  # 1,200 in x $3 + 300 out x $12 per million tokens
    with sink_thread(stream, chdb_dsn) as sink:
        stream.wait_consumed()
        apply(input_mtok=5)  # `burnguard budgets apply` of a new price: followed without a restart
        feed = sink._budget_feed
        assert feed is not None
        wait_for(lambda: feed.current.prices["my-finetune"]["input_mtok"] == 5, 30, "the new price")
        send_finetune_call()
        stream.wait_consumed()
        assert sink.spans_written == 2
    with open_chdb(chdb_dsn) as client:
        costs = client.query(
            f"SELECT cost_usd, priced FROM {SPANS_TABLE} FINAL ORDER BY start_time"
        ).result_rows
    assert costs == [
        (pytest.approx((1200 * 3 + 300 * 12) / 1e6), 1),
        (pytest.approx((1200 * 5 + 300 * 12) / 1e6), 1),
    ]


def test_unreachable_clickhouse_keeps_the_batch_and_commits_nothing(stream: Stream, chdb_dsn: str) -> None:
    """A chDB directory held by another process is a real outage: retry, no commit, no loss."""
    with chdb_outage(chdb_dsn) as end_outage:
        stream.send_spans(6)
        stream.producer.flush()
        with sink_thread(stream, chdb_dsn, retry_initial_s=0.1, retry_max_s=0.5) as sink:
            wait_for(lambda: sink.insert_failures >= 3, 60, "insert retries")
            assert sink.spans_written == 0
            assert stream.lag() == 6
            end_outage()
            stream.wait_consumed(AFTER_OUTAGE_S)
    assert sink.spans_written == stream.spans
    assert sink.consumer_restarts == 0
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)
    assert spend == pytest.approx(stream.spend)


def test_a_failed_commit_is_kept_and_retried(
    stream: Stream, chdb_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are in, the commit fails (as it does while the group rebalances): commit later.

    kafka-python 3 keeps the position of a partition that a rebalance hands back to the
    same member, so a sink that forgot the failed commit would never read those
    messages again and their lag would stay.
    """
    failures = 3

    class CommitsFailFirst(KafkaConsumer):
        def commit(self, offsets: Any = None, timeout_ms: int | None = None) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise RebalanceInProgressError("injected: the group is rebalancing")
            super().commit(offsets, timeout_ms)

    monkeypatch.setattr(membership, "KafkaConsumer", CommitsFailFirst)
    stream.send_spans(6)
    sent = [budget_signal("acme", "warn", 36.0, 1)]
    stream.send_signals(sent)
    with sink_thread(stream, chdb_dsn, retry_initial_s=0.1) as sink:
        stream.wait_consumed()
    assert failures == 0
    assert sink.commit_failures == 3
    assert sink.spans_written == stream.spans  # written once, never read again
    assert sink.signals_written == len(sent)
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)
    assert spend == pytest.approx(stream.spend)


def test_a_commit_that_keeps_failing_gives_up_at_shutdown(
    stream: Stream, chdb_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On stop the sink retries the commit until `shutdown_timeout_s`, then exits without it."""
    attempts = 0

    class CommitsFail(KafkaConsumer):
        def commit(self, offsets: Any = None, timeout_ms: int | None = None) -> None:
            nonlocal attempts
            attempts += 1
            raise RebalanceInProgressError("injected: the group is rebalancing")

    monkeypatch.setattr(membership, "KafkaConsumer", CommitsFail)
    stream.send_spans(3)
    stream.producer.flush()
    with sink_thread(stream, chdb_dsn, retry_initial_s=0.1, shutdown_timeout_s=2.0) as sink:
        wait_for(lambda: sink.commit_failures >= 2, 60, "failed commits")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 30
    assert sink.commits == 0 and attempts == sink.commit_failures
    assert stream.lag() == 3  # the next run reads them again; the copies collapse
    final, rows, _ = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)


def test_partitions_that_move_away_during_an_outage_are_read_again_when_they_come_back(
    stream: Stream, chdb_dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second member joins while ClickHouse is down, takes partitions and leaves without committing.

    The sink drops what it held from the partitions it lost, reads them again from the
    last commit when they come back, keeps the rest, and ends with every row once.

    Two things make the rebalance go as it does on a loaded machine, every time: each
    insert attempt takes a while to fail (a server that does not answer), and the join
    outlasts the short poll that starts it. kafka-python 3.0.12 applies a join's result
    only inside a poll; one that ends while the sink is busy retrying the insert is thrown
    away by the next poll, and the sink, the group leader, joins again: a new rebalance,
    which waits for the second member (not polling) for its whole rebalance timeout, five
    minutes. The sink must see the first join through.
    """
    caplog.set_level("INFO", logger=sink_module.__name__)

    class SlowToJoin(KafkaConsumer):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            coordinator = self._coordinator
            join = coordinator._do_join_and_sync_async

            async def slow_join() -> Any:  # the JoinGroup goes out late, as from a loaded machine
                await coordinator._manager._net.sleep(JOIN_DELAY_S)
                return await join()

            coordinator._do_join_and_sync_async = slow_join

    def slow_to_fail(dsn: str | None = None, **kwargs: Any) -> Client:
        time.sleep(INSERT_ATTEMPT_S)
        return connect(dsn, **kwargs)

    monkeypatch.setattr(membership, "KafkaConsumer", SlowToJoin)
    monkeypatch.setattr(sink_module, "connect", slow_to_fail)
    with chdb_outage(chdb_dsn) as end_outage:
        stream.send_spans(12)
        stream.producer.flush()
        with sink_thread(stream, chdb_dsn, retry_initial_s=0.1, retry_max_s=0.1) as sink:
            wait_for(lambda: sink.insert_failures >= 2, 60, "insert retries")
            intruder = KafkaConsumer(
                bootstrap_servers=stream.broker.bootstrap,
                group_id=stream.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                intruder.subscribe([stream.topics.spans, stream.topics.signals])
                read = 0
                deadline = time.monotonic() + 60
                while not (intruder.assignment() and read):  # it owns partitions and has read them
                    assert time.monotonic() < deadline, "the second member got no messages"
                    read += sum(len(m) for m in intruder.poll(timeout_ms=500).values())
                # The second member stops polling here: only the rebalance it took part in can end.
                wait_for(lambda: "moved away" in caplog.text, 60, "the sink to drop the moved partitions")
            finally:
                intruder.close(autocommit=False)  # leaves the group: its partitions come back
            assert stream.lag() == 12  # nothing committed by anyone yet
            end_outage()
            stream.wait_consumed(AFTER_OUTAGE_S)
    assert sink.consumer_restarts == 0
    assert sink.spans_written == stream.spans
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)  # the dropped rows were written once, later
    assert spend == pytest.approx(stream.spend)


def test_a_member_kafka_python_leaves_rebalancing_is_asked_to_rejoin(
    stream: Stream, chdb_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kafka-python 3.0.12 can leave a member REBALANCING for good, seen under load.

    The leader rejoins because the topic metadata changed; the poll that started the
    rejoin times out just as the JoinGroup/SyncGroup round trip ends, the result is never
    applied and nothing asks for another join (the broker evicts the member after the
    session timeout, nothing is fetched). This puts a consumer into that state once,
    with the library's own code, after the sink has read the messages: the sink must
    notice, get the member back into the group and commit.
    """
    stuck_states: list[tuple[str, bool, bool]] = []

    class LeftRebalancing(KafkaConsumer):
        def poll(self, timeout_ms: int = 0, *args: Any, **kwargs: Any) -> Any:
            records = super().poll(timeout_ms, *args, **kwargs)
            coordinator = self._coordinator
            if records and not stuck_states and coordinator.stable():
                coordinator._assignment_snapshot = {}  # as when the leader sees new metadata
                super().poll(timeout_ms=1)  # the rejoin starts, this poll gives up on it
                deadline = time.monotonic() + 30
                while not (coordinator._join_task is None or coordinator._join_task.is_done):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)  # the round trip ends with nobody waiting for it
                stuck_states.append(
                    (coordinator.state, coordinator._join_task.is_done, self._coordinator.need_rejoin())
                )
            return records

    monkeypatch.setattr(membership, "KafkaConsumer", LeftRebalancing)
    stream.send_spans(6)
    with sink_thread(stream, chdb_dsn, rebalance_poll_s=1.0) as sink:
        stream.wait_consumed()
    assert stuck_states == [("<rebalancing>", True, False)]  # the state was reached
    assert sink.consumer_restarts == 0  # recovered by asking for a rejoin, not by a new consumer
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)
    assert spend == pytest.approx(stream.spend)


def test_a_consumer_stuck_outside_the_group_is_replaced(
    stream: Stream, chdb_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer whose polls never bring it into the group (kafka-python hanging in a
    rebalance) is replaced after `stuck_rebalance_s`; the new one reads everything."""
    created: list[KafkaConsumer] = []

    class NeverJoins(KafkaConsumer):
        def poll(self, timeout_ms: int = 0, *_args: Any, **_kwargs: Any) -> Any:
            time.sleep(timeout_ms / 1000)
            return {}

    def new_consumer(**options: Any) -> KafkaConsumer:
        created.append((NeverJoins if not created else KafkaConsumer)(**options))
        return created[-1]

    monkeypatch.setattr(membership, "KafkaConsumer", new_consumer)
    stream.send_spans(6)
    # Long enough for the replacement to join even on a loaded machine, so it is not replaced too.
    with sink_thread(stream, chdb_dsn, rebalance_poll_s=1.0, stuck_rebalance_s=15.0) as sink:
        stream.wait_consumed()
    assert sink.consumer_restarts == 1
    assert len(created) == 2
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)
    assert spend == pytest.approx(stream.spend)


# --- the sink as its own process: stop, restart, kill ----------------------------------------------


@dataclass
class SinkProcess:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def launch_sink(stream: Stream, chdb_dsn: str, tmp_path: Path) -> Iterator[Callable[..., SinkProcess]]:
    """Starts `python -m burnguard.sinks` on the test's topics; kills what is left at the end."""
    launched: list[SinkProcess] = []

    def launch(name: str, batch_max: int = 1000) -> SinkProcess:
        env = {
            **os.environ,
            "BURNGUARD_KAFKA_BOOTSTRAP": stream.broker.bootstrap,
            "BURNGUARD_CLICKHOUSE_DSN": chdb_dsn,
            "BURNGUARD_TOPIC_SPANS": stream.topics.spans,
            "BURNGUARD_TOPIC_SIGNALS": stream.topics.signals,
            "BURNGUARD_SINK_GROUP": stream.group,
        }
        args = ["--batch-max", str(batch_max), "--flush-interval", "0.2", "--session-timeout-ms", "6000"]
        log = tmp_path / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "burnguard.sinks", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        launched.append(SinkProcess(process, log))
        return launched[-1]

    yield launch
    for sink in launched:
        if sink.alive():
            sink.process.kill()
            sink.process.wait()


def counters(sink: SinkProcess) -> dict[str, int]:
    """The counters a stopped sink logs last."""
    last = sink.output().rsplit("sink stopped: ", 1)[1].splitlines()[0]
    return json.loads(last)


def stop_sink(sink: SinkProcess) -> None:
    sink.process.send_signal(signal.SIGTERM)
    assert sink.process.wait(60) == 0, sink.output()[-3000:]
    assert "sink stopped" in sink.output()


def test_restart_reads_on_from_the_committed_offsets(
    stream: Stream, chdb_dsn: str, launch_sink: Callable[..., SinkProcess]
) -> None:
    stream.send_spans(12)
    first = launch_sink("sink-1")
    stream.wait_consumed(alive=first.alive)
    stop_sink(first)
    assert stored(chdb_dsn)[:2] == (stream.spans, stream.spans)

    stream.send_spans(6, start=12)
    second = launch_sink("sink-2")
    stream.wait_consumed(alive=second.alive)
    stop_sink(second)
    final, rows, spend = stored(chdb_dsn)
    assert (final, rows) == (stream.spans, stream.spans)  # nothing was inserted twice
    assert spend == pytest.approx(stream.spend)
    assert counters(second)["messages"] == 6  # it read on from where the first one committed
    assert counters(second)["spans_written"] == 12


def test_rows_written_but_not_committed_are_read_again_and_collapse(stream: Stream, chdb_dsn: str) -> None:
    """The state a sink killed between insert and commit leaves: rows in, offsets not committed."""
    stream.send_spans(9)
    stream.producer.flush()
    before_crash = [
        (usage, KafkaOrigin(m.topic, m.partition, m.offset))
        for m in read_to_end(stream.broker.bootstrap, stream.topics.spans)
        for usage in decode_usage(m.value)
    ][:10]
    with open_chdb(chdb_dsn) as client:
        migrate(client)
        ClickHouseWriter(client).insert_spans([u for u, _ in before_crash], [o for _, o in before_crash])

    with sink_thread(stream, chdb_dsn) as sink:
        stream.wait_consumed()
    assert sink.spans_written == stream.spans  # everything was read again
    final, rows, spend = stored(chdb_dsn)
    assert final == stream.spans
    assert rows >= stream.spans
    assert spend == pytest.approx(stream.spend)


def test_a_killed_sink_ends_exactly_once(
    stream: Stream, chdb_dsn: str, launch_sink: Callable[..., SinkProcess]
) -> None:
    stream.send_spans(150)
    stream.producer.flush()
    victim = launch_sink("victim", batch_max=20)
    wait_for(lambda: "wrote" in victim.output(), 90, "the first batch", victim.alive)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(30)
    assert stream.lag() > 0, "the sink finished before it was killed: nothing was tested"

    survivor = launch_sink("survivor", batch_max=20)
    stream.wait_consumed(alive=survivor.alive)
    stop_sink(survivor)
    final, rows, spend = stored(chdb_dsn)
    assert final == stream.spans
    assert rows >= stream.spans
    assert spend == pytest.approx(stream.spend)
