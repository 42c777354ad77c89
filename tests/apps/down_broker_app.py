"""An app with enforcement on whose Kafka is down (or goes down): it must never stall.

Prints one JSON line with what it measured: how long `configure()` took, its guarded calls
(the price data loaded first), how long `shutdown()` took and what it reported.
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


def guarded_calls() -> list[float]:
    """Make CALLS guarded calls (each must be allowed); return their seconds."""
    seconds = []
    for _ in range(CALLS):
        started = time.perf_counter()
        burnguard.record_llm_call("gpt-4.1", "openai", 120, 30, enforce=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    PriceBook().price("gpt-4.1", "openai", input_tokens=1, output_tokens=1)  # loads the price data
    started = time.perf_counter()
    runtime = burnguard.configure(service_name="down-app")
    measured: dict[str, object] = {"configure_s": time.perf_counter() - started}
    if os.environ.get("DOWN_APP_WAIT_FOR_KAFKA") == "1":
        guarded_calls()
        exporter = runtime.exporter
        assert isinstance(exporter, runtime_module.KafkaSpanExporter)
        while exporter.stats.spans_sent < CALLS:
            time.sleep(0.05)
        print("delivered", flush=True)
        sys.stdin.readline()
    seconds = guarded_calls()
    measured.update(slowest_call_s=max(seconds), median_call_s=statistics.median(seconds))
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
