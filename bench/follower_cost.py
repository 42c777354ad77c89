"""CPU the worker's signal checkpoint writer takes to follow `burnguard.signals`, per signal.

Every worker follows the signals topic on a thread (`stream/signal_checkpoints.py`) and reads back
every signal it published. Its threads (the follower, kafka-python's IO thread, the checkpoint
producer's sender) hold the GIL the worker's event loop waits for. This runs the writer on a real
broker while a thread of this process publishes signals at `--rate` (noting each in
`PublishedSignals`, as the worker does), and reads the CPU of the writer's threads from /proc.

Each setting is followed three ways (`WAYS`): as at 4704c5e (fetches read by kafka-python's own
record reader, a poll every 200 ms), with aiokafka's C reader (`contracts/fetched_batches.py`, what a
worker with the stream extra runs) still polling every 200 ms, and as now (C reader, the writer's
`poll_timeout_ms`). `--options` names consumer settings to try besides the writer's own
(`consumer_options`). The same load for `--seconds` each, the variants alternating `--rounds`
times. The RESULT line holds the writer's own settings' median CPU per signal read back each way,
and the ratio of the base to now.

    .venv/bin/python bench/follower_cost.py [--rate 1000] [--seconds 20] [--rounds 2]
        [--options 'fetch_min_bytes=1,fetch_max_wait_ms=500' ...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from burnguard.contracts import fetched_batches
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.stream.signal_checkpoints import PublishedSignals, SignalCheckpointWriter
from kafka import KafkaProducer
from pipeline_setup import BenchPipeline, load_average, note
from thread_cpu import thread_cpu_s

#: the writer's threads are named after its follower thread (`burnguard-checkpoints`)
WRITER_THREADS = "burnguard-checkpoints"
#: how the writer reads: the reader of fetched record batches (None: kafka-python's own) and how long
#: a poll waits (None: the writer's own `poll_timeout_ms`)
WAYS: dict[str, tuple[Any, int | None]] = {
    "base": (None, 200),
    "C reader": (fetched_batches.native_partition_records, 200),
    "now": (fetched_batches.native_partition_records, None),
}


def a_signal(n: int, keys: int) -> Signal:
    """The n-th signal of the load: `keys` users' daily budgets, each signal newer than the last."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    spent = 10.0 + n % 1000 / 100
    return Signal(
        scope="tenant+user",
        key=f"tenant-{n % 20}/user-{n % keys}",
        budget="user-daily",
        action=("ok", "warn", "downgrade", "throttle")[n % 4],
        spent=spent,
        limit=20.0,
        ratio=spent / 20.0,
        window_start=day,
        window_end=day + timedelta(days=1),
        burn_rate_per_hour=1.5,
        issued_at=now,
        expires_at=now + timedelta(minutes=2),
        reason=f"spent {spent:.4f} of 20 USD in the day",
    )


class Publisher(threading.Thread):
    """Publishes signals at `rate` per second until stopped, noting each as the worker does."""

    def __init__(self, bootstrap: str, topic: str, rate: int, published: PublishedSignals) -> None:
        super().__init__(daemon=True, name="publisher")
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks=1)
        self._topic, self._rate, self._published = topic, rate, published
        self._stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        started = time.monotonic()
        for n in itertools.count():
            if self._stop_event.is_set():
                break
            signal = a_signal(n, keys=2_000)
            key, value = signal.kafka_key.encode(), signal.to_json()
            self._published.note(key, value, signal)
            self._producer.send(self._topic, key=key, value=value)
            self.sent += 1
            ahead = started + self.sent / self._rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._producer.close()


def writer_threads_cpu() -> tuple[float, float]:
    """CPU seconds so far of this process's threads named after the writer: (the follower, the
    others: its consumer's IO thread and its checkpoint producer's sender)."""
    follower = others = 0.0
    for thread in threading.enumerate():
        if WRITER_THREADS in thread.name and thread.native_id is not None:
            cpu = thread_cpu_s(thread.native_id)
            if thread.name == WRITER_THREADS:
                follower += cpu
            else:
                others += cpu
    return follower, others


def parse_options(text: str) -> dict[str, Any]:
    """`a=1,b=2` -> {"a": 1, "b": 2} (integers)."""
    return {k: int(v) for k, v in (pair.split("=") for pair in text.split(",") if pair)}


def one_variant(
    kafka: KafkaSettings,
    topics: Topics,
    published: PublishedSignals,
    options: dict[str, Any] | None,
    poll_timeout_ms: int | None,
    seconds: float,
) -> tuple[float, float, int]:
    """Follow for `seconds` with `options` and `poll_timeout_ms` (None: the writer's own);
    (follower CPU s, its other threads' CPU s, records read)."""

    class Writer(SignalCheckpointWriter):
        if options is not None:
            consumer_options = options

    if poll_timeout_ms is not None:
        Writer.poll_timeout_ms = poll_timeout_ms

    writer = Writer(kafka, topics, timedelta(seconds=30), published=published)
    writer.start(wait_s=60)
    time.sleep(2)  # past the replay of what earlier variants left
    read_before = sum(writer.positions.values())
    follower_before, others_before = writer_threads_cpu()
    time.sleep(seconds)
    follower, others = writer_threads_cpu()
    read = sum(writer.positions.values()) - read_before
    writer.stop()
    return follower - follower_before, others - others_before, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000, help="signals published per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds each variant follows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--options", action="append", default=[], help="consumer settings to try: a=1,b=2")
    args = parser.parse_args()
    settings: list[tuple[str, dict[str, Any] | None]] = [("writer's own", None)]
    settings += [(text, parse_options(text)) for text in args.options]
    if fetched_batches.native_partition_records is None:
        parser.error("aiokafka's C record reader is not installed: there is nothing to compare")
    per_signal: dict[str, list[float]] = {name: [] for name in WAYS}
    with BenchPipeline("follower_cost") as pipeline:
        topics = Topics()
        pipeline.broker.create_topic(topics.signals, partitions=4, compact=True)
        pipeline.broker.create_topic(topics.signal_checkpoints, partitions=1, compact=True)
        kafka = KafkaSettings(bootstrap=pipeline.bootstrap)
        published = PublishedSignals()
        publisher = Publisher(pipeline.bootstrap, topics.signals, args.rate, published)
        publisher.start()
        try:
            for _round in range(args.rounds):
                for (name, options), (way, (reader, poll_ms)) in itertools.product(settings, WAYS.items()):
                    fetched_batches.native_partition_records = reader
                    follower, others, read = one_variant(
                        kafka, topics, published, options, poll_ms, args.seconds
                    )
                    cpu, us = follower + others, 1e6 * (follower + others) / max(read, 1)
                    if options is None:
                        per_signal[way].append(us)
                    note(
                        f"{name}, {way}: {read} signals read in {args.seconds:.0f}s, writer threads "
                        f"{cpu:.2f}s CPU ({cpu / args.seconds:.1%} of a core; follower {follower:.2f}s, "
                        f"IO and producer {others:.2f}s), {us:.1f} us a signal; load {load_average()}"
                    )
        finally:
            publisher.stop()
    medians = {way: statistics.median(values) for way, values in per_signal.items()}
    print(
        f"RESULT follower_cost rate={args.rate} seconds={args.seconds:g} rounds={args.rounds} "
        f"base_us={medians['base']:.1f} c_reader_us={medians['C reader']:.1f} now_us={medians['now']:.1f} "
        f"ratio={medians['base'] / medians['now']:.2f} load={load_average()}"
    )


if __name__ == "__main__":
    main()
