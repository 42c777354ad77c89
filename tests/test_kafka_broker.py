"""The local Kafka broker against every Kafka client the project uses (no mocks).

Kafka 4.0 removed old protocol versions (KIP-896), so these tests are the proof
that kafka-python (base install), aiokafka and Faust (stream worker) all work
against the pinned broker version: plain produce/consume, consumer groups with
offset commits, idempotent and transactional producers, and a Faust worker with
a table (changelog topic) that recovers its state after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from burnguard.deploy.kafka import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaToolMissing,
    kafka_classpath,
    port_is_free,
)
from burnguard.deploy.kafka.broker import new_cluster_id
from kafka import KafkaConsumer, KafkaProducer

slow = pytest.mark.slow
TEST_KAFKA_VERSION = os.environ.get("BURNGUARD_KAFKA_VERSION", KAFKA_VERSION)


def unique(prefix: str) -> str:
    """Topic/group names unique per test, since the session broker is shared."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, key=b"k", value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def consume(bootstrap: str, topic: str, count: int, group: str | None = None) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    try:
        values = []
        for message in consumer:
            values.append(message.value)
            if len(values) == count:
                break
        return values
    finally:
        consumer.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------ kafka-python


@slow
def test_kafka_python_produce_consume(kafka_broker: KafkaBroker) -> None:
    topic = unique("kp")
    kafka_broker.create_topic(topic, partitions=1)
    values = [f"m{i}".encode() for i in range(5)]
    produce(kafka_broker.bootstrap, topic, values)
    assert consume(kafka_broker.bootstrap, topic, 5, group=unique("kp-group")) == values


@slow
def test_create_topic_is_idempotent_and_compacts(kafka_broker: KafkaBroker) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    topic = unique("compact")
    kafka_broker.create_topic(topic, partitions=2, compact=True, config={"segment.ms": "60000"})
    kafka_broker.create_topic(topic, partitions=2, compact=True)  # already exists: no error
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        described = admin.describe_configs([resource])
        partitions = admin.describe_topics([topic])[0]["partitions"]
    finally:
        admin.close()
    topic_config = described["topic"][topic]  # kafka-python 3.x result shape
    assert topic_config["cleanup.policy"]["value"] == "compact"
    assert topic_config["segment.ms"]["value"] == "60000"
    assert len(partitions) == 2


# ---------------------------------------------------------------------- aiokafka


@slow
def test_aiokafka_consumer_group_commits_offsets(kafka_broker: KafkaBroker) -> None:
    pytest.importorskip("aiokafka")
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic, group = unique("aio"), unique("aio-group")
    bootstrap = kafka_broker.bootstrap

    async def run() -> tuple[list[bytes], int]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, f"a{i}".encode(), key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            values: list[bytes] = []
            async with asyncio.timeout(30):
                async for message in consumer:
                    values.append(message.value)
                    if len(values) == 5:
                        break
            await consumer.commit()
            # Auto-created with the broker's num.partitions; one key -> one partition.
            committed = [await consumer.committed(tp) for tp in consumer.assignment()]
        finally:
            await consumer.stop()
        return values, sum(offset or 0 for offset in committed)

    values, committed = asyncio.run(run())
    assert values == [f"a{i}".encode() for i in range(5)]
    assert committed == 5


@slow
def test_aiokafka_idempotent_and_transactional_producer(kafka_broker: KafkaBroker) -> None:
    pytest.importorskip("aiokafka")
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = unique("txn")
    bootstrap = kafka_broker.bootstrap

    async def run() -> list[bytes]:
        idempotent = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
        await idempotent.start()
        try:
            await idempotent.send_and_wait(topic, b"idempotent", key=b"k")
        finally:
            await idempotent.stop()
        transactional = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("txn-id"))
        await transactional.start()
        try:
            async with transactional.transaction():
                await transactional.send_and_wait(topic, b"committed", key=b"k")
            await transactional.begin_transaction()
            await transactional.send_and_wait(topic, b"aborted", key=b"k")
            await transactional.abort_transaction()
            async with transactional.transaction():
                await transactional.send_and_wait(topic, b"last", key=b"k")
        finally:
            await transactional.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            values: list[bytes] = []
            async with asyncio.timeout(30):
                async for message in consumer:
                    values.append(message.value)
                    if message.value == b"last":
                        break
            return values
        finally:
            await consumer.stop()

    assert asyncio.run(run()) == [b"idempotent", b"committed", b"last"]


# ------------------------------------------------------------------------- Faust

FAUST_APP = """
import os

import faust

app = faust.App(
    os.environ["BG_APP_ID"],
    broker="kafka://" + os.environ["BG_BOOTSTRAP"],
    store="memory://",
    datadir=os.environ["BG_DATADIR"],
    web_enabled=False,
    topic_partitions=4,
    topic_replication_factor=1,
    broker_commit_interval=0.5,
)
source = app.topic(os.environ["BG_IN"], key_serializer="raw", value_serializer="raw")
sink = app.topic(os.environ["BG_OUT"], key_serializer="raw", value_serializer="raw")
counts = app.Table("counts", default=int)


@app.agent(source)
async def count(stream):
    async for key, value in stream.items():
        counts[key.decode()] += 1
        await sink.send(key=key, value=b"%s:%d" % (value, counts[key.decode()]))
"""


def wait_until_ready(worker: subprocess.Popen, log_path: Path, earlier: int, timeout: float = 90.0) -> None:
    """Wait for this worker's "Ready" line, written after the log's first `earlier` bytes."""
    deadline = time.monotonic() + timeout
    while b"[^Worker]: Ready" not in log_path.read_bytes()[earlier:]:
        assert worker.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no Ready in {timeout}s: {log_path.read_text()[-3000:]}"
        time.sleep(0.2)


@contextlib.contextmanager
def faust_worker(app_dir: Path, env: dict[str, str]) -> Iterator[None]:
    """Run ``faust worker`` on the app in ``app_dir`` for the duration of the block, once it is Ready.

    Records produced before a restarted stock worker has sought to its committed offsets can
    be fetched, dropped and then taken for already read (Faust's start-up race, handled in
    burnguard's own agents by `stream/takeover.py`); this smoke test is about the broker.
    """
    log_path = app_dir / "worker.log"
    with log_path.open("ab") as log:
        earlier = log_path.stat().st_size
        worker = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "faust_smoke", "worker", "-l", "info", "--without-web"],
            cwd=app_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(worker, log_path, earlier)
            yield
            time.sleep(1.5)  # a few broker_commit_interval periods: offsets get committed
            assert worker.poll() is None, log_path.read_text()[-3000:]
        finally:
            worker.terminate()
            worker.wait(timeout=60)


@slow
def test_faust_worker_table_survives_restart(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """Group coordination, offset commits, changelog topic and table recovery."""
    pytest.importorskip("faust")
    (tmp_path / "faust_smoke.py").write_text(textwrap.dedent(FAUST_APP))
    topic_in, topic_out = unique("faust-in"), unique("faust-out")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "BG_APP_ID": unique("faust-app"),
        "BG_BOOTSTRAP": kafka_broker.bootstrap,
        "BG_DATADIR": str(tmp_path / "data"),
        "BG_IN": topic_in,
        "BG_OUT": topic_out,
    }
    bootstrap = kafka_broker.bootstrap
    kafka_broker.create_topic(topic_in, partitions=4)  # a worker discovers a later topic only minutes later
    with faust_worker(tmp_path, env):
        produce(bootstrap, topic_in, [b"v0", b"v1", b"v2"])
        assert consume(bootstrap, topic_out, 3) == [b"v0:1", b"v1:2", b"v2:3"]
    # A new worker must restore the count from the changelog and resume after the
    # committed offset: no reprocessing, so exactly one new output, counting on.
    with faust_worker(tmp_path, env):
        produce(bootstrap, topic_in, [b"v3"])
        outputs = consume(bootstrap, topic_out, 4)
    assert outputs == [b"v0:1", b"v1:2", b"v2:3", b"v3:4"], (tmp_path / "worker.log").read_text()[-3000:]


# --------------------------------------------------------------- stop / restart


@slow
def test_stop_restart_keeps_data_and_frees_ports(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka", version=TEST_KAFKA_VERSION)
    try:
        check_stop_and_restart(broker)
    finally:
        broker.stop()  # a detached broker would otherwise outlive a failed test


def check_stop_and_restart(broker: KafkaBroker) -> None:
    started = time.monotonic()
    broker.start(detach=True)
    first_start = time.monotonic() - started
    port, controller_port, pid = broker.port, broker.controller_port, broker.pid
    assert pid is not None
    assert f'"port": {port}' in (broker.data_dir / "broker.json").read_text()
    assert (broker.data_dir / "broker.pid").read_text().strip() == str(pid)
    topic = unique("restart")
    broker.create_topic(topic)
    produce(broker.bootstrap, topic, [b"before-stop-1", b"before-stop-2"])

    with pytest.raises(RuntimeError, match="already runs"):
        KafkaBroker(broker.data_dir).start()  # a second JVM on the same data dir

    # What `burnguard dev down` does: re-attach from broker.json and stop.
    attached = KafkaBroker.from_state(broker.data_dir)
    assert attached is not None
    assert (attached.port, attached.controller_port, attached.pid) == (port, controller_port, pid)
    attached.stop()
    assert not broker.is_running()  # also reaps the child, so the pid is really gone
    assert not pid_alive(pid)
    assert port_is_free(port) and port_is_free(controller_port)
    assert KafkaBroker.from_state(broker.data_dir) is None
    attached.stop()  # idempotent

    started = time.monotonic()
    broker.start()
    restart = time.monotonic() - started
    assert (broker.port, broker.controller_port) == (port, controller_port)
    assert broker.pid != pid
    assert consume(broker.bootstrap, topic, 2) == [b"before-stop-1", b"before-stop-2"]
    broker.stop()
    broker.stop()
    assert not broker.is_running()
    assert port_is_free(port) and port_is_free(controller_port)
    print(f"first start {first_start:.1f}s (incl. format), restart {restart:.1f}s")


@slow
def test_classpath_is_cached(kafka_broker: KafkaBroker) -> None:
    started = time.monotonic()
    classpath = kafka_classpath(kafka_broker.version)
    assert time.monotonic() - started < 1.0
    jars = [Path(jar).name for jar in classpath.split(os.pathsep)]
    for artifact in ("kafka_2.13-", "kafka-clients-", "log4j-core-", "log4j-slf4j2-impl-", "slf4j-api-2"):
        assert any(jar.startswith(artifact) for jar in jars), artifact


# ---------------------------------------------------------------- missing tools


@pytest.fixture
def no_tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with neither java nor mvn, and no overrides that would find them."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("JAVA_HOME", "BURNGUARD_JAVA", "BURNGUARD_MVN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BURNGUARD_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached


@pytest.mark.usefixtures("no_tools_on_path")
def test_missing_java_names_what_to_install(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka")
    with pytest.raises(KafkaToolMissing, match="openjdk-17-jre-headless"):
        broker.start()
    assert broker.pid is None and not broker.is_running()
    with pytest.raises(KafkaToolMissing, match="java"):
        KafkaBroker(tmp_path / "kafka", java=str(tmp_path / "no-such-java")).start()


@pytest.mark.usefixtures("no_tools_on_path")
def test_missing_maven_names_what_to_install() -> None:
    with pytest.raises(KafkaToolMissing, match="apt-get install maven"):
        kafka_classpath(KAFKA_VERSION)


def test_cluster_id_has_kafka_uuid_format() -> None:
    for _ in range(200):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert set(cluster_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
