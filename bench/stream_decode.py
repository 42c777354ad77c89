"""In-process CPU per span of the stream worker's own Python: decode, budget deltas, context.

No broker and no Faust: the stage-1 functions of the stream job run in a loop
over the synthetic load of `span_load.py` with the 20 budgets that
`stream_throughput.py` runs (`span_load.BUDGETS_YAML`). Each figure is the best of
`--repeat` runs of CPU time (`time.process_time`), divided by every span of
the load (plain HTTP spans included, as the worker sees them):

* raw_parse: `ExportTraceServiceRequest.ParseFromString` of each message, the
  floor any decoder pays; the other figures are also given as multiples of it,
  which moves less than the absolute figures on a shared machine.
* decode: `decode_usage` (parse + one `SpanUsage` per GenAI span).
* deltas: `usage_deltas` over the decoded spans of each message (pricing the
  unpriced ones, matching every budget, summing per (budget, key, window)).
  `usage_deltas` fills in prices and model classes, so each run gets freshly
  decoded spans (decoded outside the timed part).
* context: `context_observations`, with one context guard added to the budget
  set (without one it returns at once, as it does for `BUDGETS_YAML`).

    .venv/bin/python bench/stream_decode.py [--spans 20000] [--repeat 7] [--profile]

`--profile` runs decode + deltas once more under cProfile and prints the top
functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
from collections.abc import Callable
from typing import Any

from burnguard.contracts.budgets import BudgetConfig, parse_budget_yaml
from burnguard.contracts.otlp import decode_usage
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.usage import SpanUsage
from burnguard.stream.accounting import BatchStats, context_observations, usage_deltas
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from span_load import BUDGETS_YAML, SpanMix

_NS = 1_000_000_000
#: The stream's default allowed lateness: spans older than this are not counted.
ALLOWED_LATENESS_NS = 3600 * _NS
CONTEXT_GUARD_YAML = "context_guards:\n  - {id: long-context, max_input_tokens: 8000, growth_calls: 3}\n"


def make_load(spans: int) -> tuple[list[bytes], int]:
    """(messages, spans in them): at least `spans` spans of the seeded synthetic load."""
    mix = SpanMix()
    messages = []
    while mix.spans < spans:
        messages.append(mix.message()[1])
    return messages, mix.spans


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
    """`usage_deltas` per message as stage 1 calls it; the number of deltas (a sanity figure)."""
    closed_before_ns = time.time_ns() - ALLOWED_LATENESS_NS
    stats = BatchStats()
    made = 0
    for offset, usages in enumerate(batches):
        made += len(usage_deltas(usages, config, prices, stats, (0, offset), closed_before_ns))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_000, help="spans in the load (default 20000)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure; the best counts (default 7)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of decode + deltas")
    args = parser.parse_args()

    messages, spans = make_load(args.spans)
    config = parse_budget_yaml(BUDGETS_YAML)
    context_config = parse_budget_yaml(BUDGETS_YAML + CONTEXT_GUARD_YAML)
    prices = PriceBook(config.prices)
    decoded = decode_all(messages)
    genai = sum(len(batch) for batch in decoded)
    deltas = deltas_all(decoded, config, prices)  # warms the price book and the matchers
    print(
        f"load: {spans} spans ({genai} GenAI) in {len(messages)} messages, {len(config.budgets)} budgets, "
        f"{deltas} deltas; best of {args.repeat}"
    )

    figures = {
        "raw_parse": best_cpu_s(lambda _: raw_parse(messages), args.repeat),
        "decode": best_cpu_s(lambda _: decode_all(messages), args.repeat),
        "deltas": best_cpu_s(
            lambda batches: deltas_all(batches, config, prices), args.repeat, lambda: decode_all(messages)
        ),
        "context": best_cpu_s(
            lambda batches: context_all(batches, context_config), args.repeat, lambda: decode_all(messages)
        ),
    }
    per_span = {name: seconds / spans * 1e6 for name, seconds in figures.items()}
    for name, micros in per_span.items():
        print(f"  {name:10s} {micros:7.2f} us/span  ({micros / per_span['raw_parse']:5.1f}x raw parse)")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    if args.profile:
        profile(messages, config, prices)
    print(
        f"RESULT stream_decode decode_us={per_span['decode']:.2f} deltas_us={per_span['deltas']:.2f} "
        f"raw_parse_us={per_span['raw_parse']:.2f} context_us={per_span['context']:.2f}"
    )


if __name__ == "__main__":
    main()
