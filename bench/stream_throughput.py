"""Spans per second one stream worker accounts, against a raw consume + decode baseline.

`otlp_spans` (4 partitions) is pre-filled with realistic OTLP batches (see
`span_load.py`), then measured twice on the same broker and data:

* raw: one process consumes every message (aiokafka, and kafka-python without
  its pure-Python CRC check; the faster counts), parses it with protobuf `ParseFromString` and counts its
  spans. No attribution, no pricing, no aggregation, no producing.
* worker: one `python -m burnguard.stream` worker with many budgets over
  every scope, window kind and metric. The clock runs from Faust's "Ready"
  (partitions assigned, consumption starts) until the worker's group has
  committed the end offsets of both `otlp_spans` and the internal usage
  topic (every span decoded, priced, summed into deltas, and every delta
  added to the window totals). The budget usage snapshots are then checked
  against the calls and tool calls that were sent.

The clock's end falls after the last span was accounted: stage 2's last changes wait for the
changelog flush (`BURNGUARD_CHANGELOG_FLUSH_MS`, 1 s), and before 2026-12-04 (session 40) the
commit then waited for the commit timer too (here `BURNGUARD_COMMIT_INTERVAL_S=1`; 2.8 s by
default). `tail_s` in the RESULT line is that end: from the moment every OTLP message was
committed to the moment every usage record was (stage 2's last work, the flush, the commit).
A short run reads slower than the worker runs: compare runs of the same length only.

    .venv/bin/python bench/stream_throughput.py [--spans 1000000] [--profile]
        [--plain-fraction 0.9] [--batch-min 10 --batch-max 20]
        [--tenants 200 --users-per-tenant 100 --calls-per-session 0]
        [--live] [--compare REV --rounds 1]

`--live` starts the worker on the empty topic, waits until it is ready (partitions assigned),
then produces the same load as fast as the producer goes; the clock runs from the first message
sent. Without it the worker starts on a pre-filled topic: a catch-up (stage 1 combines its
messages as live ones, `records.GroupRows`; before 2026-12-02 it sent them one by one, and
before that combining was off by default). `--compare REV` runs the worker of git revision REV (its
`contracts` and `stream`) on a fresh broker with the same load before this checkout's, `--rounds`
times alternating, and prints a RESULT line for each run (`code=old|new`); with two rounds or
more also one `stream_throughput_pairs` line, the median, lowest and highest of the rounds' new/old
ratios (one run moves ±10%: a step of a few percent needs `--rounds 6` or so to show).

`--plain-fraction 0.9` is a Collector firehose (90% non-GenAI spans); `--batch-min 10
--batch-max 20` the small messages `KafkaSpanExporter` writes for many tenants. Printed
besides spans/s: the worker's CPU per span and the Kafka records it wrote per span.
`--tenants`, `--users-per-tenant` and `--calls-per-session` set how many budget keys the
load touches (the defaults make every session new: each message opens fresh session keys).

`--profile` runs the worker under py-spy (installed on demand into the venv)
and prints where its time goes.

Every run also prints the worker's CPU per thread and what its main thread waited on (the GIL, a
core, nothing to do), from /proc (`thread_cpu.py`; threads named by py-spy if the venv has it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from pipeline_setup import (
    BenchPipeline,
    GroupOffsets,
    cpu_seconds,
    end_offsets,
    latest_usage,
    load_average,
    machine_note,
    note,
    produce_all,
    read_topic,
    topic_sizes,
)
from revisions import add_compare_arguments, alternating_runs, in_run_order, paired_ratios, ratio_summary
from span_load import BUDGETS_YAML, SpanMix, count_spans
from thread_cpu import ThreadSampler, ThreadSplit, find_py_spy

TARGET_SPANS_PER_S = 100_000
TARGET_RATIO = 0.5


def messages_until(spans: int, mix: SpanMix) -> Iterator[tuple[bytes, bytes]]:
    """Messages (key, value) until the mix has made at least `spans` spans."""
    while mix.spans < spans:
        yield mix.message()


def prefill(pipeline: BenchPipeline, spans: int, mix: SpanMix) -> tuple[int, int]:
    """Produce at least `spans` spans; return (spans, messages)."""
    started = time.monotonic()
    count = produce_all(pipeline.bootstrap, pipeline.topics.spans, messages_until(spans, mix))
    note(f"produced spans up to {mix.spans} in {count} messages in {time.monotonic() - started:.1f}s")
    return mix.spans, count


class LiveLoad(threading.Thread):
    """The load produced on a thread once the worker runs and has read a first few messages.

    Its messages are made before the clock starts (`warm_up`): made while sent, on two cores
    shared with the broker and the worker, they held the firehose shape (90% plain spans) to the
    generator's pace, ~63,000 spans/s, while the worker idled at 30% of a core.
    """

    #: messages sent (and committed by the worker) before the clock starts: every partition's
    #: first message after the assignment is read before the worker fetches its end offset
    WARM_UP_MESSAGES = 40

    def __init__(self, pipeline: BenchPipeline, spans: int, mix: SpanMix) -> None:
        super().__init__(daemon=True)
        self.pipeline, self.spans, self.mix = pipeline, spans, mix
        self.produced: tuple[int, int] | None = None
        self.failed: BaseException | None = None
        self.messages: list[tuple[bytes, bytes]] = []

    def warm_up(self, offsets: GroupOffsets, timeout: float = 60.0) -> None:
        """Send a few messages and wait until the worker committed them (it runs, not catches up)."""
        pipeline, mix = self.pipeline, self.mix
        produce_all(
            pipeline.bootstrap, pipeline.topics.spans, (mix.message() for _ in range(self.WARM_UP_MESSAGES))
        )
        deadline = time.monotonic() + timeout
        ends = end_offsets(pipeline.bootstrap, pipeline.topics.spans)
        while not offsets.caught_up(pipeline.topics.spans, ends):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not commit the warm-up messages")
            time.sleep(0.1)
        before, started = mix.spans, time.monotonic()
        self.messages = list(messages_until(before + self.spans, mix))
        self.spans = mix.spans - before
        note(f"made {self.spans} spans in {len(self.messages)} messages in {time.monotonic() - started:.1f}s")

    def run(self) -> None:
        try:
            started = time.monotonic()
            count = produce_all(self.pipeline.bootstrap, self.pipeline.topics.spans, self.messages)
            note(f"produced {self.spans} spans in {count} messages in {time.monotonic() - started:.1f}s")
            self.produced = (self.spans, count)
        except BaseException as exc:  # reported by the worker's loop
            self.failed = exc


def raw_kafka_python(bootstrap: str, topic: str, ends: dict[int, int]) -> tuple[int, float]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=16 << 20,
        max_poll_records=10_000,
        # Without the optional `crc32c` package kafka-python checks CRCs in pure Python, ~15x
        # slower than the decode itself; aiokafka checks them in C.
        check_crcs=False,
    )
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    spans = 0
    left = {tp.partition: ends[tp.partition] for tp in partitions}
    started = time.perf_counter()
    while any(left.values()):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                spans += count_spans(record.value)
            left[tp.partition] = max(0, ends[tp.partition] - (records[-1].offset + 1))
    elapsed = time.perf_counter() - started
    consumer.close()
    return spans, elapsed


async def _raw_aiokafka(bootstrap: str, topic: str, ends: dict[int, int]) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as AioPartition

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
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        spans = 0
        left = dict(ends)
        started = time.perf_counter()
        while any(left.values()):
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                for record in records:
                    spans += count_spans(record.value)
                left[tp.partition] = max(0, ends[tp.partition] - (records[-1].offset + 1))
        return spans, time.perf_counter() - started
    finally:
        await consumer.stop()


def raw_baseline(pipeline: BenchPipeline, expected: int) -> tuple[float, dict[str, float]]:
    ends = end_offsets(pipeline.bootstrap, pipeline.topics.spans)
    rates = {}
    bootstrap, topic = pipeline.bootstrap, pipeline.topics.spans
    for name, run in (
        ("kafka-python (no CRC check)", lambda: raw_kafka_python(bootstrap, topic, ends)),
        ("aiokafka", lambda: asyncio.run(_raw_aiokafka(bootstrap, topic, ends))),
    ):
        spans, elapsed = run()
        if spans != expected:
            raise AssertionError(f"raw {name} counted {spans} spans, expected {expected}")
        rates[name] = spans / elapsed
        note(f"raw {name}: {spans} spans in {elapsed:.2f}s = {rates[name]:,.0f} spans/s")
    return max(rates.values()), rates


def ensure_py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found:
        return found
    uv = Path(sys.executable).with_name("uv")
    note("installing py-spy into the venv for --profile")
    subprocess.run([str(uv), "pip", "install", "-q", "--python", sys.executable, "py-spy"], check=True)
    return str(Path(sys.executable).with_name("py-spy"))


def run_worker(
    pipeline: BenchPipeline,
    spans: int,
    timeout: float,
    profile: bool,
    live: LiveLoad | None = None,
    code: Path | None = None,
) -> dict[str, Any]:
    """Run the worker until it committed every span; `live`: the load starts once it is ready.

    `code`: the import path of another revision's `burnguard` (`revisions.export_revision`).
    """
    budgets = pipeline.write("budgets.yaml", BUDGETS_YAML)
    env = {
        "BURNGUARD_BUDGETS_FILE": str(budgets),
        "BURNGUARD_COMMIT_INTERVAL_S": "1.0",
        "BURNGUARD_SNAPSHOT_INTERVAL_S": "10",
    }
    # `python -m` would put its working directory (the checkout, whose `burnguard/` the editable
    # install extends with this checkout's `stream` and `contracts`) before PYTHONPATH
    env["PYTHONSAFEPATH"] = "1"
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), str(Path(__file__).resolve().parent)])
    if profile:
        py_spy = ensure_py_spy()
        raw = pipeline.root / "profile.txt"
        args = ["record", "--format", "raw", "--rate", "50", "--subprocesses", "-o", str(raw), "--"]
        args += [sys.executable, "-m", "burnguard.stream"]
        process = subprocess.Popen(
            [py_spy, *args],
            env=pipeline.env(env),
            stdout=pipeline.log_path("worker").open("ab"),
            stderr=subprocess.STDOUT,
        )
        pipeline.processes["worker"] = process
        pipeline.wait_for_log("worker", "[^Worker]: Ready", 180)
    else:
        process = pipeline.start_worker(env)
    offsets = GroupOffsets(pipeline.bootstrap, pipeline.app_id)
    if live is not None:
        live.warm_up(offsets)
        live.start()
    started = time.monotonic()
    worker_pid = _python_pid(process.pid)
    if worker_pid != process.pid:
        pipeline.child_pids["worker-python"] = worker_pid
    cpu_start = cpu_seconds(worker_pid)
    sampler = ThreadSampler(worker_pid, find_py_spy(sys.executable))
    sampler.start()
    broker_cpu_start = cpu_seconds(pipeline.broker.pid) if pipeline.broker.pid else 0.0
    ingest_done = 0.0
    try:
        if live is not None:
            while live.is_alive() and process.poll() is None:
                live.join(0.2)
            if live.failed is not None or live.produced is None:
                raise RuntimeError(f"the load generator failed: {live.failed!r}")
            spans = live.produced[0]
        spans_ends = end_offsets(pipeline.bootstrap, pipeline.topics.spans)
        deadline, report_at = started + timeout, started + 10
        while True:
            now = time.monotonic()
            if not ingest_done and offsets.caught_up(pipeline.topics.spans, spans_ends):
                ingest_done = now
            usage_ends = end_offsets(pipeline.bootstrap, pipeline.topics.usage)
            if ingest_done and offsets.caught_up(pipeline.topics.usage, usage_ends):
                break
            if process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{pipeline.log('worker')[-3000:]}")
            if now > report_at or now > deadline:
                report_at += 10
                ingested = sum(max(o, 0) for o in offsets.committed(pipeline.topics.spans).values())
                accounted = sum(max(o, 0) for o in offsets.committed(pipeline.topics.usage).values())
                note(
                    f"{now - started:.0f}s: committed {ingested}/{sum(spans_ends.values())} OTLP messages, "
                    f"{accounted}/{sum(usage_ends.values())} usage records; "
                    f"worker CPU {cpu_seconds(worker_pid) - cpu_start:.1f}s"
                )
                if now > deadline:
                    raise TimeoutError(f"the worker did not account every span in {timeout:.0f}s")
            time.sleep(0.1)
        finished = time.monotonic()
        worker_cpu = cpu_seconds(worker_pid) - cpu_start
        threads = sampler.stop()
        broker_cpu = (cpu_seconds(pipeline.broker.pid) - broker_cpu_start) if pipeline.broker.pid else 0.0
    finally:
        offsets.close()
    elapsed = finished - started
    deltas = sum(usage_ends.values())
    note(
        f"worker: {spans} spans in {elapsed:.2f}s (ingest committed after {ingest_done - started:.2f}s), "
        f"{deltas} usage records ({spans / deltas:.0f} spans per record: one per OTLP message and usage "
        "partition, plus refresh ticks)"
    )
    note(
        f"CPU during the run: worker {worker_cpu:.1f}s ({worker_cpu / elapsed:.0%} of one core), "
        f"broker {broker_cpu:.1f}s; {spans / worker_cpu:,.0f} spans per worker CPU-second"
    )
    for line in threads.lines():
        note(line)
    if ingest_done:  # the catch-up, then stage 2's rest and the commits after the last record
        note(f"main thread until every span was committed: {threads.states_between(started, ingest_done)}")
        note(
            f"main thread after, until each usage record was: {threads.states_between(ingest_done, finished)}"
        )
    return {
        "threads": threads,
        "elapsed": elapsed,
        "tail_s": finished - ingest_done,
        "spans_per_s": spans / elapsed,
        "deltas": deltas,
        "worker_cpu": worker_cpu,
        "spans_per_cpu_s": spans / worker_cpu,
    }


def _python_pid(pid: int) -> int:
    """The worker's own pid (under py-spy, the launcher's child)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for _ in range(50):
        if "py-spy" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return pid
        kids = children.read_text().split() if children.exists() else []
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    return pid


def check_totals(pipeline: BenchPipeline, mix: SpanMix, wait_s: float = 90.0) -> None:
    """The snapshots must count every model call and tool call once."""
    deadline = time.monotonic() + wait_s
    calls = tools = 0.0
    while time.monotonic() < deadline:
        usage = latest_usage(pipeline.bootstrap, pipeline.topics.budget_usage)
        totals: Counter[str] = Counter()
        for snapshot in usage.values():
            totals[snapshot.budget] += snapshot.spent
        calls, tools = totals["service-calls"], totals["service-tool-calls"]
        if calls == mix.model_calls and tools == mix.tool_calls:
            waited = wait_s - (deadline - time.monotonic())
            note(
                f"snapshots: {int(calls)} calls, {int(tools)} tool calls over {len(usage)} budget windows "
                f"(after {waited:.0f}s: the snapshot timer's backlog)"
            )
            return
        time.sleep(2)
    raise AssertionError(
        f"snapshots count {calls} calls and {tools} tool calls; "
        f"{mix.model_calls} and {mix.tool_calls} were sent"
    )


#: (what, a frame marker): inclusive share of the worker's samples under each.
PROFILE_PARTS = [
    ("stage 1 agent (_ingest), all of it", "BudgetJob._ingest (stream/app.py"),
    ("  decode + span checks (decode_spans)", "decode_spans (contracts/otlp.py"),
    ("    span fields (_span_usage)", "_span_usage (contracts/otlp.py"),
    ("    span rules (span_problem)", "span_problem (contracts/span_checks.py"),
    ("  budget matching + sums (usage_rows)", "usage_rows (stream/accounting.py"),
    ("    delta rows of a group (_targets)", "_targets (stream/accounting.py"),
    ("    pricing (price_if_unpriced)", "price_if_unpriced (contracts/pricing.py"),
    ("  usage records (_batch_records)", "BudgetJob._batch_records (stream/app.py"),
    ("  duplicate digests (digest)", "digest (stream/duplicates.py"),
    ("stage 2 agent (_account), all of it", "BudgetJob._account (stream/app.py"),
    ("  Faust decoding the usage records (loads_value)", "loads_value ("),
    ("  adding rows (_apply)", "BudgetJob._apply (stream/app.py"),
    ("    deciding (changed_signal)", "changed_signal (stream/policy.py"),
    ("  signals (_send_signal)", "BudgetJob._send_signal (stream/app.py"),
    ("    their log lines (logging)", "BudgetJob._send_signal (stream/app.py;Logger."),
    ("changelog writes (TableChanges.write)", "TableChanges.write (stream/changelog.py"),
    ("  encoding (take_records)", "TableChanges.take_records (stream/changelog.py"),
    ("  encoding (_encoded)", "_encoded (stream/changelog.py"),
    ("  into record batches (TableChanges._hand_over)", "TableChanges._hand_over (stream/changelog.py"),
    ("batch hand-over, changelog + snapshots (RecordBatches._hand_over)", "RecordBatches._hand_over ("),
    ("snapshot timer (_snapshot)", "BudgetJob._snapshot (stream/app.py"),
    ("  building one (_usage_snapshot)", "BudgetJob._usage_snapshot (stream/app.py"),
    ("  into record batches (UsageSnapshots.write)", "UsageSnapshots.write (stream/snapshots.py"),
    ("snapshot deliveries settled (UsageSnapshots._settle)", "UsageSnapshots._settle (stream/snapshots.py"),
    ("refresh timer (_refresh)", "BudgetJob._refresh (stream/app.py"),
    ("aiokafka producer code (batching, sending)", "aiokafka/producer"),
    ("aiokafka consumer code (fetching, parsing)", "aiokafka/consumer"),
    ("Faust conductor / stream dispatch", "Conductor."),
    ("event loop select (idle)", "EpollSelector.select"),
]
#: The frame a stack of a thread other than the main one (the event loop's) starts from.
OTHER_THREAD = "Thread._bootstrap ("


def print_profile(path: Path, top: int = 15) -> None:
    """Where the worker's main thread (the event loop) spent its time, from py-spy's raw output.

    The shares are of the main thread's samples only: the Kafka client's and the signal
    checkpoints' threads are counted apart (their share of all samples is printed).
    """
    self_time: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    samples = other_threads = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if any(frame.startswith(OTHER_THREAD) for frame in frames[:3]):
            other_threads += count
            continue
        samples += count
        self_time[frames[-1]] += count
        # a revision imported from an exported tree shows its files under `burnguard/`
        flat = ";".join(frame.split(":")[0].replace("(burnguard/", "(") for frame in frames)
        for what, marker in PROFILE_PARTS:
            if marker in flat:
                parts[what] += count
    total = max(samples + other_threads, 1)
    print(
        f"\nprofile of the worker's main thread: {samples} samples (py-spy, 50 Hz, on-CPU); "
        f"other threads {other_threads} ({other_threads / total:.1%} of all)"
    )
    samples = max(samples, 1)
    for what, _marker in PROFILE_PARTS:
        print(f"  {parts[what] / samples:6.1%}  {what}")
    print("top self time (main thread):")
    for frame, count in self_time.most_common(top):
        print(f"  {count / samples:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=1_000_000, help="spans to pre-fill (default 1000000)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds the worker may take")
    parser.add_argument("--profile", action="store_true", help="run the worker under py-spy")
    parser.add_argument("--keep", action="store_true", help="keep the broker dir and logs")
    parser.add_argument(
        "--plain-fraction",
        type=float,
        default=SpanMix.plain_fraction,
        help=f"fraction of non-GenAI spans (default {SpanMix.plain_fraction})",
    )
    parser.add_argument("--batch-min", type=int, default=SpanMix.batch_min, help="spans per message, least")
    parser.add_argument("--batch-max", type=int, default=SpanMix.batch_max, help="spans per message, most")
    parser.add_argument("--tenants", type=int, default=SpanMix.tenants, help="tenants (default %(default)s)")
    parser.add_argument(
        "--users-per-tenant",
        type=int,
        default=SpanMix.users_per_tenant,
        help="users per tenant (default %(default)s)",
    )
    parser.add_argument(
        "--calls-per-session",
        type=int,
        default=SpanMix.calls_per_session,
        help="spans a user's session makes across messages (default 0: new sessions in every message)",
    )
    parser.add_argument("--live", action="store_true", help="produce the load once the worker is ready")
    add_compare_arguments(parser, rounds=1)
    args = parser.parse_args()

    components = ("contracts", "stream")
    runs = alternating_runs(
        args.compare, args.rounds, components, lambda: one_run(args), lambda old: one_run(args, old)
    )
    for code, result in in_run_order(runs):
        report(args, result, code)
    if len(runs["old"]) > 1:
        report_pairs(runs)


def report_pairs(runs: dict[str, list[dict[str, Any]]]) -> None:
    """The spread of the rounds' new/old ratios of spans/s and of spans per worker CPU-second
    (above 1: the new code is faster, or spends less CPU per span)."""
    speed = paired_ratios(runs, lambda run: run["spans_per_s"])
    cpu = paired_ratios(runs, lambda run: run["spans_per_cpu_s"])
    print(f"\n{len(speed)} pairs, new/old spans/s: " + ", ".join(f"{ratio:.3f}" for ratio in speed))
    print(
        f"RESULT stream_throughput_pairs pairs={len(speed)} {ratio_summary('speedup', speed)} "
        f"{ratio_summary('cpu_speedup', cpu)}"
    )


def one_run(args: argparse.Namespace, code: Path | None = None) -> dict[str, float]:
    """One broker, one load (the same seed each run), the raw baseline and one worker."""
    mix = SpanMix.from_args(args)
    with BenchPipeline("stream_throughput", keep=args.keep) as pipeline:
        live = LiveLoad(pipeline, args.spans, mix) if args.live else None
        raw = 0.0
        if live is None:
            prefill(pipeline, args.spans, mix)
            raw, _ = raw_baseline(pipeline, mix.spans)
        worker = run_worker(pipeline, mix.spans, args.timeout, args.profile, live, code)
        spans, messages = mix.spans, end_offsets_total(pipeline)
        note(
            f"{mix.model_calls} LLM calls, {mix.tool_spans} tool spans, "
            f"{spans - mix.model_calls - mix.tool_spans} plain spans; {len(mix.calls_by_user)} users, "
            f"{mix.sessions} sessions; "
            f"{spans / messages:.0f} spans per message"
        )
        check_totals(pipeline, mix)
        written = {t: n for t, n in topic_sizes(pipeline.bootstrap).items() if t != pipeline.topics.spans}
        records_per_span = sum(written.values()) / spans
        note(
            "records the worker had written when the totals were checked, per span: "
            f"{records_per_span:.3f} "
            f"({', '.join(f'{t} {n}' for t, n in sorted(written.items(), key=lambda i: -i[1]) if n)})"
        )
        usage_per_span = written.get(pipeline.topics.usage, 0) / spans
        rows_per_span = usage_rows_written(pipeline) / spans
        note(f"delta rows stage 1 sent per span: {rows_per_span:.3f}")
        if args.profile:
            pipeline.stop_child("worker-python")  # py-spy writes its file when the worker exits
            pipeline.processes["worker"].wait(60)
            print_profile(pipeline.root / "profile.txt")
        if live is not None:  # the same topic, read with the worker stopped
            pipeline.stop("worker")
            raw, _ = raw_baseline(pipeline, spans)
    return {
        **worker,
        "raw": raw,
        "spans": spans,
        "messages": messages,
        "records_per_span": records_per_span,
        "usage_records_per_span": usage_per_span,
        "rows_per_span": rows_per_span,
        "load": load_average(),
    }


def usage_rows_written(pipeline: BenchPipeline) -> int:
    """Delta rows in the usage topic's `batches` records: what stage 1 sent and stage 2 added."""
    rows = 0
    for record in read_topic(pipeline.bootstrap, pipeline.topics.usage):
        value = json.loads(record.value)
        if value.get("kind") in ("batches", "groups"):  # `groups`: with combined rows
            rows += sum(len(batch[2]) for batch in value["batches"])
    return rows


def end_offsets_total(pipeline: BenchPipeline) -> int:
    return sum(end_offsets(pipeline.bootstrap, pipeline.topics.spans).values())


def report(args: argparse.Namespace, run: dict[str, Any], code: str) -> None:
    spans, messages, raw = run["spans"], run["messages"], run["raw"]
    threads: ThreadSplit = run["threads"]
    ratio = run["spans_per_s"] / raw
    cpu_us = 1e6 / run["spans_per_cpu_s"]
    print(f"\nmachine: {machine_note()}")
    print(
        f"code {code}{' (' + args.compare + ')' if code == 'old' else ''}; "
        f"{'live load' if args.live else 'pre-filled topic (catch-up)'}; "
        f"shape: {spans / messages:.0f} spans per message ({args.batch_min}-{args.batch_max}), "
        f"plain fraction {args.plain_fraction}; {args.tenants} tenants x {args.users_per_tenant} users, "
        f"calls per session {args.calls_per_session or 'new per message'}"
    )
    print(
        f"worker {run['spans_per_s']:,.0f} spans/s (target {TARGET_SPANS_PER_S:,}), "
        f"raw {raw:,.0f} spans/s, ratio {ratio:.3f} (target {TARGET_RATIO}); "
        f"worker CPU {cpu_us:.1f} µs per span, {run['records_per_span']:.3f} Kafka records written per span"
    )
    print(
        f"RESULT stream_throughput code={code} live={int(args.live)} spans_per_s={run['spans_per_s']:.0f} "
        f"raw_spans_per_s={raw:.0f} ratio_vs_raw={ratio:.3f} worker_cpu_us_per_span={cpu_us:.1f} "
        f"records_per_span={run['records_per_span']:.3f} "
        f"usage_records_per_span={run['usage_records_per_span']:.4f} "
        f"delta_rows_per_span={run['rows_per_span']:.3f} tail_s={run['tail_s']:.2f} "
        f"{threads.result_fields()} "
        f"spans_per_message={spans / messages:.0f} "
        f"plain_fraction={args.plain_fraction} tenants={args.tenants} "
        f"users_per_tenant={args.users_per_tenant} "
        f'calls_per_session={args.calls_per_session} load="{run["load"]}"'
    )


if __name__ == "__main__":
    main()
