"""An app with enforcement on whose Kafka is down (or goes down): it must never stall.

Prints one JSON line with what it measured: how long `configure()` took, its guarded calls
(the price data loaded first), how long `shutdown()` took and what it reported. A wait on Kafka
is time the thread is blocked (neither running nor waiting for a CPU, `blocked_s`), which a busy
machine does not add to: the wall time of a call is load-sensitive, its blocked time is not.
`DOWN_APP_WAIT_FOR_KAFKA=1` first waits until its first calls are acknowledged and reads a
line from stdin (the test stops the broker meanwhile); `DOWN_APP_SHUTDOWN=0` exits without
calling `shutdown()`; `DOWN_APP_END=wait` then waits to be killed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from burnguard.contracts.pricing import PriceBook
from burnguard.instrumentation import runtime as runtime_module

import burnguard

CALLS = 10


def scheduler_seconds() -> tuple[float, float, float]:
    """(wall, on a CPU, runnable but waiting for one) seconds of this thread so far: Linux's
    schedstat; where it is missing, the wait for a CPU counts as 0 (blocked time over-counted)."""
    wall = time.perf_counter()
    try:
        with open("/proc/thread-self/schedstat") as stat:
            on_cpu_ns, waiting_ns, _ = (int(v) for v in stat.read().split())
    except OSError:
        return wall, time.thread_time(), 0.0
    return wall, on_cpu_ns / 1e9, waiting_ns / 1e9


def blocked_s(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """The seconds between two `scheduler_seconds()` the thread was blocked (a wait on a lock,
    an event, a socket): its wall time less its CPU time and its wait for a CPU."""
    wall, on_cpu, waiting = (a - b for a, b in zip(after, before, strict=True))
    return wall - on_cpu - waiting


def guarded_calls() -> tuple[list[float], list[float]]:
    """Make CALLS guarded calls (each must be allowed); return their seconds and blocked seconds."""
    seconds, blocked = [], []
    for _ in range(CALLS):
        before = scheduler_seconds()
        burnguard.record_llm_call("gpt-4.1", "openai", 120, 30, enforce=True)
        after = scheduler_seconds()
        seconds.append(after[0] - before[0])
        blocked.append(blocked_s(before, after))
    return seconds, blocked


def main() -> None:
    PriceBook().price("gpt-4.1", "openai", input_tokens=1, output_tokens=1)  # loads the price data
    before = scheduler_seconds()
    runtime = burnguard.configure(service_name="down-app")
    after = scheduler_seconds()
    measured: dict[str, object] = {
        "configure_s": after[0] - before[0],
        "configure_blocked_s": blocked_s(before, after),
    }
    if os.environ.get("DOWN_APP_WAIT_FOR_KAFKA") == "1":
        guarded_calls()
        exporter = runtime.exporter
        assert isinstance(exporter, runtime_module.KafkaSpanExporter)
        while exporter.stats.spans_sent < CALLS:
            time.sleep(0.05)
        print("delivered", flush=True)
        sys.stdin.readline()
    seconds, blocked = guarded_calls()
    measured.update(
        slowest_call_s=max(seconds),
        median_call_s=statistics.median(seconds),
        most_blocked_call_s=max(blocked),
    )
    if os.environ.get("DOWN_APP_SHUTDOWN", "1") == "1":
        started = time.perf_counter()
        report = runtime.shutdown()
        measured.update(
            shutdown_s=time.perf_counter() - started,
            sent=report.spans_sent,
            undelivered=report.spans_undelivered,
        )
    print(json.dumps(measured), flush=True)
    if os.environ.get("DOWN_APP_END") == "wait":
        time.sleep(120)  # until SIGTERM


if __name__ == "__main__":
    main()
