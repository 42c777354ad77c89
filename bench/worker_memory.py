"""Stream worker memory (RSS) with 100,000 active budget keys, against the same worker with none.

One worker runs with one budget over users (`scope: user, match: "*"`,
rolling window 24h, a limit nothing reaches). Its VmRSS is read from
/proc/<pid>/status once it is ready and idle (0 keys); then one LLM call for
each of --keys distinct users is sent, and VmRSS is read again once the
worker's group has committed the end of `otlp_spans` and of the usage topic
(every call accounted), and once more after the budget usage snapshots of
every key are on their topic (the snapshot timer is part of steady state).
rss_mb is the larger of those two readings; VmHWM (peak) is printed beside.

A rolling window keeps a key's spend in up to 60 time buckets (24 minutes
each for 24h), so a key that spends all day holds more state than a key
with one call. --calls-per-key N sends N rounds of calls, each round one
bucket later than the one before (the oldest 24 min x (N-1) ago), so every
key ends with N buckets; the worker accounts a call per key per round, so
use it with fewer keys (e.g. --keys 2000 --calls-per-key 60) and scale.

    .venv/bin/python bench/worker_memory.py [--keys 100000] [--calls-per-key 1]
"""

from __future__ import annotations

import argparse
import time

from pipeline_setup import (
    BenchPipeline,
    GroupOffsets,
    cpu_seconds,
    end_offsets,
    latest_usage,
    machine_note,
    note,
    proc_status_kb,
    produce_all,
)
from span_load import MODEL_CONFIG_YAML, SpanMix

TARGET_MB = 500
BUDGETS_YAML = MODEL_CONFIG_YAML + (
    "budgets:\n"
    "  - {id: user-24h, scope: user, match: '*', window: 24h, limit: 1.0e6,\n"
    "     actions: [{at: 0.8, do: warn}, {at: 1.0, do: throttle}]}\n"
)
USERS_PER_MESSAGE = 200
BUCKET_NS = 24 * 60 * 1_000_000_000  # a sixtieth of 24h


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def wait_accounted(pipeline: BenchPipeline, pid: int, timeout: float) -> None:
    offsets = GroupOffsets(pipeline.bootstrap, pipeline.app_id)
    deadline = time.monotonic() + timeout
    try:
        for topic in (pipeline.topics.spans, pipeline.topics.usage):
            while not offsets.caught_up(topic, end_offsets(pipeline.bootstrap, topic)):
                if pipeline.processes["worker"].poll() is not None:
                    raise RuntimeError(f"worker exited:\n{pipeline.log('worker')[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker did not account every span in {timeout:.0f}s")
                time.sleep(0.5)
    finally:
        offsets.close()


def wait_snapshots(pipeline: BenchPipeline, keys: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        usage = latest_usage(pipeline.bootstrap, pipeline.topics.budget_usage)
        seen = len({u.key for u in usage.values() if u.budget == "user-24h"})
        if seen >= keys:
            return seen
        time.sleep(2)
    note(f"only {seen} of {keys} keys had a snapshot after {timeout:.0f}s")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="distinct budget keys (default 100000)")
    parser.add_argument("--calls-per-key", type=int, default=1, help="rounds of calls, one bucket apart")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds the worker may take")
    parser.add_argument("--keep", action="store_true", help="keep the broker dir and logs")
    args = parser.parse_args()

    with BenchPipeline("worker_memory", keep=args.keep) as pipeline:
        budgets = pipeline.write("budgets.yaml", BUDGETS_YAML)
        worker = pipeline.start_worker({"BURNGUARD_BUDGETS_FILE": str(budgets)})
        time.sleep(5)  # settle: first timers run, the budgets feed is following
        baseline = rss_mb(worker.pid)
        note(f"worker ready, 0 keys: VmRSS {baseline:.1f} MB")

        mix = SpanMix(seed=3)
        users = [f"user-{n:06d}" for n in range(args.keys)]
        chunks = [users[i : i + USERS_PER_MESSAGE] for i in range(0, len(users), USERS_PER_MESSAGE)]
        now_ns, rounds = time.time_ns(), args.calls_per_key
        batches = (
            mix.one_call_each(chunk, index % mix.tenants, now_ns - (rounds - 1 - r) * BUCKET_NS)
            for r in range(rounds)
            for index, chunk in enumerate(chunks)
        )
        cpu_before, started = cpu_seconds(worker.pid), time.monotonic()
        messages = produce_all(pipeline.bootstrap, pipeline.topics.spans, batches)
        note(f"sent {mix.spans} calls for {len(mix.calls_by_user)} users in {messages} messages")
        wait_accounted(pipeline, worker.pid, args.timeout)
        elapsed, cpu = time.monotonic() - started, cpu_seconds(worker.pid) - cpu_before
        accounted = rss_mb(worker.pid)
        note(
            f"all accounted after {elapsed:.0f}s ({mix.spans / elapsed:,.0f} spans/s, "
            f"worker CPU {cpu:.0f}s): VmRSS {accounted:.1f} MB"
        )
        keys = wait_snapshots(pipeline, args.keys, timeout=max(60.0, args.timeout - elapsed))
        snapshotted = rss_mb(worker.pid)
        peak = proc_status_kb(worker.pid, "VmHWM") / 1024
        note(f"{keys} keys snapshotted: VmRSS {snapshotted:.1f} MB, VmHWM (peak) {peak:.1f} MB")
    rss = max(accounted, snapshotted)
    print(f"\nmachine: {machine_note()}")
    print(
        f"{keys} keys: {rss:.0f} MB RSS (target <= {TARGET_MB} MB), baseline with 0 keys {baseline:.0f} MB, "
        f"{(rss - baseline) * 1024 * 1024 / max(keys, 1):,.0f} bytes per key, peak {peak:.0f} MB"
    )
    if args.calls_per_key > 1:
        scaled = baseline + (rss - baseline) * 100_000 / max(keys, 1)
        print(f"scaled to 100,000 keys with {args.calls_per_key} buckets each: ~{scaled:,.0f} MB")
    print(f"RESULT worker_memory keys={keys} rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
