"""How far past a tenant's limit 50 concurrent callers in two processes get with enforcement on,
and how much of it is left unused when the first call is refused.

Two app processes, 25 caller threads each, share one tenant. Each process
runs configure() with enforcement on (a BudgetGuard following the signals
topic, spans to Kafka with OTEL_BSP_SCHEDULE_DELAY=10 ms). Every caller
loops `llm_call("gpt-4.1")` with a simulated model latency (--call-ms) and
fixed usage (2,000 input + 500 output tokens = $0.008 a call on gpt-4.1,
$0.0016 on gpt-4.1-mini); a denied call (BudgetExceeded) is retried after
50 ms. A caller stops once it has been denied for 2 s straight. The budget:
tenant `overshoot-tenant`, window day, cost_usd, limit --limit, warn at 0.5,
downgrade to standard (gpt-4.1-mini) at 0.7, throttle at 1.0: the calls near
the limit run on the downgraded model.

The guard accounts locally between signals (docs/ARCHITECTURE.md §12); `--no-local-accounting`
turns that off in the app processes (nothing is reserved or settled, so the
guard acts on the signals alone), for a comparison under the same load.

Spend is what the apps paid: the cost of every call that was let through.
overshoot_fraction = (spend - limit) / limit. The target is 1% of the limit
or the cost of one call per caller, whichever is larger (a call at the limit
costs what the downgraded model costs). The undershoot is the budget left
unused when the first call is refused (by either process): the limit less
the cost of every call started before that refusal; the target is at most
one call's cost. The worker's own total is checked against the apps' once
every span is accounted.

`--late-start-s` starts the last process's callers that much later, so each
guard's share of the key at the first signals differs from the share after them.

    .venv/bin/python bench/overshoot.py [--limit 20] [--call-ms 200] [--no-local-accounting]
                                        [--late-start-s 1.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from pipeline_setup import BenchPipeline, latest_usage, machine_note, note
from span_load import MODEL_CONFIG_YAML

TENANT = "overshoot-tenant"
PROCESSES = 2
CALLERS_PER_PROCESS = 25
INPUT_TOKENS, OUTPUT_TOKENS = 2000, 500
MODEL = "gpt-4.1"
HOLD_S = 2.0


# --- one app process (a subprocess) --------------------------------------------------------------


def run_app(
    name: str,
    callers: int,
    call_s: float,
    go_file: Path,
    out_file: Path,
    timeout_s: float,
    local: bool,
    late_s: float = 0.0,
) -> None:
    from burnguard.instrumentation import BudgetExceeded, attribute, configure, llm_call
    from burnguard.instrumentation.runtime import Settings

    runtime = configure(Settings.from_env(), service_name=f"overshoot-{name}")
    guard = runtime.guard
    assert guard is not None, "enforcement is off"
    # configure() waits 0.5 s for the replay (`BURNGUARD_GUARD_WAIT_S`); on a loaded machine it can
    # take longer, and the measurement starts only once every app's guard holds the topic's state
    assert guard.wait_for(lambda g: g.ready, 30.0), "the guard did not replay the signals topic within 30 s"
    if not local:
        guard.reserve = lambda model=None, attribution=None: None  # type: ignore[method-assign,assignment]
    print("ready", flush=True)
    while not go_file.exists():
        time.sleep(0.005)
    time.sleep(late_s)
    deadline = time.monotonic() + timeout_s
    calls: list[tuple[int, int, float]] = []  # (start ns, end ns, cost) of every call let through
    denied = [0]
    first_denied_ns: list[int] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        denied_since: float | None = None
        with attribute(tenant=TENANT, user=f"{name}-caller-{index:02d}"):
            while time.monotonic() < deadline:
                start = time.time_ns()
                try:
                    with llm_call(MODEL, "openai") as call:
                        time.sleep(call_s)
                        call.set_usage(INPUT_TOKENS, OUTPUT_TOKENS)
                except BudgetExceeded:
                    with lock:
                        denied[0] += 1
                        if not first_denied_ns:
                            first_denied_ns.append(time.time_ns())
                    now = time.monotonic()
                    denied_since = denied_since or now
                    if now - denied_since >= HOLD_S:
                        return
                    time.sleep(0.05)
                    continue
                denied_since = None
                with lock:
                    calls.append((start, call.span.end_time, call.cost_usd or 0.0))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runtime.flush()
    runtime.shutdown()
    stats = {
        "denied": denied[0],
        "local_denied": guard.stats.local_denied,
        "first_denied_ns": first_denied_ns[0] if first_denied_ns else None,
    }
    out_file.write_text(json.dumps({"calls": calls, **stats}))
    print("done", flush=True)


# --- the measuring process -----------------------------------------------------------------------


def analyse(calls: list[tuple[int, int, float]], limit: float) -> dict[str, float]:
    """Split the spend past the limit into calls in flight at the crossing and calls started after it."""
    spent, crossing_ns = 0.0, None
    for _start, end, cost in sorted(calls, key=lambda c: c[1]):
        spent += cost
        if spent >= limit:
            crossing_ns = end
            break
    if crossing_ns is None:
        return {"crossed": 0.0}
    in_flight = [c for c in calls if c[0] < crossing_ns < c[1]]
    late = [c for c in calls if c[0] >= crossing_ns]
    last_start = max((c[0] for c in late), default=crossing_ns)
    return {
        "crossed": 1.0,
        "in_flight_calls": len(in_flight),
        "in_flight_usd": sum(c[2] for c in in_flight),
        "late_calls": len(late),
        "late_usd": sum(c[2] for c in late),
        "last_allowed_start_ms": (last_start - crossing_ns) / 1e6,
        "first_start_ns": min(c[0] for c in calls),
        "crossing_ns": crossing_ns,
        "calls_before": sum(1 for c in calls if c[1] <= crossing_ns),
    }


def undershoot(calls: list[tuple[int, int, float]], first_denied_ns: int | None, limit: float) -> float:
    """The budget left unused when the first call was refused: the limit less every call started before."""
    if first_denied_ns is None:
        return limit - sum(c[2] for c in calls)
    return max(0.0, limit - sum(c[2] for c in calls if c[0] < first_denied_ns))


def measure(args: argparse.Namespace) -> None:
    budgets_yaml = MODEL_CONFIG_YAML + (
        "budgets:\n"
        f"  - {{id: tenant-daily, scope: tenant, match: {TENANT}, window: day, limit: {args.limit},\n"
        "     actions: [{at: 0.5, do: warn}, {at: 0.7, do: downgrade, to: standard},\n"
        "               {at: 1.0, do: throttle}]}\n"
    )
    call_s = args.call_ms / 1000
    with BenchPipeline("overshoot", keep=args.keep) as pipeline:
        budgets = pipeline.write("budgets.yaml", budgets_yaml)
        pipeline.start_worker({"BURNGUARD_BUDGETS_FILE": str(budgets), "BURNGUARD_SNAPSHOT_INTERVAL_S": "1"})
        go = pipeline.root / "go"
        app_env = {
            "BURNGUARD_ENFORCE": "1",
            "BURNGUARD_BUDGETS_FILE": str(budgets),
            "OTEL_BSP_SCHEDULE_DELAY": "10",
        }
        outputs = []
        for index in range(PROCESSES):
            name = f"app{index}"
            out = pipeline.root / f"{name}.json"
            outputs.append(out)
            args_ = [__file__, "app", "--name", name, "--callers", str(CALLERS_PER_PROCESS)]
            args_ += ["--call-s", str(call_s), "--go", str(go), "--out", str(out)]
            args_ += ["--timeout", str(args.timeout)] + ([] if args.local_accounting else ["--no-local"])
            args_ += ["--late-s", str(args.late_start_s if index == PROCESSES - 1 else 0.0)]
            pipeline.spawn(name, args_, app_env)
        for index in range(PROCESSES):
            pipeline.wait_for_log(f"app{index}", "ready", 60)
        go.touch()
        started = time.monotonic()
        for index in range(PROCESSES):
            pipeline.processes[f"app{index}"].wait(timeout=args.timeout + 60)
            if pipeline.processes[f"app{index}"].returncode != 0:
                raise RuntimeError(pipeline.log(f"app{index}")[-3000:])
        note(f"callers done after {time.monotonic() - started:.1f}s")
        calls, denied, local_denied, first_denials = [], 0, 0, []
        for out in outputs:
            result = json.loads(out.read_text())
            calls += [tuple(c) for c in result["calls"]]
            denied += result["denied"]
            local_denied += result["local_denied"]
            if result["first_denied_ns"] is not None:
                first_denials.append(result["first_denied_ns"])
        spend = sum(c[2] for c in calls)
        worker_spent = wait_for_worker_total(pipeline, spend)
    call_cost = max(calls, key=lambda c: c[1])[2]  # the last call's: the model calls at the limit ran on
    first_cost = min(calls, key=lambda c: c[0])[2]
    overshoot = (spend - args.limit) / args.limit
    unused = undershoot(calls, min(first_denials, default=None), args.limit)
    target = max(0.01 * args.limit, PROCESSES * CALLERS_PER_PROCESS * call_cost) / args.limit
    parts = analyse(calls, args.limit)
    duration = (parts.get("crossing_ns", 0) - parts.get("first_start_ns", 0)) / 1e9
    print(f"\nmachine: {machine_note()}")
    print(f"local accounting in the guard: {'on' if args.local_accounting else 'off'}")
    print(f"the last process started calling {args.late_start_s:g} s after the others")
    print(
        f"{PROCESSES} processes x {CALLERS_PER_PROCESS} callers, {args.call_ms:.0f} ms per call, "
        f"${first_cost:.4f} per call, ${call_cost:.4f} once downgraded, limit ${args.limit:g} "
        f"(reached after {duration:.1f}s, "
        f"{parts.get('calls_before', 0) / max(duration, 1e-9):,.0f} calls/s before it)"
    )
    print(
        f"calls let through {len(calls)}, denied {denied} ({local_denied} by local accounting); "
        f"spend ${spend:.4f}, worker counted ${worker_spent:.4f}"
    )
    if parts["crossed"]:
        print(
            f"past the limit: {parts['in_flight_calls']} calls in flight when it was crossed "
            f"(${parts['in_flight_usd']:.3f}), {parts['late_calls']} calls started after it "
            f"(${parts['late_usd']:.3f}); the last one started {parts['last_allowed_start_ms']:.0f} ms "
            "after the crossing"
        )
    print(f"overshoot {overshoot:.4f} of the limit (target <= {target:.4f})")
    print(
        f"undershoot: ${unused:.4f} of the limit unused at the first refusal = "
        f"{unused / call_cost:.2f} calls of ${call_cost:.4f} (target <= 1 call)"
    )
    print(
        f"RESULT overshoot overshoot_fraction={overshoot:.4f} undershoot_usd={unused:.4f} "
        f"undershoot_calls={unused / call_cost:.2f}"
    )


def wait_for_worker_total(pipeline: BenchPipeline, spend: float, timeout_s: float = 60.0) -> float:
    """The worker's total for the tenant, once it equals what the apps paid (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    spent = 0.0
    while time.monotonic() < deadline:
        usage = latest_usage(pipeline.bootstrap, pipeline.topics.budget_usage)
        spent = sum(u.spent for u in usage.values() if u.budget == "tenant-daily" and u.key == TENANT)
        if abs(spent - spend) < 1e-6:
            return spent
        time.sleep(1)
    note(f"the worker's total ${spent:.4f} never matched the apps' ${spend:.4f}")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="role")
    app = sub.add_parser("app", help="(internal) one app process")
    app.add_argument("--name", required=True)
    app.add_argument("--callers", type=int, required=True)
    app.add_argument("--call-s", type=float, required=True)
    app.add_argument("--go", type=Path, required=True)
    app.add_argument("--out", type=Path, required=True)
    app.add_argument("--timeout", type=float, required=True)
    app.add_argument("--no-local", action="store_true")
    app.add_argument("--late-s", type=float, default=0.0)
    parser.add_argument("--limit", type=float, default=20.0, help="the tenant's limit in USD (default 20)")
    parser.add_argument("--call-ms", type=float, default=200.0, help="simulated model latency (default 200)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds the callers may run")
    parser.add_argument("--keep", action="store_true", help="keep the broker dir and logs")
    parser.add_argument(
        "--late-start-s",
        type=float,
        default=0.0,
        help="the last process starts calling this much later (a mix of processes that changes)",
    )
    parser.add_argument(
        "--no-local-accounting",
        dest="local_accounting",
        action="store_false",
        help="the guard acts on signals alone (for comparison)",
    )
    args = parser.parse_args()
    if args.role == "app":
        run_app(
            args.name,
            args.callers,
            args.call_s,
            args.go,
            args.out,
            args.timeout,
            not args.no_local,
            args.late_s,
        )
    else:
        measure(args)


if __name__ == "__main__":
    sys.exit(main())
