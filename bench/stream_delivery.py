"""The worker's CPU per OTLP message for getting it to stage 1 and acking it, nothing else.

Why: stage 1 and stage 2 have their in-process benches (`stream_ingest.py`, `stream_account.py`);
what the framework costs around them per message (aiokafka's fetches in Faust's consumer thread,
`getmany`, the fetch delivery of `stream/fetching.py`, the conductor, `take_batches`, acks and
commits) only shows in an end-to-end profile, mixed with everything else. Here the real worker
(`python -m burnguard.stream`'s job: its transport, sensors, agents and timers) runs with stage 1's
body replaced by the least it must do for its offsets to be committed: admit each message in
order (`InOrderReads.admit`) and raise the commit cap over the ones admitted. Nothing is decoded,
so stage 2 gets no records. The clock runs from Faust's "Ready" until the group has committed the
end offsets of `otlp_spans`; the worker's CPU per thread (`thread_cpu.py`) is divided by the
messages.

The messages are the small shape's OTLP batches (`span_load.SpanMix`, 10-20 spans), a pool of
them sent round-robin (the bytes matter for the fetches, their contents do not).

    .venv/bin/python bench/stream_delivery.py [--messages 60000] [--compare REV --rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline_setup import (
    BenchPipeline,
    GroupOffsets,
    cpu_seconds,
    end_offsets,
    machine_note,
    note,
    produce_all,
)
from revisions import add_compare_arguments, alternating_runs, in_run_order
from span_load import SpanMix
from thread_cpu import ThreadSampler, find_py_spy

#: distinct messages made; the load repeats them
POOL = 2000
#: `thread_cpu`'s name for Faust's consumer thread (mode's `WorkerThread`: aiokafka and its loop)
CONSUMER_THREAD = "Thread (WorkerThread.run)"


def _deliver_only() -> None:
    """Run the worker with stage 1's body cut down to admitting and releasing the commit."""
    from burnguard.stream import app as stream_app
    from burnguard.stream.takeover import in_order_reads

    async def ingest_batch(self: Any, events: list[Any]) -> None:
        reads = in_order_reads(self.app.consumer)
        admitted = {event.message.tp for event in events if reads.admit(event.message)}
        self._let_spans_commit({tp: reads.expected[tp] for tp in admitted if tp in reads.expected})

    stream_app.BudgetJob._ingest_batch = ingest_batch
    stream_app.run_worker()


def run(args: argparse.Namespace, code: Path | None = None) -> dict[str, Any]:
    """One broker, the same messages, one worker of this checkout's code or of `code`'s."""
    mix = SpanMix(batch_min=10, batch_max=20)
    pool = [mix.message() for _ in range(POOL)]
    with BenchPipeline("stream_delivery") as pipeline:
        messages = produce_all(
            pipeline.bootstrap, pipeline.topics.spans, itertools.islice(itertools.cycle(pool), args.messages)
        )
        env = {"PYTHONSAFEPATH": "1", "BURNGUARD_COMMIT_INTERVAL_S": "1.0"}
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(code), str(Path(__file__).resolve().parent)])
        process = pipeline.spawn("worker", [str(Path(__file__).resolve()), "--worker"], env)
        pipeline.wait_for_log("worker", "[^Worker]: Ready", 180)
        offsets = GroupOffsets(pipeline.bootstrap, pipeline.app_id)
        ends = end_offsets(pipeline.bootstrap, pipeline.topics.spans)
        cpu_start, started = cpu_seconds(process.pid), time.monotonic()
        sampler = ThreadSampler(process.pid, find_py_spy(sys.executable))
        sampler.start()
        profiler = _profiler(process.pid, args.profile) if args.profile else None
        try:
            while not offsets.caught_up(pipeline.topics.spans, ends):
                if process.poll() is not None or time.monotonic() - started > args.timeout:
                    raise RuntimeError(f"worker exited or timed out:\n{pipeline.log('worker')[-3000:]}")
                time.sleep(0.05)
            elapsed, cpu = time.monotonic() - started, cpu_seconds(process.pid) - cpu_start
            threads = sampler.stop()
        finally:
            offsets.close()
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
    return {"messages": messages, "elapsed": elapsed, "cpu": cpu, "threads": threads, "load": os.getloadavg()}


def _profiler(pid: int, path: str) -> subprocess.Popen:
    """py-spy sampling the worker (all threads, `--threads`) into `path` (raw collapsed stacks)."""
    py_spy = find_py_spy(sys.executable)
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy in the venv")
    args = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--threads", "-o", path]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report(run_: dict[str, Any], side: str) -> None:
    messages, threads = run_["messages"], run_["threads"]
    main = threads.cpu_by_kind.get("MainThread", 0.0)
    consumer = threads.cpu_by_kind.get(CONSUMER_THREAD, 0.0)
    rest = threads.total_cpu_s - main - consumer
    note(
        f"{side}: {messages} messages in {run_['elapsed']:.1f}s ({messages / run_['elapsed']:,.0f}/s); "
        f"worker CPU {run_['cpu'] / messages * 1e6:.1f} µs per message; load {run_['load'][0]:.2f}"
    )
    for line in threads.lines():
        note(f"  {line}")
    print(
        f"RESULT stream_delivery code={side} messages={messages} "
        f"cpu_us_per_message={run_['cpu'] / messages * 1e6:.1f} main_us={main / messages * 1e6:.1f} "
        f"consumer_thread_us={consumer / messages * 1e6:.1f} other_threads_us={rest / messages * 1e6:.1f} "
        f"load={run_['load'][0]:.2f}"
    )


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        _deliver_only()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", help="py-spy's raw profile of the worker's run into this file")
    add_compare_arguments(parser, rounds=2)
    args = parser.parse_args()
    runs = alternating_runs(
        args.compare, args.rounds, ("contracts", "stream"), lambda: run(args), lambda old: run(args, old)
    )
    print(f"machine: {machine_note()}")
    for side, result in in_run_order(runs):
        report(result, side)


if __name__ == "__main__":
    main()
