"""The pipeline a budget engine benchmark runs on: a real broker, workers, app processes.

`BenchPipeline` starts a Kafka broker in a temporary directory on free ports
(JVM defaults, not the tests' quick-start JIT flag), starts stream workers
and other processes as subprocesses with their logs in that directory, and
stops every process it started when the `with` block ends, however it ends.
Beside it: the Kafka look-ups the benchmarks measure with (end offsets,
committed group offsets, the latest budget usage snapshots) and the /proc
readings (RSS, CPU time).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.structs import TopicPartition as AioPartition
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.contracts.topics import SPANS_TOPIC_CONFIG, Topics
from burnguard.deploy.kafka import KafkaBroker
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from burnguard.cli.devstack import WORKER_READY, terminate

BENCH_DIR = Path(__file__).resolve().parent
USAGE_PARTITIONS = 4  # the stream job's default BURNGUARD_STREAM_PARTITIONS
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class BenchPipeline:
    """One benchmark's broker and processes; use as a context manager."""

    name: str
    spans_partitions: int = 4
    broker_heap: str = "1g"
    keep: bool = False
    root: Path = field(init=False)
    broker: KafkaBroker = field(init=False)
    topics: Topics = field(default_factory=Topics)
    app_id: str = "burnguard-bench"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: processes started by one of ours (e.g. the worker under py-spy), stopped before their parents
    child_pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"burnguard-bench-{self.name}-"))
        self.broker = KafkaBroker(self.root / "kafka", jvm_options=(), heap=self.broker_heap)

    def __enter__(self) -> BenchPipeline:
        try:
            started = time.monotonic()
            self.broker.start()
            self.broker.create_topic(
                self.topics.spans, partitions=self.spans_partitions, config=SPANS_TOPIC_CONFIG
            )
            # The job's internal usage topic, created up front: when Faust creates it while the
            # worker's consumer subscribes, the assignor can miss it ("Ignoring missing topic") and
            # stage 2 then gets no partitions until the next metadata refresh, 5 minutes later.
            self.broker.create_topic(self.topics.usage, partitions=USAGE_PARTITIONS)
            note(f"broker {self.broker.bootstrap} up in {time.monotonic() - started:.1f}s (dir {self.root})")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.keep = True  # keep the logs of a failed run
        self.close()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every process of this pipeline (topics are the defaults: a fresh broker)."""
        env = dict(os.environ)
        env.update(
            BURNGUARD_KAFKA_BOOTSTRAP=self.bootstrap,
            BURNGUARD_STREAM_APP_ID=self.app_id,
            BURNGUARD_STATE_DIR=str(self.root / "state"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH", "")])),
        )
        env.update(extra or {})
        return env

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(self, name: str, args: Iterable[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start `python <args>` with its output in `<name>.log`."""
        log = self.log_path(name).open("ab")
        process = subprocess.Popen(
            [sys.executable, *args],
            env=self.env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=BENCH_DIR.parent,
        )
        log.close()
        self.processes[name] = process
        return process

    def start_worker(
        self, env: Mapping[str, str] | None = None, name: str = "worker", timeout: float = 120.0
    ) -> subprocess.Popen:
        """Start a stream worker and wait until Faust reports it ready (partitions assigned)."""
        process = self.spawn(name, ["-m", "burnguard.stream"], env)
        self.wait_for_log(name, WORKER_READY, timeout)
        return process

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no {text!r} after {timeout}s:\n{self.log(name)[-4000:]}")
            time.sleep(0.02)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            terminate(process.pid, timeout)
            process.wait(5)

    def stop_child(self, name: str, timeout: float = 20.0) -> None:
        pid = self.child_pids.pop(name, None)
        if pid is not None:
            terminate(pid, timeout)

    def close(self) -> None:
        for name in list(self.child_pids):
            try:
                self.stop_child(name)
            except Exception as exc:
                note(f"could not stop {name}: {exc}")
        for name in list(self.processes):
            try:
                self.stop(name)
            except Exception as exc:  # keep stopping the others
                note(f"could not stop {name}: {exc}")
        try:
            self.broker.stop()
        finally:
            if self.keep:
                note(f"logs kept in {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)


# --- Kafka look-ups -------------------------------------------------------------------


def aio_producer(bootstrap: str) -> AIOKafkaProducer:
    """aiokafka, not kafka-python: without the optional `crc32c` package kafka-python computes
    record CRCs in pure Python (~4 MB/s), which would make the load generator the bottleneck."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=1 << 20, max_request_size=8 << 20
    )


def produce_all(bootstrap: str, topic: str, messages: Iterable[tuple[bytes, bytes]]) -> int:
    """Send every (key, value) and wait for the acknowledgements; return how many."""

    async def send() -> int:
        out = aio_producer(bootstrap)
        await out.start()
        count = 0
        try:
            pending = []
            for key, value in messages:
                pending.append(await out.send(topic, value=value, key=key))
                count += 1
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await out.stop()
        return count

    return asyncio.run(send())


def read_topic(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    """Every record on `topic` now, from the beginning, with aiokafka (CRCs checked in C)."""

    ends = end_offsets(bootstrap, topic)

    async def read() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
        )
        await consumer.start()
        try:
            partitions = [AioPartition(topic, p) for p in ends]
            records: list[ConsumerRecord] = []
            left = {tp: ends[tp.partition] for tp in partitions if ends[tp.partition]}
            if not left:
                return records
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            while left:
                for tp, batch in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                    records.extend(batch)
                    if batch and batch[-1].offset + 1 >= left.get(tp, 0):
                        left.pop(tp, None)
            return records
        finally:
            await asyncio.sleep(0)  # let the consumer's own tasks start: stopping them unstarted raises
            await consumer.stop()

    return asyncio.run(read())


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def topic_sizes(bootstrap: str) -> dict[str, int]:
    """Records written to each topic so far (end offsets summed over partitions)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in consumer.topics()
            for p in consumer.partitions_for_topic(topic) or ()
        ]
        sizes: dict[str, int] = {}
        for tp, offset in consumer.end_offsets(partitions).items():
            sizes[tp.topic] = sizes.get(tp.topic, 0) + offset
        return sizes
    finally:
        consumer.close()


class GroupOffsets:
    """Committed offsets of one consumer group; one admin connection reused across polls."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.group = group
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="burnguard-bench")

    def committed(self, topic: str) -> dict[int, int]:
        offsets = self.admin.list_group_offsets(self.group).get(self.group, {})
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}

    def caught_up(self, topic: str, ends: Mapping[int, int]) -> bool:
        committed = self.committed(topic)
        return all(committed.get(partition, 0) >= end for partition, end in ends.items() if end)

    def close(self) -> None:
        self.admin.close()


def latest_usage(bootstrap: str, topic: str) -> dict[str, BudgetUsage]:
    """The latest snapshot of every budget key and window on the budget usage topic."""
    latest: dict[str, BudgetUsage] = {}
    for record in read_topic(bootstrap, topic):
        if record.value is not None:
            latest[record.key.decode()] = BudgetUsage.from_json(record.value)
    return latest


# --- /proc readings -------------------------------------------------------------------


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise KeyError(field_name)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_note() -> str:
    return f"{os.cpu_count()} CPUs, load average {load_average()} (shared machine)"


def note(text: str) -> None:
    print(f"[bench] {text}", flush=True)
