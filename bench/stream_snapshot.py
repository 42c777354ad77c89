"""In-process CPU per window of the stream worker's snapshot timer (`BudgetJob._snapshot`).

No broker: a fresh `BudgetJob` (`span_load.BUDGETS_YAML`, the worker's default settings) gets
one delta row per window key through its real `_apply`: every budget of the file x `--keys`
keys, in the window that holds now. Its producer is a real aiokafka producer that is never
started: `send` and `send_batch` go through its real accumulator, and a drain task stands in
for the sender and the broker (it takes each batch as the sender does, builds its bytes and
settles it delivered), so the hand-over costs what it costs in the worker. Then each timed run
marks every window changed and runs the timer (`_snapshot`, in slices of `SNAPSHOT_SLICE` with
its pauses: CPU time, not wall time, is what counts) until every record is delivered: it builds,
encodes, partitions and queues one `budget_usage` record per window and hands them to the
producer. The figure is the best of `--repeat` runs, per window. Also timed:

* first: the same runs with nothing remembered of the windows (`UsageSnapshots.forget_keys`
  before each): every window's Kafka key, partition (murmur2) and JSON head made anew, as for
  a window's first snapshot, which is most snapshots when keys are new (sessions).
* sweep: the eviction sweep's walk over every window (`_evict_windows` on usage partition 0,
  the clock now: nothing expires, the common case), per window: each usage partition's sweep
  walks the whole table, every `BURNGUARD_EVICT_INTERVAL_S`.
* changelog: the changelog records of every window's totals (`TableChanges.take_records`,
  their JSON), per record.
* build: the snapshots alone (`_snapshots_of` over every window in slices of `SNAPSHOT_SLICE`,
  nothing handed over, no loop turns): the Python and native work per window of the timer's
  slices without the hand-over's, again (what a window's snapshots share remembered) and first.

    .venv/bin/python bench/stream_snapshot.py [--keys 500] [--repeat 5] [--budgets ID,...] \
        [--compare REV] [--rounds 2]

`--compare REV` also measures git revision REV's `contracts` and `stream` (exported to a scratch
directory and imported first in a child process), alternating old and new `--rounds` times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from revisions import add_compare_arguments, alternating_runs, child_result
from stream_account import new_job

COMPARED_COMPONENTS = ("contracts", "stream")


def filled_job(data_dir: Path, keys: int, budget_ids: list[str] | None = None) -> Any:
    """A job holding one window per budget (of `budget_ids`, default all) and key, each with one delta."""
    from burnguard.stream.records import DeltaRow

    job = new_job(data_dir)
    now = datetime.now(UTC)
    now_ns = int(now.timestamp() * 1e9)
    offset = 0
    for budget_id, budget in job._budgets.items():
        if budget_ids and budget_id not in budget_ids:
            continue
        start_ns = budget.window_spec.start_ns(now_ns)
        for n in range(keys):
            offset += 1
            row = DeltaRow(
                budget_id, f"key-{n:05d}", start_ns, 0.001 * (n % 7 + 1), 1, now_ns, now_ns, 0, None
            )
            job._apply(row, (0, offset), now)
    return job


def accumulating_producer(partitions: int) -> tuple[Any, Counter[str], asyncio.Task[None]]:
    """An aiokafka producer, never started, whose accumulator is drained as its sender would:
    (the producer, records delivered per topic, the drain task). Call in the running loop."""
    from aiokafka import AIOKafkaProducer
    from burnguard.stream.changelog import MAX_BATCH_BYTES

    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", max_batch_size=MAX_BATCH_BYTES)
    loop = asyncio.get_running_loop()

    async def metadata_known(topic: str) -> None:
        return None

    producer.client._wait_on_metadata = metadata_known
    producer._metadata.partitions_for_topic = lambda topic: set(range(partitions))
    producer._sender._sender_task = loop.create_future()  # running for ever, as far as the hand-over knows
    delivered: Counter[str] = Counter()
    return producer, delivered, asyncio.ensure_future(drain(producer._message_accumulator, delivered))


async def drain(accumulator: Any, delivered: Counter[str]) -> None:
    """Take every batch the accumulator holds once it says it has one, build its bytes, settle it."""
    loop = asyncio.get_running_loop()
    while True:
        await accumulator.waiter()
        accumulator._waiter_future = loop.create_future()
        for tp in list(accumulator._batches):
            while accumulator._batches.get(tp):
                batch = accumulator._pop_batch(tp)
                batch.get_data_buffer()
                delivered[tp.topic] += batch.record_count
                batch.done(base_offset=0)


def mark_changed(job: Any, windows: list[str]) -> None:
    """Every window waits for a snapshot, where this revision keeps them."""
    if hasattr(job.snapshots, "waiting"):
        job.snapshots.waiting = dict.fromkeys(windows)
    else:
        job._unsnapshotted = dict.fromkeys(windows)


async def timed_runs(job: Any, windows: list[str], repeat: int, first: bool = False) -> tuple[float, int]:
    """(best CPU seconds of a run of the timer until its records are delivered, records per run);
    `first`: nothing remembered of the windows at each run (their first snapshot)."""
    producer, delivered, drainer = accumulating_producer(job.settings.partitions)
    job.app.producer._ensure_producer = lambda: producer
    topic = job.settings.topics.budget_usage
    fastest = float("inf")
    try:
        for run in range(1, repeat + 1):
            mark_changed(job, windows)
            if first:
                job.snapshots.forget_keys()
            started = time.process_time()
            await job._snapshot()
            while delivered[topic] < run * len(windows):
                await asyncio.sleep(0.001)
            fastest = min(fastest, time.process_time() - started)
    finally:
        drainer.cancel()
    return fastest, delivered[topic] // repeat


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Best CPU seconds per window of `_snapshot` over every window, of the code this process imports."""
    import burnguard.stream.app as app

    with tempfile.TemporaryDirectory() as scratch:
        job = filled_job(Path(scratch) / "job", args.keys, args.budgets.split(",") if args.budgets else None)
        windows = [key for key in job.totals.data if key.count("|") >= 2]
        app.SNAPSHOT_MAX_PER_RUN = len(windows)
        job._snapshot_everything = False
        fastest, sent = asyncio.run(timed_runs(job, windows, args.repeat))
        first, _ = asyncio.run(timed_runs(job, windows, args.repeat, first=True))
        sweep_us = sweep_us_per_window(job, windows, args.repeat)
        changelog_us = take_records_us(job, windows, args.repeat)
        build_us, build_first_us = build_us_per_window(job, windows, args.repeat)
    return {
        "code": app.__file__,
        "windows": len(windows),
        "sent": sent,
        "us_per_window": fastest / len(windows) * 1e6,
        "first_us_per_window": first / len(windows) * 1e6,
        "sweep_us_per_window": sweep_us,
        "changelog_us_per_record": changelog_us,
        "build_us_per_window": build_us,
        "build_first_us_per_window": build_first_us,
    }


def build_us_per_window(job: Any, windows: list[str], repeat: int) -> tuple[float, float]:
    """Best CPU µs per window of building every window's snapshot (`_snapshots_of`, in the timer's
    slices), nothing handed over: (again, first: nothing remembered of the windows)."""
    from burnguard.stream.app import SNAPSHOT_SLICE, SnapshotRun

    fastest = {False: float("inf"), True: float("inf")}
    for _ in range(repeat):
        for first in fastest:
            run = SnapshotRun(datetime.now(UTC))
            if first:
                job.snapshots.forget_keys()
            started = time.process_time()
            for at in range(0, len(windows), SNAPSHOT_SLICE):
                job._snapshots_of(windows[at : at + SNAPSHOT_SLICE], run)
            fastest[first] = min(fastest[first], time.process_time() - started)
    return fastest[False] / len(windows) * 1e6, fastest[True] / len(windows) * 1e6


def sweep_us_per_window(job: Any, windows: list[str], repeat: int) -> float:
    """Best CPU µs per window of the eviction walk on partition 0 at the clock now (nothing expires)."""
    clock = int(datetime.now(UTC).timestamp() * 1e9)
    fastest = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        live, evicted = job._evict_windows(0, clock)
        fastest = min(fastest, time.process_time() - started)
        assert evicted == 0 and live, "nothing expires at the clock now"
    return fastest / len(windows) * 1e6


def take_records_us(job: Any, windows: list[str], repeat: int) -> float:
    """Best CPU µs per record of `TableChanges.take_records` (the changelog's encoding) when every
    window's totals changed: each run marks them changed again (untimed), then takes them."""
    changes, table = job.changes, job.totals
    fastest = float("inf")
    for _ in range(repeat):
        changes.take_records()
        for key in windows:
            changes.set(table, key, table.data[key])
        started = time.process_time()
        records = changes.take_records()
        fastest = min(fastest, time.process_time() - started)
    return fastest / len(records) * 1e6


def measure_child(args: argparse.Namespace, pythonpath: Path | None) -> dict[str, Any]:
    """`measure` in a fresh process, with the exported revision at `pythonpath` first on its path."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    command += ["--keys", str(args.keys), "--repeat", str(args.repeat), "--budgets", args.budgets]
    return child_result(command, pythonpath)


def show(label: str, run: dict[str, Any]) -> None:
    print(
        f"{label} ({run['code']}): snapshot {run['us_per_window']:.2f} us/window, {run['sent']} sent; "
        f"first snapshot {run['first_us_per_window']:.2f} us/window; sweep {run['sweep_us_per_window']:.2f} "
        f"us/window; changelog encoding {run['changelog_us_per_record']:.2f} us/record; build alone "
        f"{run['build_us_per_window']:.2f} us/window, first {run['build_first_us_per_window']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, default=500, help="keys per budget (default 500)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts (default 5)")
    parser.add_argument(
        "--budgets",
        default="",
        help="only these budgets' windows, comma-separated ids (default: every budget of the file);"
        " the realistic shape's windows are mostly `session-tools,session-cost`'s, each key new",
    )
    add_compare_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    runs = alternating_runs(
        args.compare,
        args.rounds,
        COMPARED_COMPONENTS,
        lambda: measure_child(args, None),
        lambda old_path: measure_child(args, old_path),
    )
    new = min(runs["new"], key=lambda run: run["us_per_window"])
    show("this checkout", new)
    fields = f"windows={new['windows']} sent={new['sent']} us_per_window={new['us_per_window']:.2f}"
    fields += f" first_us_per_window={new['first_us_per_window']:.2f}"
    fields += f" sweep_us_per_window={new['sweep_us_per_window']:.2f}"
    fields += f" changelog_us_per_record={new['changelog_us_per_record']:.2f}"
    fields += f" build_us_per_window={new['build_us_per_window']:.2f}"
    fields += f" build_first_us_per_window={new['build_first_us_per_window']:.2f}"
    if runs["old"]:
        old = min(runs["old"], key=lambda run: run["us_per_window"])
        show(f"old {args.compare}", old)
        fields += f" old_us_per_window={old['us_per_window']:.2f}"
        fields += f" speedup={old['us_per_window'] / new['us_per_window']:.2f}"
        fields += f" old_first_us_per_window={old['first_us_per_window']:.2f}"
        fields += f" first_speedup={old['first_us_per_window'] / new['first_us_per_window']:.2f}"
        fields += f" old_sweep_us_per_window={old['sweep_us_per_window']:.2f}"
        fields += f" sweep_speedup={old['sweep_us_per_window'] / new['sweep_us_per_window']:.2f}"
        fields += f" old_changelog_us_per_record={old['changelog_us_per_record']:.2f}"
        fields += f" old_build_us_per_window={old['build_us_per_window']:.2f}"
        fields += f" build_speedup={old['build_us_per_window'] / new['build_us_per_window']:.2f}"
        fields += f" old_build_first_us_per_window={old['build_first_us_per_window']:.2f}"
        build_first_speedup = old["build_first_us_per_window"] / new["build_first_us_per_window"]
        fields += f" build_first_speedup={build_first_speedup:.2f}"
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    budgets = f" budgets={args.budgets}" if args.budgets else ""
    print(f"RESULT stream_snapshot keys={args.keys} repeat={args.repeat}{budgets} {fields}")


if __name__ == "__main__":
    main()
