"""In-process CPU and signals of the stream worker's refresh rounds, after stage 2 took a load.

No broker. Stage 1 of this checkout turns the seeded `span_load.py` load into usage records (as
`bench/stream_account.py` does); a child process then runs stage 2 of the measured code over them
(`stream_account.account_all`, signals into a producer that never connects), with the worker's
collector settings (`tune_gc`, `freeze_startup_heap`) and its clock (`app._now`) held at the
start. Then `--rounds-of-refresh` refresh rounds, one every refresh interval of that clock (30 s,
the default), each as the worker runs it: `BudgetJob._refresh` walks the
signal states and sends its `ticks` records; here they are encoded, decoded with the usage
topic's codec and accounted by `_account_one` at once (the usage topic's hop, without the
broker). Per round: the CPU time of all that (`time.process_time`), the keys ticked, the signals
handed to the producer. No delta arrives between rounds, so every signal of a round is a refresh
or a lift.

    .venv/bin/python bench/refresh_rounds.py [--spans 300000] [--tenants 20 --users-per-tenant 10
        --calls-per-session 40] [--rounds-of-refresh 8] [--compare REV] [--rounds 1]

`--compare REV` measures the code of git revision REV (`contracts` and `stream`) too, on the same
usage records, alternating old and new.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from revisions import add_compare_arguments, child_result, parsed_or_child
from span_load import SpanMix
from stream_account import account_all, as_the_worker_starts, compared_runs, new_job, usage_serializer


def signals_sent(job: Any) -> int:
    return job.bench_producer.sent.get(job.settings.topics.signals, 0)


def refresh_round(job: Any, sent: list[tuple[str, Any]]) -> int:
    """One round: `_refresh`, then each `ticks` record it sent through the codec into `_account_one`
    on its partition; the keys ticked."""
    from burnguard.stream.partitioner import usage_partition
    from burnguard.stream.records import TICKS, keys_record

    loads, serializer = job.app.serializers.loads_value, usage_serializer(job)

    async def run() -> int:
        sent.clear()
        await job._refresh()
        by_partition: dict[int, list[Any]] = {}
        for partition_key, row in sent:
            by_partition.setdefault(usage_partition(partition_key, job.settings.partitions), []).append(row)
        for partition, rows in sorted(by_partition.items()):
            payload = json.dumps(keys_record(TICKS, rows), separators=(",", ":")).encode()
            job.changes.partition = partition
            await job._account_one(loads(None, payload, serializer=serializer))
        job.changes.take_records()
        return len(sent)

    return asyncio.run(run())


def measure(args: argparse.Namespace, records_file: Path) -> dict[str, Any]:
    """Stage 2 over the records, then the refresh rounds, with the code this process imports."""
    import burnguard.stream.app as app
    from burnguard.stream.records import TICKS

    load = json.loads(records_file.read_text())
    records = [(partition, payload.encode()) for partition, payload in load["records"]]
    clock = [datetime.now(UTC)]
    app._now = lambda: clock[0]
    sent: list[tuple[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        if hasattr(app, "tune_gc"):
            app.tune_gc()  # as `run_worker` sets the collector before it builds the job
        job = as_the_worker_starts(new_job(Path(scratch) / "job"))

        async def capture(kind: str, items: Any) -> None:
            if kind == TICKS:
                sent.extend(items)

        job._send_per_partition = capture
        account_all(job, records, 200)
        states = Counter(state["action"] for state in job.states.data.values() if state)
        published = signals_sent(job)
        rounds = []
        for _ in range(args.rounds_of_refresh):
            clock[0] += job.settings.refresh_interval
            before, started = signals_sent(job), time.process_time()
            ticked = refresh_round(job, sent)
            seconds = time.process_time() - started
            rounds.append({"ticked": ticked, "signals": signals_sent(job) - before, "ms": seconds * 1e3})
    return {"code": app.__file__, "states": dict(states), "published_by_deltas": published, "rounds": rounds}


def measure_child(args: argparse.Namespace, records_file: Path, pythonpath: Path | None) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(records_file)]
    command += ["--rounds-of-refresh", str(args.rounds_of_refresh)]
    return child_result(command, pythonpath)


def show(label: str, run: dict[str, Any]) -> None:
    rounds = run["rounds"]
    print(
        f"{label} ({run['code']}): states {json.dumps(run['states'])}, {run['published_by_deltas']} signals"
    )
    for number, one in enumerate(rounds, 1):
        print(
            f"  round {number}: {one['ticked']:7d} keys ticked {one['signals']:7d} signals"
            f" {one['ms']:8.1f} ms CPU"
        )
    ticked, signals = sum(r["ticked"] for r in rounds), sum(r["signals"] for r in rounds)
    print(
        f"  all {len(rounds)}: {ticked} ticked, {signals} signals, {sum(r['ms'] for r in rounds):.1f} ms CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=300_000, help="spans in the load (default 300000)")
    parser.add_argument("--batch-min", type=int, default=SpanMix.batch_min, help="spans per message, least")
    parser.add_argument("--batch-max", type=int, default=SpanMix.batch_max, help="spans per message, most")
    parser.add_argument("--plain-fraction", type=float, default=SpanMix.plain_fraction)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--users-per-tenant", type=int, default=10)
    parser.add_argument("--calls-per-session", type=int, default=40)
    parser.add_argument("--messages-per-batch", type=int, default=200, help="OTLP messages per micro-batch")
    parser.add_argument("--rounds-of-refresh", type=int, default=8, help="refresh rounds (default 8: 4 min)")
    parser.add_argument("--combine", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    add_compare_arguments(parser, rounds=1)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parsed_or_child(parser, measure)
    if args is None:
        return
    with tempfile.TemporaryDirectory() as scratch_dir:
        runs, _, count, spans, _ = compared_runs(args, Path(scratch_dir), measure_child)
    print(
        f"load: {spans} spans, {count} usage records; {args.tenants} tenants x {args.users_per_tenant} users"
    )
    for side in ("old", "new"):
        for run in runs[side]:
            show(side, run)
    for side in ("old", "new"):
        for run in runs[side]:
            rounds = run["rounds"]
            signals = sum(r["signals"] for r in rounds)
            print(
                f"RESULT refresh_rounds code={side} spans={spans} rounds={len(rounds)} "
                f"ticked={sum(r['ticked'] for r in rounds)} signals={signals} "
                f"cpu_ms={sum(r['ms'] for r in rounds):.1f} signals_per_span={signals / spans:.4f}"
            )


if __name__ == "__main__":
    main()
