"""From a span's end in an instrumented app to a guard in another process seeing its signal.

Processes: the broker, one stream worker, a probe app (configure() with the
KafkaSpanExporter and the defaults a user gets: no OTEL_BSP_SCHEDULE_DELAY, so
configure()'s export delay, DEFAULT_EXPORT_DELAY_MS), a load generator (a third
process writing realistic OTLP batches to `otlp_spans` at --rate spans/s, as
an OTel Collector would), and this process, which runs a BudgetGuard and
notes when each probe's signal arrives.

Each probe is one `llm_call` by a fresh user `probe-...`; the budget
`probe-calls` (scope user, match `probe-*`, metric `calls`, limit 1) makes
that one call cross its limit, so every probe causes exactly one `throttle`
signal. Latency = the guard's `on_signal` time minus the span's end time
(same machine, same clock). Two phases: a few probes with no load (the
pipeline's own latency), then probes under the load (the issue's figure).
Probes whose signal does not arrive before the drain time are counted at the
time waited, so the percentiles are then lower bounds (said in the output).

    .venv/bin/python bench/enforcement_latency.py [--rate 10000] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline_setup import (
    BenchPipeline,
    GroupOffsets,
    aio_producer,
    end_offsets,
    machine_note,
    note,
    read_topic,
)

TARGET_P50_MS = 100
TARGET_P99_MS = 500
PROBE_TENANT = "probe-tenant"
PROBE_BUDGET = """\
  - {id: probe-calls, scope: user, match: "probe-*", window: day, metric: calls, limit: 1,
     actions: [{at: 1.0, do: throttle}]}
"""


# --- the probe app (a subprocess) --------------------------------------------------------------


def run_probe(prefix: str, count: int, interval_s: float) -> None:
    """Make `count` calls, one per fresh user; print each user and its span's end time (ns)."""
    from burnguard.instrumentation import attribute, configure, llm_call
    from burnguard.instrumentation.runtime import Settings

    assert "OTEL_BSP_SCHEDULE_DELAY" not in os.environ, "the probe measures configure()'s default delay"
    runtime = configure(Settings.from_env(), service_name="probe-app")
    print(f"ready; export delay {export_delay_ms(runtime)} ms", flush=True)
    next_at = time.monotonic()
    for index in range(count):
        next_at += interval_s
        user = f"{prefix}{index:04d}"
        with attribute(tenant=PROBE_TENANT, user=user), llm_call("gpt-4.1-mini", "openai") as call:
            call.set_usage(120, 30)
        print(json.dumps({"user": user, "end_ns": call.span.end_time}), flush=True)
        time.sleep(max(0.0, next_at - time.monotonic()))
    runtime.flush()
    runtime.shutdown()
    print("done", flush=True)


def export_delay_ms(runtime) -> str:  # a burnguard Runtime
    """The delay of the paced batch processor configure() put in front of the Kafka exporter."""
    delay = getattr(getattr(runtime.cost_processor, "_next", None), "schedule_delay_millis", None)
    return "unknown" if delay is None else f"{delay:g}"


# --- the load generator (a subprocess) ---------------------------------------------------------


def run_load(rate: float, seconds: float, pool_spans: int) -> None:
    """Write OTLP batches to `otlp_spans` at `rate` spans/s for `seconds`, from a pre-built pool."""
    import asyncio
    import os

    from burnguard.contracts.topics import Topics
    from span_load import SpanMix

    mix = SpanMix(seed=11)
    pool = []
    while mix.spans < pool_spans:
        before = mix.spans
        key, value = mix.message()
        pool.append((key, value, mix.spans - before))
    topic = Topics.from_env().spans
    print(f"pool of {len(pool)} messages, {mix.spans / len(pool):.1f} spans each, ready", flush=True)

    async def send() -> None:
        out = aio_producer(os.environ["BURNGUARD_KAFKA_BOOTSTRAP"])
        await out.start()
        started = time.monotonic()
        sent = index = 0
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                while sent < rate * elapsed:
                    key, value, spans = pool[index % len(pool)]
                    await out.send(topic, value=value, key=key)
                    sent += spans
                    index += 1
                await asyncio.sleep(0.005)
            await out.flush()
        finally:
            await out.stop()
        elapsed = time.monotonic() - started
        print(f"sent {sent} spans in {elapsed:.1f}s = {sent / elapsed:,.0f} spans/s", flush=True)

    asyncio.run(send())


# --- the measuring process ---------------------------------------------------------------------


@dataclass
class SignalClock:
    """First arrival time of each probe user's throttle signal, as the guard sees it."""

    seen_ns: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_signal(self, signal) -> None:  # a burnguard Signal
        now = time.time_ns()
        if signal.budget == "probe-calls" and signal.action == "throttle":
            with self.lock:
                self.seen_ns.setdefault(signal.key, now)


def run_phase(
    pipeline: BenchPipeline,
    clock: SignalClock,
    name: str,
    count: int,
    interval_s: float,
    drain_s: float,
    before_drain: Callable[[], None] = lambda: None,
) -> dict[str, int]:
    """Run one probe process; return user -> span end (ns) once every signal arrived or `drain_s` passed."""
    prefix = f"probe-{name}-"
    process = pipeline.spawn(
        f"probe-{name}",
        [__file__, "probe", "--prefix", prefix, "--count", str(count), "--interval", str(interval_s)],
    )
    process.wait(timeout=count * interval_s + 120)
    ends = {}
    for line in pipeline.log(f"probe-{name}").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            ends[record["user"]] = record["end_ns"]
    if len(ends) != count:
        log = pipeline.log(f"probe-{name}")
        raise RuntimeError(f"probe {name} made {len(ends)} of {count} calls:\n{log}")
    before_drain()
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        with clock.lock:
            if all(user in clock.seen_ns for user in ends):
                break
        time.sleep(0.1)
    return ends


def latencies_ms(clock: SignalClock, ends: dict[str, int], gave_up_ns: int) -> tuple[list[float], int]:
    """Latency per probe; a probe never signalled counts at the time waited (a lower bound)."""
    values, missing = [], 0
    with clock.lock:
        for user, end_ns in ends.items():
            seen = clock.seen_ns.get(user)
            if seen is None:
                missing += 1
                seen = gave_up_ns
            values.append((seen - end_ns) / 1e6)
    return sorted(values), missing


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, round(fraction * (len(values) - 1)))]


def describe(name: str, values: list[float], missing: int) -> str:
    text = (
        f"{name}: {len(values)} probes, p50 {percentile(values, 0.5):,.0f} ms, "
        f"p90 {percentile(values, 0.9):,.0f} ms, p99 {percentile(values, 0.99):,.0f} ms, "
        f"min {values[0]:,.0f} ms, max {values[-1]:,.0f} ms, mean {statistics.fmean(values):,.0f} ms"
    )
    if missing:
        text += f"; {missing} never signalled (counted at the time waited: lower bounds)"
    return text


def stage_times(pipeline: BenchPipeline, clock: SignalClock, ends: dict[str, int]) -> dict[str, float]:
    """Median ms of each hop, from the Kafka timestamps of the probe's records on each topic."""
    from burnguard.contracts.otlp import decode_usage

    exported, deltas, signalled = {}, {}, {}
    for record in read_topic(pipeline.bootstrap, pipeline.topics.spans):
        if record.key == PROBE_TENANT.encode():
            for usage in decode_usage(record.value):
                exported.setdefault(usage.user, record.timestamp)
    for record in read_topic(pipeline.bootstrap, pipeline.topics.usage):
        if record.value and b'"probe-calls"' in record.value:
            value = json.loads(record.value)
            # `batches` records (one per micro-batch) hold sub-batches; older `batch` records rows
            rows = [row for sub in value.get("batches", []) for row in sub[2]] + value.get("deltas", [])
            for row in rows:
                if row[0] == "probe-calls":
                    deltas.setdefault(row[1], record.timestamp)
    for record in read_topic(pipeline.bootstrap, pipeline.topics.signals):
        if record.value and b'"probe-calls"' in record.value:
            signalled.setdefault(json.loads(record.value)["key"], record.timestamp)
    with clock.lock:
        seen = {user: ns / 1e6 for user, ns in clock.seen_ns.items()}
    hops = {
        "export": ({u: ends[u] / 1e6 for u in ends}, exported),
        "ingest": (exported, deltas),
        "account": (deltas, signalled),
        "to guard": (signalled, seen),
    }
    medians = {}
    for name, (before, after) in hops.items():
        values = [after[u] - before[u] for u in ends if u in before and u in after]
        medians[name] = statistics.median(values) if values else float("nan")
    return medians


def backlog(pipeline: BenchPipeline) -> str:
    """How far the worker's ingest is behind the end of `otlp_spans` (committed offsets)."""
    offsets = GroupOffsets(pipeline.bootstrap, pipeline.app_id)
    try:
        committed = offsets.committed(pipeline.topics.spans)
    finally:
        offsets.close()
    ends = end_offsets(pipeline.bootstrap, pipeline.topics.spans)
    done = sum(max(committed.get(p, 0), 0) for p in ends)
    behind = sum(ends.values()) - done
    pool = re.search(r"([\d.]+) spans each", pipeline.log("load"))
    spans = f" (~{behind * float(pool.group(1)):,.0f} spans)" if pool else ""
    return (
        f"when the last probe was sent, the worker had committed {done} of {sum(ends.values())} "
        f"messages on otlp_spans: {behind}{spans} behind"
    )


def describe_stages(name: str, medians: dict[str, float]) -> str:
    hops = ", ".join(f"{hop} {ms:,.0f} ms" for hop, ms in medians.items())
    return f"{name}, median per hop: {hops}"


def measure(args: argparse.Namespace) -> None:
    from burnguard.contracts.topics import KafkaSettings
    from burnguard.instrumentation.guard import BudgetGuard
    from span_load import BUDGETS_YAML

    if os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None) is not None:
        note("OTEL_BSP_SCHEDULE_DELAY ignored: the probe runs with configure()'s default export delay")
    clock = SignalClock()
    with BenchPipeline("enforcement_latency", keep=args.keep) as pipeline:
        budgets = pipeline.write("budgets.yaml", BUDGETS_YAML + PROBE_BUDGET)
        worker_env = {"BURNGUARD_BUDGETS_FILE": str(budgets)}
        pipeline.start_worker(worker_env)
        kafka = KafkaSettings(bootstrap=pipeline.bootstrap)
        guard = BudgetGuard(kafka, pipeline.topics, on_signal=clock.on_signal)
        guard.start(wait_s=15)
        try:
            ends = run_phase(pipeline, clock, "idle", args.idle_probes, 0.5, drain_s=20)
            delay = re.search(r"export delay (\S+) ms", pipeline.log("probe-idle"))
            export_delay = delay.group(1) if delay else "unknown"
            idle, idle_missing = latencies_ms(clock, ends, time.time_ns())
            note(describe("no load", idle, idle_missing))
            note(describe_stages("no load", stage_times(pipeline, clock, ends)))

            load_s = args.warmup + args.seconds
            pipeline.spawn(
                "load",
                [__file__, "load", "--rate", str(args.rate), "--seconds", str(load_s), "--pool", "20000"],
            )
            pipeline.wait_for_log("load", "pool of", 120)
            time.sleep(args.warmup)
            count = int(args.seconds / args.interval)
            ends = run_phase(
                pipeline, clock, "load", count, args.interval, args.drain, lambda: note(backlog(pipeline))
            )
            gave_up = time.time_ns()
            loaded, loaded_missing = latencies_ms(clock, ends, gave_up)
            pipeline.processes["load"].wait(timeout=load_s + 60)
            note(pipeline.log("load").strip().splitlines()[-1])
            note(describe(f"under {args.rate:,.0f} spans/s", loaded, loaded_missing))
            note(describe_stages("under load", stage_times(pipeline, clock, ends)))
        finally:
            guard.stop()
    p50, p99 = percentile(loaded, 0.5), percentile(loaded, 0.99)
    print(f"\nmachine: {machine_note()}")
    print(
        f"settings: configure()'s defaults (no OTEL_BSP_SCHEDULE_DELAY): export delay {export_delay} ms, "
        "KafkaSpanExporter linger 5 ms, worker producer linger "
        f"{os.environ.get('BURNGUARD_PRODUCER_LINGER_MS', '2')} ms (BURNGUARD_PRODUCER_LINGER_MS), "
        f"snapshot interval {os.environ.get('BURNGUARD_SNAPSHOT_INTERVAL_S', '10')} s, "
        "commit interval 2.8 s (default), guard poll 200 ms"
    )
    bound = " (lower bounds: some signals never arrived)" if loaded_missing else ""
    print(
        f"under {args.rate:,.0f} spans/s: p50 {p50:,.0f} ms (target {TARGET_P50_MS}), "
        f"p99 {p99:,.0f} ms (target {TARGET_P99_MS}){bound}"
    )
    print(f"RESULT enforcement_latency p50_ms={p50:.0f} p99_ms={p99:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="role")
    probe = sub.add_parser("probe", help="(internal) the instrumented app")
    probe.add_argument("--prefix", required=True)
    probe.add_argument("--count", type=int, required=True)
    probe.add_argument("--interval", type=float, required=True)
    load = sub.add_parser("load", help="(internal) the load generator")
    load.add_argument("--rate", type=float, required=True)
    load.add_argument("--seconds", type=float, required=True)
    load.add_argument("--pool", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=10_000, help="background spans/s (default 10000)")
    parser.add_argument("--seconds", type=float, default=40, help="seconds of probes under load")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between probes")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before the first probe")
    parser.add_argument("--drain", type=float, default=60, help="seconds to wait for the last signals")
    parser.add_argument("--idle-probes", type=int, default=20, help="probes with no load first")
    parser.add_argument("--keep", action="store_true", help="keep the broker dir and logs")
    args = parser.parse_args()
    if args.role == "probe":
        run_probe(args.prefix, args.count, args.interval)
    elif args.role == "load":
        run_load(args.rate, args.seconds, args.pool)
    else:
        measure(args)


if __name__ == "__main__":
    sys.exit(main())
