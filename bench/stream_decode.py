"""In-process CPU per span of the stream worker's own Python: decode, budget deltas, context.

No broker and no Faust: the stage-1 functions of the stream job run in a loop
over the synthetic load of `span_load.py` with the 20 budgets that
`stream_throughput.py` runs (`span_load.BUDGETS_YAML`). Each figure is the best of
`--repeat` runs of CPU time (`time.process_time`), divided by every span of
the load (plain HTTP spans included, as the worker sees them):

* raw_parse: `ExportTraceServiceRequest.ParseFromString` of each message, the
  floor any decoder pays; the other figures are also given as multiples of it,
  which moves less than the absolute figures on a shared machine.
* decode: `decode_usage` (parse + one `SpanUsage` per GenAI span), the pure-Python reference.
* decode_native: the same with the native fast path (contracts/native, `--impl native|both`);
  `native_speedup` in the RESULT line is decode / decode_native, measured in the same run.
  With `--impl native` the other figures use the native decoder too.
* deltas: `usage_rows` (`usage_deltas` in a revision without it: what stage 1 calls)
  over the decoded spans of each message (pricing the
  unpriced ones, matching every budget, summing per (budget, key, window)).
  `usage_deltas` fills in prices and model classes, so each run gets freshly
  decoded spans (decoded outside the timed part).
* context: `context_observations`, with one context guard added to the budget
  set (without one it returns at once, as it does for `BUDGETS_YAML`).

    .venv/bin/python bench/stream_decode.py [--spans 20000] [--repeat 7] [--profile]
        [--plain-fraction 0.08] [--same-spans 1] [--impl both] [--compare REV] [--rounds 2]
        [--batch-min 40 --batch-max 260] [--tenants 200] [--users-per-tenant 100] [--calls-per-session 0]

`--plain-fraction` sets the share of plain HTTP spans in the load (0.9: a
Collector's whole trace pipeline, mostly non-GenAI spans). The key counts and message sizes are
`span_load.SpanMix`'s, as in `stream_throughput.py` (`--tenants 20 --users-per-tenant 10
--calls-per-session 40`: its realistic keys, sessions going on across messages). `--same-spans N` follows
each span with N-1 copies of itself (longer sessions per export batch: the spans
`usage_deltas` matches once per group). `--compare REV` also
measures the stage-1 code of git revision REV (its `burnguard`, `contracts` and
`stream` trees, exported to a scratch directory with its native module built, and imported
first in a child process) on the same load with the same `--impl`, alternating old and new
`--rounds` times, and prints both in the RESULT line (`--impl native` against a revision
without the native path stops with that said; `both` measures its python only). `--profile`
runs decode + deltas once more under cProfile and prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.stream import accounting
from burnguard.stream.accounting import BatchStats, context_observations
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from revisions import add_compare_arguments, alternating_runs, child_result
from span_load import BUDGETS_YAML, SpanMix

_NS = 1_000_000_000
#: The stream's default allowed lateness: spans older than this are not counted.
ALLOWED_LATENESS_NS = 3600 * _NS
CONTEXT_GUARD_YAML = "context_guards:\n  - {id: long-context, max_input_tokens: 8000, growth_calls: 3}\n"
#: What `--compare` takes of a revision: the packages stage 1 imports.
COMPARED_COMPONENTS = ("contracts", "stream")
#: `SpanMix`'s key counts and message sizes, each a flag of the same name.
KEY_KNOBS = ("batch_min", "batch_max", "tenants", "users_per_tenant", "calls_per_session")


def make_load(args: argparse.Namespace) -> tuple[list[bytes], int]:
    """(messages, spans in them): at least `args.spans` spans of the seeded synthetic load.

    With `--same-spans` N, each span is followed in its message by N-1 copies of itself (new span
    ids): sessions that make N times as many calls of a kind in one export batch.
    """
    spans, same_spans = args.spans, args.same_spans
    mix = SpanMix.from_args(args)
    messages = []
    while mix.spans * same_spans < spans:
        messages.append(mix.message()[1])
    if same_spans > 1:
        messages = [_with_copies(payload, same_spans) for payload in messages]
    return messages, mix.spans * same_spans


def _with_copies(payload: bytes, same_spans: int) -> bytes:
    request = ExportTraceServiceRequest.FromString(payload)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            originals = list(scope_spans.spans)
            del scope_spans.spans[:]
            for span in originals:
                for _ in range(same_spans):
                    copy = scope_spans.spans.add()
                    copy.CopyFrom(span)
                    copy.span_id = os.urandom(8)
    return request.SerializeToString()


def _nothing() -> None:
    return None


def best_cpu_s(run: Callable[[Any], Any], repeat: int, prepare: Callable[[], Any] = _nothing) -> float:
    """The least CPU time of `repeat` runs of `run(prepare())`; `prepare` is not timed."""
    best = float("inf")
    for _ in range(repeat):
        made = prepare()
        gc.collect()
        started = time.process_time()
        run(made)
        best = min(best, time.process_time() - started)
    return best


def raw_parse(messages: list[bytes]) -> None:
    for payload in messages:
        ExportTraceServiceRequest().ParseFromString(payload)


def decode_all(messages: list[bytes]) -> list[list[SpanUsage]]:
    return [decode_usage(payload) for payload in messages]


def deltas_all(batches: list[list[SpanUsage]], config: BudgetConfig, prices: PriceBook) -> int:
    """The deltas per message as stage 1 makes them; the number of deltas (a sanity figure)."""
    closed_before_ns = time.time_ns() - ALLOWED_LATENESS_NS
    stats = BatchStats()
    made = 0
    for offset, usages in enumerate(batches):
        if hasattr(accounting, "usage_rows"):  # stage 1's since 2026-12-02: the rows, no `UsageDelta`s
            made += len(accounting.usage_rows(usages, config, prices, stats, closed_before_ns))
        else:
            made += len(accounting.usage_deltas(usages, config, prices, stats, (0, offset), closed_before_ns))
    return made


def context_all(batches: list[list[SpanUsage]], config: BudgetConfig) -> None:
    for usages in batches:
        context_observations(usages, config)


def profile(messages: list[bytes], config: BudgetConfig, prices: PriceBook, top: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    deltas_all(decode_all(messages), config, prices)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def use_decoder(impl: str) -> bool:
    """Make `decode_spans` use `impl` ("python" or "native"); False when there is no native path
    (a revision from before it, or the module not built)."""
    import burnguard.contracts.otlp as decoder

    if not hasattr(decoder, "native_decoder"):
        return impl == "python"
    native = decoder.native_decoder() if impl == "native" else None
    if impl == "native" and native is None:
        return False
    decoder._native = native
    return True


def decode_figures(messages: list[bytes], repeat: int, native_too: bool, impl: str) -> dict[str, float]:
    """{"decode": s} of the selected decoder; with `native_too` also "decode_native", the two
    measured run by run in alternation so the machine's load hits both alike."""
    if not native_too:
        return {"decode": best_cpu_s(lambda _: decode_all(messages), repeat)}
    best = {"decode": float("inf"), "decode_native": float("inf")}
    for _ in range(repeat):
        for name, used in (("decode", "python"), ("decode_native", "native")):
            use_decoder(used)
            best[name] = min(best[name], best_cpu_s(lambda _: decode_all(messages), 1))
    use_decoder("native" if impl == "native" else "python")
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The figures of the code this process imports, µs per span (every span of the load)."""
    import burnguard.contracts.otlp as decoder

    messages, spans = make_load(args)
    native_too = args.impl == "both" and use_decoder("native")
    if not use_decoder("native" if args.impl == "native" else "python"):
        raise SystemExit("--impl native: burnguard.contracts._otlp_native is not built (make venv)")
    config = parse_budget_yaml(BUDGETS_YAML)
    context_config = parse_budget_yaml(BUDGETS_YAML + CONTEXT_GUARD_YAML)
    prices = PriceBook(config.prices)
    decoded = decode_all(messages)
    genai = sum(len(batch) for batch in decoded)
    deltas = deltas_all(decoded, config, prices)  # warms the price book and the matchers
    figures = {
        "raw_parse": best_cpu_s(lambda _: raw_parse(messages), args.repeat),
        **decode_figures(messages, args.repeat, native_too, args.impl),
        "deltas": best_cpu_s(
            lambda batches: deltas_all(batches, config, prices), args.repeat, lambda: decode_all(messages)
        ),
        "context": best_cpu_s(
            lambda batches: context_all(batches, context_config), args.repeat, lambda: decode_all(messages)
        ),
    }
    per_span = {name: seconds / spans * 1e6 for name, seconds in figures.items()}
    load = (
        f"{spans} spans ({genai} GenAI) in {len(messages)} messages, {len(config.budgets)} budgets, "
        f"{deltas} deltas"
    )
    return {"code": decoder.__file__, "load": load, "us": per_span, "impl": args.impl}


def measure_child(args: argparse.Namespace, pythonpath: Path) -> dict[str, Any]:
    """`measure` in a process that imports the exported revision (its module path proves which)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    command += ["--spans", str(args.spans), "--repeat", str(args.repeat)]
    command += ["--plain-fraction", str(args.plain_fraction), "--same-spans", str(args.same_spans)]
    command += [item for knob in KEY_KNOBS for item in (_flag(knob), str(getattr(args, knob)))]
    command += ["--impl", args.impl]  # a revision without the native path: `both` is its python
    return child_result(command, pythonpath)


def _flag(knob: str) -> str:
    return f"--{knob.replace('_', '-')}"


def show(label: str, run: dict[str, Any]) -> None:
    us = run["us"]
    print(f"{label} ({run['code']}):")
    for name, micros in us.items():
        print(f"  {name:10s} {micros:7.2f} us/span  ({micros / us['raw_parse']:5.1f}x raw parse)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_000, help="spans in the load (default 20000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure; the best counts (default 7)")
    parser.add_argument(
        "--plain-fraction", type=float, default=SpanMix.plain_fraction, help="share of plain HTTP spans"
    )
    parser.add_argument(
        "--same-spans", type=int, default=1, help="each span and N-1 copies of it in its message (default 1)"
    )
    parser.add_argument(
        "--impl",
        choices=("python", "native", "both"),
        default="both",
        help="decoder: the pure-Python reference, the native fast path, or both side by side (default)",
    )
    for knob in KEY_KNOBS:
        default = getattr(SpanMix, knob)
        parser.add_argument(_flag(knob), type=int, default=default, help=f"default {default}")
    add_compare_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of decode + deltas")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    runs = alternating_runs(
        args.compare,
        args.rounds,
        COMPARED_COMPONENTS,
        lambda: measure(args),
        lambda old_path: measure_child(args, old_path),
    )
    new = {name: min(run["us"][name] for run in runs["new"]) for name in runs["new"][0]["us"]}
    keys = " ".join(f"{knob}={getattr(args, knob)}" for knob in KEY_KNOBS)
    shape = f"plain fraction {args.plain_fraction:g}, same spans {args.same_spans}, impl {args.impl}, {keys}"
    print(f"load: {runs['new'][0]['load']}; {shape}; best of {args.repeat}")
    show("this checkout", {"code": runs["new"][0]["code"], "us": new})
    fields = " ".join(f"{name}_us={micros:.2f}" for name, micros in new.items())
    if "decode_native" in new:
        fields += f" native_speedup={new['decode'] / new['decode_native']:.2f}"
    if runs["old"]:
        old = {name: min(run["us"][name] for run in runs["old"]) for name in runs["old"][0]["us"]}
        show(f"--compare {args.compare}", {"code": runs["old"][0]["code"], "us": old})
        compared = [name for name in ("decode", "decode_native", "deltas", "raw_parse") if name in old]
        fields += " " + " ".join(f"old_{name}_us={old[name]:.2f}" for name in compared)
        decode = new.get("decode_native", new["decode"])  # what decode_spans uses by default
        old_decode = old.get("decode_native", old["decode"])
        stage1 = (old_decode + old["deltas"]) / (decode + new["deltas"])
        fields += f" stage1_speedup={stage1:.2f}"
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    if args.profile:
        messages, _ = make_load(args)
        config = parse_budget_yaml(BUDGETS_YAML)
        profile(messages, config, PriceBook(config.prices))
    print(
        f"RESULT stream_decode plain_fraction={args.plain_fraction:g} same_spans={args.same_spans} "
        f"impl={args.impl} {keys} {fields}"
    )


if __name__ == "__main__":
    main()
