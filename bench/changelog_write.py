"""CPU and wall time of the stream worker's changelog writes (`TableChanges.write`), in process, real broker.

A broker (`BenchPipeline`: its own, on free ports) and, per code revision, a child process with a
Faust app configured as the worker's (`producer_max_batch_size` = `changelog.MAX_BATCH_BYTES`,
the in-memory store) and a `window-totals` table of `--partitions` partitions, its producer
started. Every key's value is a `WindowTotals` as stage 2 writes them. Two shapes, each timed
`--repeat` times on fresh changes (set untimed before each run):

* big: one write of `--keys` changed keys (the record cache's bound, `MAX_PENDING_KEYS`, by
  default), then `delivered()`. Figures: the process's CPU time per record from the write to
  its delivery (the producer's sender runs on the same event loop, so it counts), how long the
  agent waits in `write()` itself, and the wall time until `delivered()` returns.
* burst: `--burst` writes of `--burst-keys` keys each back to back, as the agent writes after
  every batch with no flush interval (`BURNGUARD_CHANGELOG_FLUSH_MS=0`), then `delivered()`:
  how long the agent waited in all the `write()` calls together (a write that has to wait for a
  partition's earlier batch to drain shows here), and the CPU per record.

The best run of each counts.

    .venv/bin/python bench/changelog_write.py [--keys 20000] [--partitions 4] [--burst 20]
        [--burst-keys 500] [--repeat 5] [--compare REV] [--rounds 2]

`--compare REV` also measures git revision REV's `contracts` and `stream` (exported to a scratch
directory and imported first in a child process), alternating old and new `--rounds` times, on
the same broker, and prints both in the RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline_setup import BenchPipeline, load_average, machine_note, note
from revisions import add_compare_arguments, alternating_runs, child_result

COMPARED_COMPONENTS = ("contracts", "stream")
#: A window's totals as stage 2 keeps them (`WindowTotals.to_state`): spend, counts, marks, rolling parts.
TOTALS_STATE = [0.5, 3, 1, 2, {"0": 9, "1": 12, "2": 40}, [4, [0.25, 0.0, 1e-3]], [7, [1.5]], None]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both shapes' best figures, with this process's `burnguard` (the revision first on the path)."""
    import faust
    from burnguard.stream import changelog
    from burnguard.stream.accounting import WindowTotals
    from burnguard.stream.changelog import TableChanges
    from faust.types import TP

    app = faust.App(
        args.app_id,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        web_enabled=False,
        producer_max_batch_size=changelog.MAX_BATCH_BYTES,
    )
    table = app.Table("window-totals", default=None, partitions=args.partitions)
    value = WindowTotals.from_state(TOTALS_STATE)
    await app.producer.start()
    offset = 0

    def change(changes: TableChanges, keys: int, prefix: str) -> None:
        nonlocal offset
        for index in range(keys):
            changes.partition = index % args.partitions
            changes.set(table, f"tenant-cost|{prefix}-{index}|1796169600000000000", value)
            changes.processed(TP("burnguard.usage", changes.partition), offset)
            offset += 1

    try:
        changes = TableChanges(app, flush_interval_s=3600)
        big, burst = [], []
        for run in range(args.repeat):
            change(changes, args.keys, f"big{run}")
            cpu, started = time.process_time(), time.perf_counter()
            await changes.write()
            in_write = time.perf_counter() - started
            await changes.delivered()
            big.append((time.process_time() - cpu, in_write, time.perf_counter() - started))
            in_writes, cpu, started = 0.0, time.process_time(), time.perf_counter()
            for write in range(args.burst):
                change(changes, args.burst_keys, f"burst{run}-{write}")
                begun = time.perf_counter()
                await changes.write()
                in_writes += time.perf_counter() - begun
            await changes.delivered()
            burst.append((time.process_time() - cpu, in_writes, time.perf_counter() - started))
    finally:
        await app.producer.stop()
    best_big = min(big)
    best_burst = min(burst)
    burst_records = args.burst * args.burst_keys
    return {
        "code": changelog.__file__,
        "big_cpu_us_per_record": best_big[0] / args.keys * 1e6,
        "big_write_ms": min(run[1] for run in big) * 1e3,
        "big_delivered_ms": min(run[2] for run in big) * 1e3,
        # the burst's CPU includes setting its changes (same in every revision); its own figure
        "burst_cpu_us_per_record": best_burst[0] / burst_records * 1e6,
        "burst_in_writes_ms": min(run[1] for run in burst) * 1e3,
        "burst_delivered_ms": min(run[2] for run in burst) * 1e3,
    }


def measure_child(
    args: argparse.Namespace, bootstrap: str, app_id: str, pythonpath: Path | None
) -> dict[str, Any]:
    """`measure` in a fresh process, with the exported revision at `pythonpath` first on its path."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--bootstrap", bootstrap]
    command += ["--app-id", app_id, "--keys", str(args.keys), "--partitions", str(args.partitions)]
    command += [
        "--burst",
        str(args.burst),
        "--burst-keys",
        str(args.burst_keys),
        "--repeat",
        str(args.repeat),
    ]
    return child_result(command, pythonpath)


def show(label: str, run: dict[str, Any]) -> None:
    print(
        f"{label} ({run['code']}): big write {run['big_cpu_us_per_record']:.2f} us/record CPU, "
        f"agent in write() {run['big_write_ms']:.1f} ms, delivered after {run['big_delivered_ms']:.1f} ms; "
        f"burst {run['burst_cpu_us_per_record']:.2f} us/record CPU, agent in write()s "
        f"{run['burst_in_writes_ms']:.1f} ms, delivered after {run['burst_delivered_ms']:.1f} ms"
    )


def fields(prefix: str, run: dict[str, Any]) -> str:
    return " ".join(f"{prefix}{name}={value:.2f}" for name, value in run.items() if name != "code")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="keys of the big write (default 20000)")
    parser.add_argument("--partitions", type=int, default=4, help="changelog partitions (default 4)")
    parser.add_argument("--burst", type=int, default=20, help="writes back to back (default 20)")
    parser.add_argument("--burst-keys", type=int, default=500, help="keys per burst write (default 500)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts (default 5)")
    add_compare_arguments(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--app-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(args))))
        return
    with BenchPipeline("changelog-write") as pipeline:
        note(machine_note())
        runs_made = [0]

        def run(pythonpath: Path | None) -> dict[str, Any]:
            runs_made[0] += 1
            app_id = f"changelog-bench-{runs_made[0]}"
            pipeline.broker.create_topic(f"{app_id}-window-totals-changelog", partitions=args.partitions)
            return measure_child(args, pipeline.bootstrap, app_id, pythonpath)

        runs = alternating_runs(args.compare, args.rounds, COMPARED_COMPONENTS, lambda: run(None), run)
    new = min(runs["new"], key=lambda run: run["big_cpu_us_per_record"])
    show("this checkout", new)
    result = f"RESULT changelog_write keys={args.keys} burst={args.burst}x{args.burst_keys} {fields('', new)}"
    if runs["old"]:
        old = min(runs["old"], key=lambda run: run["big_cpu_us_per_record"])
        show(f"old {args.compare}", old)
        result += f" {fields('old_', old)}"
    print(f"{result} load={load_average().replace(' ', '/')}")


if __name__ == "__main__":
    main()
