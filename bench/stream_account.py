"""In-process CPU per row and per span of the stream worker's stage 2: usage records to totals and signals.

No broker: stage 1 of this checkout (`BudgetJob._ingest_one`, the worker's own code) turns the
seeded `span_load.py` load into the `batches` records it would send to the usage topic (their
JSON bytes, as on the wire), in micro-batches ended as the worker's under a backlog: at
`BURNGUARD_INGEST_BATCH_BYTES` (16 MiB) of message values or `INGEST_BATCH_MESSAGES` (4,000)
messages, whichever comes first; `--messages-per-batch N` ends them at N messages instead. Then a
fresh `BudgetJob` (`span_load.BUDGETS_YAML`, the worker's default settings) accounts them
through its real stage-2 code, in the order a usage partition's stream would hand them over:

* decode: the JSON of each record decoded as Faust decodes the usage topic's values
  (`app.serializers.loads_value(None, payload, serializer=...)` with the usage topic's codec), alone.
* stage2: each record decoded so, then `BudgetJob._account_one` on it, with `changes.partition`
  and `changes.processed` set as `_account` sets them, and the table changes taken
  (`TableChanges.take_records`: the changelog's JSON) after every `--flush-records` records.
  Signals go through `_send_signal` into a real aiokafka producer that never connects
  (`OfflineProducer`: what handing a signal over costs, up to the producer's accumulator), with
  the signal log line written at INFO to a file, as a worker's log is.
* gc: of `stage2`, the CPU time spent in garbage collections (timed by a `gc.callbacks` hook).
* log: the signal log lines of a run written again through the same logger and file handler,
  alone: what the log line of a signal costs (a share of `stage2` too small to see as a
  difference between runs with and without it). A revision that logs each signal at DEBUG (the
  worker's level is INFO) writes none: 0 here, its summary line comes from the snapshot timer.

The Faust tables are the worker's own (`store="memory://"`): `table.data` is Faust's in-memory
store, whose own `.data` is a plain dict; nothing is replaced. A revision whose `run_worker`
freezes the start-up heap (`freeze_startup_heap`) gets it frozen after its job is built, as its
worker would. Each figure is the best of `--repeat` runs of CPU time (`time.process_time`), each
run on a fresh job (built outside the timed part), per delta row and per span of the load (plain
HTTP spans included).

    .venv/bin/python bench/stream_account.py [--spans 30000] [--batch-min 40 --batch-max 260]
        [--tenants 200 --users-per-tenant 100 --calls-per-session 0] [--repeat 5] [--combine on|off]
        [--compare REV] [--rounds 2] [--profile]

`--combine off` makes stage 1 send every message's rows alone (`BURNGUARD_COMBINE_MESSAGES=false`):
stage 2's cost per span of combined rows (with steps) against per-message rows, same code.
`--compare REV` also measures the stage-2 code of git revision REV (its `burnguard`, `contracts`
and `stream` trees, exported to a scratch directory and imported first in a child process) on
the same records (written once by this checkout's stage 1), alternating old and new `--rounds`
times, and prints both in the RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import math
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline_setup import BenchPipeline
from revisions import add_compare_arguments, alternating_runs, child_result
from span_load import BUDGETS_YAML, SpanMix

COMPARED_COMPONENTS = ("contracts", "stream")
T = TypeVar("T")
#: The worker's log format (Faust's default), so a signal's log line costs what it costs there.
LOG_FORMAT = "[%(asctime)s] [%(process)s] [%(levelname)s] %(message)s"


@dataclass
class Message:
    """What `_ingest_one` and `_account` read of a Kafka message."""

    partition: int
    offset: int
    topic: str
    timestamp: float
    timestamp_type: int = 1  # LogAppendTime

    @property
    def tp(self) -> Any:
        from faust.types import TP

        return TP(self.topic, self.partition)


@dataclass
class Event:
    message: Message
    value: Any
    key: bytes = b""


class OfflineProducer:
    """Stands in for the worker's aiokafka producer: a real one that never connects, its topics'
    metadata filled in, so handing it a signal (`send`, or the append to its open batch) costs
    what it costs in the worker, up to the producer's accumulator; nothing drains it (its batch
    size is large enough that none fills). `sent`: the records it holds, per topic.
    """

    def __init__(self, topics: list[str], partitions: int) -> None:
        self.topics = topics
        self.partitions = partitions
        self._inner: Any = None

    def real(self) -> Any:
        """The aiokafka producer, made at the first use (inside the event loop it then belongs to)."""
        if self._inner is None:
            from aiokafka import AIOKafkaProducer
            from aiokafka.structs import PartitionMetadata
            from burnguard.stream.partitioner import producer_partitioner

            self._inner = AIOKafkaProducer(
                bootstrap_servers="127.0.0.1:9", partitioner=producer_partitioner, max_batch_size=1 << 30
            )
            cluster = self._inner.client.cluster
            for topic in self.topics:
                cluster._partitions[topic] = {
                    p: PartitionMetadata(topic, p, 0, [0], [0], 0) for p in range(self.partitions)
                }
        return self._inner

    @property
    def sent(self) -> dict[str, int]:
        if self._inner is None:
            return {}
        counts: dict[str, int] = {}
        for tp, batches in self._inner._message_accumulator._batches.items():
            counts[tp.topic] = counts.get(tp.topic, 0) + sum(batch.record_count for batch in batches)
        return counts


def new_job(data_dir: Path, combine: bool = True) -> Any:
    """A worker's job with the bench budgets, its producer one that never sends (`OfflineProducer`)."""
    from burnguard.contracts.budgets import parse_budget_yaml
    from burnguard.stream.app import BudgetJob
    from burnguard.stream.settings import StreamSettings

    settings = StreamSettings(data_dir=data_dir, app_id=f"account-bench-{os.getpid()}")
    settings.combine_messages = combine
    job = BudgetJob(settings, parse_budget_yaml(BUDGETS_YAML))
    job.recent.primed.update(range(settings.partitions))  # no broker to read back from
    job.dead_letters.stale = False
    topics = [getattr(settings.topics, name) for name in settings.topics.__dataclass_fields__]
    producer = OfflineProducer(topics, settings.partitions)
    job.app.producer._ensure_producer = producer.real  # the aiokafka producer itself, as in the worker
    job.bench_producer = producer
    return job


def as_the_worker_starts(job: Any) -> Any:
    """What `run_worker` does with a new job before it runs, where this revision does it."""
    import burnguard.stream.app as app

    if hasattr(app, "freeze_startup_heap"):
        app.freeze_startup_heap()
    return job


def make_records(args: argparse.Namespace, data_dir: Path) -> tuple[list[tuple[int, bytes]], int, int]:
    """((usage partition, record JSON), spans, delta rows): stage 1's records for the load.

    Each message goes to the `otlp_spans` partition its tenant key hashes to, as the exporters'
    producers send it: stage 1 combines a key's rows per source partition, so spreading a
    tenant's messages over all partitions would make up to four times the rows.
    """
    from burnguard.stream.partitioner import key_partition
    from burnguard.stream.records import MicroBatch

    mix = SpanMix.from_args(args)
    job = new_job(data_dir, args.combine == "on")
    max_messages, max_bytes = micro_batch_bounds(args)
    records: list[tuple[int, bytes]] = []
    offsets: dict[int, int] = {}  # each source partition's last offset
    while mix.spans < args.spans:
        batch = MicroBatch(1000)
        groups: dict[int, Any] = {}
        messages, size = 0, 0
        while messages < max_messages and size < max_bytes:
            key, value = mix.message()
            partition = key_partition(key, BenchPipeline.spans_partitions)
            offsets[partition] = offset = offsets.get(partition, -1) + 1
            message = Message(partition, offset, "otlp_spans", time.time())
            job._ingest_one(Event(message, value, key), batch, groups)
            messages, size = messages + 1, size + len(value)
        for partition, group in groups.items():
            job._close_group(partition, group, batch)
        for partition, record in batch.records():
            records.append((partition, json.dumps(record, separators=(",", ":")).encode()))
    rows = sum(len(sub[2]) for _, payload in records for sub in json.loads(payload)["batches"])
    return records, mix.spans, rows


def micro_batch_bounds(args: argparse.Namespace) -> tuple[int, float]:
    """(messages, bytes of message values) that end a micro-batch: the worker's, or `--messages-per-batch`."""
    if args.messages_per_batch:
        return args.messages_per_batch, math.inf
    from burnguard.stream.app import INGEST_BATCH_MESSAGES
    from burnguard.stream.settings import StreamSettings

    return INGEST_BATCH_MESSAGES, StreamSettings.from_env().ingest_batch_bytes


def compared_runs(
    args: argparse.Namespace,
    scratch: Path,
    measure_child: Callable[[argparse.Namespace, Path, Path | None], T],
) -> tuple[dict[str, list[T]], Path, int, int, int]:
    """Stage 1's records for the load (`make_records`) written to `scratch` as a child reads them,
    then `measure_child` on them for this checkout and for `--compare`'s revision, alternating
    (`revisions.alternating_runs`): (the runs, the records' file, usage records, spans, delta rows)."""
    records, spans, rows = make_records(args, scratch / "stage1")
    records_file = scratch / "records.json"
    payloads = [(partition, payload.decode()) for partition, payload in records]
    records_file.write_text(json.dumps({"records": payloads, "spans": spans, "rows": rows}))
    runs = alternating_runs(
        args.compare,
        args.rounds,
        COMPARED_COMPONENTS,
        lambda: measure_child(args, records_file, None),
        lambda old_path: measure_child(args, records_file, old_path),
    )
    return runs, records_file, len(records), spans, rows


def usage_serializer(job: Any) -> Any:
    """The codec the revision's usage topic decodes with (Faust's `json` before 2026-12-03)."""
    return job.usage_topic.value_serializer or "json"


def decode_all(job: Any, records: list[tuple[int, bytes]]) -> None:
    """The records' decoding alone, each dropped after it (as `account_all` decodes them)."""
    loads, serializer = job.app.serializers.loads_value, usage_serializer(job)
    for _, payload in records:
        loads(None, payload, serializer=serializer)


def account_all(job: Any, records: list[tuple[int, bytes]], flush_records: int) -> int:
    """Stage 2 over every record as `_account` runs it, each decoded first; the changelog records written.

    Each record is decoded right before it is accounted and then dropped, as in the worker: a
    list of every decoded record would make each garbage collection walk all their rows.
    """
    changes = job.changes
    loads, serializer = job.app.serializers.loads_value, usage_serializer(job)
    written = 0

    async def run() -> None:
        nonlocal written
        for offset, (partition, payload) in enumerate(records):
            changes.partition = partition
            await job._account_one(loads(None, payload, serializer=serializer))
            changes.processed(Message(partition, offset, "burnguard.usage", 0.0).tp, offset)
            if (offset + 1) % flush_records == 0:
                written += len(changes.take_records())
        written += len(changes.take_records())

    asyncio.run(run())
    return written


def configure_log(path: Path) -> None:
    """The worker's logging: INFO and up, to a file, in Faust's format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class SignalLines(logging.Handler):
    """Keeps the signal log records of a run (message and arguments), to write them again."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, tuple[Any, ...]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("signal "):
            self.lines.append((record.msg, record.args))


def log_seconds(lines: list[tuple[str, tuple[Any, ...]]], repeat: int) -> float:
    """Least CPU time to log `lines` again through the job's logger, as `_send_signal` logs them."""
    logger = logging.getLogger("burnguard.stream.app")
    fastest = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for message, args in lines:
            logger.info(message, *args)
        fastest = min(fastest, time.process_time() - started)
    return fastest


class CollectionTime:
    """CPU seconds spent in garbage collections while installed (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started

    def __enter__(self) -> CollectionTime:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self)


def best(args: argparse.Namespace, records: list[tuple[int, bytes]], scratch: Path) -> dict:
    """Best CPU seconds of decode, stage 2 and signal logging over `--repeat` fresh jobs."""
    configure_log(scratch / "worker.log")
    figures = {"decode": float("inf"), "stage2": float("inf"), "gc": float("inf")}
    counts: dict[str, int] = {}
    lines = SignalLines()
    for run in range(args.repeat):
        job = as_the_worker_starts(new_job(scratch / f"job-{run}"))
        gc.collect()
        started = time.process_time()
        decode_all(job, records)
        figures["decode"] = min(figures["decode"], time.process_time() - started)
        lines.lines.clear()
        logging.getLogger().addHandler(lines)
        gc.collect()
        started = time.process_time()
        with CollectionTime() as collecting:
            written = account_all(job, records, args.flush_records)
        figures["stage2"] = min(figures["stage2"], time.process_time() - started)
        figures["gc"] = min(figures["gc"], collecting.seconds)
        logging.getLogger().removeHandler(lines)
        sent = job.bench_producer.sent
        signals = sent.get(job.settings.topics.signals, 0)
        counts = {"changelog": written, "signals": signals, "replayed": job.replayed_deltas}
        counts["errors"] = job.agent_errors
    figures["log"] = log_seconds(lines.lines, args.repeat)
    counts["signal_lines"] = len(lines.lines)
    return {"seconds": figures, "counts": counts}


def measure(args: argparse.Namespace, records_file: Path) -> dict[str, Any]:
    """The figures of the code this process imports, on the records in `records_file`."""
    import burnguard.stream.app as app

    load = json.loads(records_file.read_text())
    records = [(partition, payload.encode()) for partition, payload in load["records"]]
    with tempfile.TemporaryDirectory() as scratch:
        run = best(args, records, Path(scratch))
    rows, spans, seconds = load["rows"], load["spans"], run["seconds"]
    lines = run["counts"]["signal_lines"]  # 0 where each signal is logged at DEBUG
    return {
        "code": app.__file__,
        "us_per_row": {name: s / rows * 1e6 for name, s in seconds.items()},
        "us_per_span": {name: s / spans * 1e6 for name, s in seconds.items()},
        "log_us_per_signal": seconds["log"] / lines * 1e6 if lines else 0.0,
        "counts": run["counts"],
    }


def measure_child(args: argparse.Namespace, records_file: Path, pythonpath: Path | None) -> dict[str, Any]:
    """`measure` in a fresh process: of the exported revision at `pythonpath` first on its path (its
    module path proves which), or of this checkout (None). Both sides run so, with the same heap
    to collect: the parent also holds stage 1's job and the load."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(records_file)]
    command += ["--repeat", str(args.repeat), "--flush-records", str(args.flush_records)]
    return child_result(command, pythonpath)


def profile(args: argparse.Namespace, records_file: Path, top: int = 30) -> None:
    load = json.loads(records_file.read_text())
    records = [(partition, payload.encode()) for partition, payload in load["records"]]
    with tempfile.TemporaryDirectory() as scratch:
        configure_log(Path(scratch) / "worker.log")
        job = new_job(Path(scratch) / "job")
        profiler = cProfile.Profile()
        profiler.enable()
        account_all(job, records, args.flush_records)
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def show(label: str, run: dict[str, Any]) -> None:
    print(f"{label} ({run['code']}):")
    for name, micros in run["us_per_row"].items():
        print(f"  {name:14s} {micros:6.2f} us/row  {run['us_per_span'][name]:6.2f} us/span")
    print(f"  log per signal {run['log_us_per_signal']:6.2f} us; counts {json.dumps(run['counts'])}")


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the least over the rounds (each already the best of `--repeat`)."""
    first = runs[0]
    merged = {"code": first["code"], "counts": first["counts"]}
    for unit in ("us_per_row", "us_per_span"):
        merged[unit] = {name: min(run[unit][name] for run in runs) for name in first[unit]}
    merged["log_us_per_signal"] = min(run["log_us_per_signal"] for run in runs)
    return merged


def _outputs(counts: dict[str, int]) -> dict[str, int]:
    """What both revisions must agree on: the INFO signal lines may differ (a revision logs them at DEBUG)."""
    return {name: count for name, count in counts.items() if name != "signal_lines"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=30_000, help="spans in the load (default 30000)")
    parser.add_argument("--batch-min", type=int, default=SpanMix.batch_min, help="spans per message, least")
    parser.add_argument("--batch-max", type=int, default=SpanMix.batch_max, help="spans per message, most")
    parser.add_argument("--tenants", type=int, default=SpanMix.tenants)
    parser.add_argument("--users-per-tenant", type=int, default=SpanMix.users_per_tenant)
    parser.add_argument("--calls-per-session", type=int, default=SpanMix.calls_per_session)
    parser.add_argument(
        "--messages-per-batch",
        type=int,
        default=0,
        help="OTLP messages per stage-1 micro-batch (default: the worker's bounds, 16 MiB or 4,000 messages)",
    )
    parser.add_argument(
        "--flush-records", type=int, default=200, help="usage records per changelog write (default 200)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts (default 5)")
    parser.add_argument(
        "--combine",
        choices=("on", "off"),
        default="on",
        help="stage 1 sums a micro-batch's messages per key with steps (on, the default) or not",
    )
    add_compare_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of stage 2")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("faust").setLevel(logging.WARNING)
    if args.child:
        print(json.dumps(measure(args, Path(args.child))))
        return

    with tempfile.TemporaryDirectory() as scratch_dir:
        runs, records_file, count, spans, rows = compared_runs(args, Path(scratch_dir), measure_child)
        if args.profile:
            profile(args, records_file)
    shape = (
        f"{spans} spans, {count} usage records, {rows} delta rows ({rows / spans:.2f} per span); "
        f"{args.batch_min}-{args.batch_max} spans/message, {args.tenants} tenants x {args.users_per_tenant} "
        f"users, calls per session {args.calls_per_session}; best of {args.repeat}"
    )
    print(f"load: {shape}")
    new = best_of(runs["new"])
    show("this checkout", new)
    per_row = new["us_per_row"]
    fields = " ".join(f"{name}_us_per_row={us:.2f}" for name, us in per_row.items())
    fields += f" stage2_us_per_span={new['us_per_span']['stage2']:.2f}"
    fields += f" signals={new['counts']['signals']} log_us_per_signal={new['log_us_per_signal']:.1f}"
    if runs["old"]:
        old = best_of(runs["old"])
        show(f"--compare {args.compare}", old)
        fields += " " + " ".join(f"old_{name}_us_per_row={us:.2f}" for name, us in old["us_per_row"].items())
        fields += f" old_stage2_us_per_span={old['us_per_span']['stage2']:.2f}"
        fields += f" stage2_speedup={old['us_per_row']['stage2'] / per_row['stage2']:.2f}"
        if _outputs(old["counts"]) != _outputs(new["counts"]):
            print(f"COUNTS DIFFER: old {old['counts']} new {new['counts']}")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    print(
        f"RESULT stream_account spans={spans} rows={rows} batch={args.batch_min}-{args.batch_max} "
        f"combine={args.combine} messages_per_batch={args.messages_per_batch or 'worker'} "
        f"tenants={args.tenants} users_per_tenant={args.users_per_tenant} "
        f"calls_per_session={args.calls_per_session} {fields}"
    )


if __name__ == "__main__":
    main()
