"""Sink ingest rate into the embedded engine (chDB), in batches, with every rollup attached.

    .venv/bin/python bench/sink_ingest.py [--spans 1000000] [--batch 10000]

Builds `SpanUsage` rows first (not timed: that is decoding, measured elsewhere),
then times `ClickHouseWriter.insert_spans` — the sink's write path: rows to
columns, one INSERT per batch, the materialized views of migration 2 fed by
each INSERT. The baseline, in the same run and the same kind of fresh table,
is clickhouse-connect inserting the same data as pre-built columns (no Python
objects to convert). Last line: `RESULT sink_ingest rows_per_s=N`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.clickhouse import SPAN_COLUMNS, ClickHouseWriter, KafkaOrigin, connect, span_columns
from burnguard.sinks.schema import SPANS_TABLE, migrate

TENANTS = [f"tenant-{i}" for i in range(20)]
WORKFLOWS = ["triage", "summarize", "search", "draft", "review", "classify"]
MODELS = [("gpt-4.1", "premium"), ("gpt-4.1-mini", "standard"), ("gpt-4.1-nano", "economy")]
T0_NS = 1_767_600_000 * 1_000_000_000  # 2026-01-05


def make_spans(count: int, seed: int = 7) -> list[SpanUsage]:
    rng = random.Random(seed)
    spans = []
    for i in range(count):
        trace, position = divmod(i, 5)
        model, model_class = MODELS[rng.randrange(3)]
        tool = position == 4
        workflow = WORKFLOWS[trace % len(WORKFLOWS)]
        start = T0_NS + i * 50_000_000  # 20 spans a second
        spans.append(
            SpanUsage(
                trace_id=f"{trace:032x}",
                span_id=f"{i + 1:016x}",
                parent_span_id="" if position == 0 else f"{trace * 5 + 1:016x}",
                name="execute_tool search" if tool else f"chat {model}",
                start_ns=start,
                end_ns=start + 700_000_000,
                operation="execute_tool" if tool else "chat",
                provider="openai",
                request_model="" if tool else model,
                response_model="" if tool else model,
                service="bench",
                tenant=TENANTS[trace % len(TENANTS)],
                user=f"user-{trace % 500}",
                workflow=workflow,
                feature=workflow,
                session=f"session-{trace // 4}",
                action=f"action-{trace}",
                input_tokens=0 if tool else rng.randrange(200, 8000),
                output_tokens=0 if tool else rng.randrange(20, 800),
                cost_usd=None if tool else rng.random() / 100,
                model_class="" if tool else model_class,
                downgraded_from="gpt-4.1" if (not tool and model_class == "standard" and i % 7 == 0) else "",
            )
        )
    return spans


def _fresh(directory: Path, optimize_on_insert: bool):
    # optimize_on_insert=0: ReplacingMergeTree skips collapsing duplicates inside each
    # inserted block (FINAL and merges still collapse them); it more than halves the
    # engine's insert cost here.
    settings = {} if optimize_on_insert else {"optimize_on_insert": 0}
    client = connect(f"chdb://{directory}", settings=settings)
    migrate(client)
    return client


def run_writer(client, spans: list[SpanUsage], batch: int) -> float:
    writer = ClickHouseWriter(client, batch_size=batch)
    origins = [KafkaOrigin("otlp_spans", 0, i) for i in range(len(spans))]
    started = time.perf_counter()
    writer.insert_spans(spans, origins)
    return time.perf_counter() - started


def run_baseline(client, spans: list[SpanUsage], batch: int) -> float:
    """clickhouse-connect's own column insert of pre-built columns, same batches."""
    origins = [KafkaOrigin("otlp_spans", 0, i) for i in range(len(spans))]
    batches = [
        span_columns(spans[start : start + batch], origins[start : start + batch])
        for start in range(0, len(spans), batch)
    ]
    started = time.perf_counter()
    for columns in batches:
        client.insert(SPANS_TABLE, columns, column_names=list(SPAN_COLUMNS), column_oriented=True)
    return time.perf_counter() - started


def run_engine_only(client, count: int) -> float:
    """The engine's own ceiling: the same rows again by INSERT ... SELECT (views attached, no Python)."""
    client.command(
        f"CREATE TABLE bench_source ENGINE = MergeTree ORDER BY tuple() AS SELECT * FROM {SPANS_TABLE}"
    )
    started = time.perf_counter()
    client.command(f"INSERT INTO {SPANS_TABLE} SELECT * FROM bench_source")
    elapsed = time.perf_counter() - started
    client.command("DROP TABLE bench_source")
    return elapsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument(
        "--optimize-on-insert",
        action="store_true",
        help="keep ClickHouse's default optimize_on_insert=1 (collapse duplicates in each block on insert)",
    )
    args = parser.parse_args(argv)
    spans = make_spans(args.spans)
    work = Path(tempfile.mkdtemp(prefix="burnguard-bench-"))
    try:
        client = _fresh(work / "writer", args.optimize_on_insert)
        writer_s = run_writer(client, spans, args.batch)
        stored = int(client.command(f"SELECT count() FROM {SPANS_TABLE}"))
        rollup_rows = int(client.command("SELECT count() FROM genai_usage_1m"))
        assert stored == len(spans), (stored, len(spans))
        engine_s = run_engine_only(client, len(spans))
        client.close()
        client = _fresh(work / "baseline", args.optimize_on_insert)
        baseline_s = run_baseline(client, spans, args.batch)
        client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = len(spans) / writer_s
    baseline = len(spans) / baseline_s
    print(
        f"spans={len(spans)} batch={args.batch} optimize_on_insert={int(args.optimize_on_insert)}"
        f" (5 views attached; {rollup_rows} per-minute rows)"
    )
    print(
        f"baseline, clickhouse-connect insert of ready columns: {baseline:,.0f} rows/s ({baseline_s:.2f} s)"
    )
    print(f"ClickHouseWriter.insert_spans (SpanUsage -> INSERT): {rate:,.0f} rows/s ({writer_s:.2f} s)")
    print(f"ratio writer/baseline: {rate / baseline:.2f}")
    print(f"engine alone (INSERT ... SELECT, views attached): {len(spans) / engine_s:,.0f} rows/s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"RESULT sink_ingest rows_per_s={rate:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
