"""What an idle stream worker costs per thread: nothing to read, its consumer still fetching.

An idle or caught-up worker's consumer thread (Faust's `WorkerThread`: aiokafka's fetcher and its
event loop) sends one fetch per `BURNGUARD_FETCH_MAX_WAIT_MS` (the broker holds an empty fetch that
long), each encoded and its answer decoded in Python. Under a backlog the same empty fetches run
while stage 1 holds the busy partitions' records (`stream/fetching.py`). This bench starts a worker
on an empty pipeline, lets it settle, then reads its threads' CPU (`thread_cpu.py`) for `--seconds`.

    .venv/bin/python bench/worker_idle.py [--seconds 30] [--fetch-wait-ms 20] [--compare REV --rounds 2]

`--compare REV` runs REV's worker (its `contracts` and `stream`) on the same broker before this
checkout's, `--rounds` times alternating; a RESULT line per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline_setup import BenchPipeline, load_average, machine_note, note
from revisions import BENCH_DIR, add_compare_arguments, alternating_runs, in_run_order
from span_load import BUDGETS_YAML
from thread_cpu import ThreadSampler, find_py_spy

#: `thread_cpu`'s name for Faust's consumer thread
CONSUMER_THREAD = "Thread (WorkerThread.run)"
#: seconds after Ready before the clock starts: recovery done, the first snapshots and refreshes past
SETTLE_S = 8.0


def run(pipeline: BenchPipeline, args: argparse.Namespace, code: Path | None = None) -> dict[str, Any]:
    """One idle worker of this checkout's code (or of `code`'s); its threads' CPU over `args.seconds`."""
    budgets = pipeline.write("budgets.yaml", BUDGETS_YAML)
    env = {
        "BURNGUARD_BUDGETS_FILE": str(budgets),
        "BURNGUARD_FETCH_MAX_WAIT_MS": str(args.fetch_wait_ms),
        "PYTHONSAFEPATH": "1",  # the checkout's folder not first on the path (`stream_throughput.py`)
    }
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), str(BENCH_DIR)])
    process = pipeline.start_worker(env)
    try:
        time.sleep(SETTLE_S)
        sampler = ThreadSampler(process.pid, find_py_spy(sys.executable))
        sampler.start()
        time.sleep(args.seconds)
        threads = sampler.stop()
    finally:
        pipeline.stop("worker")
    return {"threads": threads, "load": load_average()}


def report(result: dict[str, Any], code: str) -> None:
    threads = result["threads"]
    for line in threads.lines():
        note(line)
    cpu = threads.cpu_by_kind
    share = {kind: seconds / threads.elapsed_s for kind, seconds in cpu.items()}
    print(
        f"RESULT worker_idle code={code} consumer_thread_share={share.get(CONSUMER_THREAD, 0.0):.4f} "
        f"main_thread_share={share.get('MainThread', 0.0):.4f} all_threads_share={sum(share.values()):.4f} "
        f'seconds={threads.elapsed_s:.1f} load="{result["load"]}"'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument("--fetch-wait-ms", type=int, default=20, help="BURNGUARD_FETCH_MAX_WAIT_MS")
    add_compare_arguments(parser, rounds=2)
    args = parser.parse_args()
    with BenchPipeline("worker_idle") as pipeline:
        runs = alternating_runs(
            args.compare,
            args.rounds,
            ("contracts", "stream"),
            lambda: run(pipeline, args),
            lambda old: run(pipeline, args, old),
        )
    print(f"machine: {machine_note()}")
    for code, result in in_run_order(runs):
        report(result, code)


if __name__ == "__main__":
    main()
