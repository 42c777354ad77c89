"""In-process CPU per signal of the stream worker: deciding it, its state, handing it over, reading it back.

No broker. Stage 1 of this checkout turns the seeded `span_load.py` load into usage records (as
`bench/stream_account.py` does); a child process then runs stage 2 of the measured code over
them once, keeping the inputs of every `changed_signal` call that published a signal (the
budget, key, window, a copy of the totals, the time, the previous state). On those inputs, each
phase is timed alone, best of `--repeat` runs, per signal:

* decide: `BudgetJob._signal_if_changed` (deciding, building the `Signal`, its reason and the
  `signal-states` write into the record cache), the key's previous state put back first.
* state_changelog: the pending `signal-states` changes taken as changelog records
  (`TableChanges.take_records`), once after all of them.
* send: `BudgetJob._send_signal` (the signal's key and JSON, into a real aiokafka producer
  that never connects: `stream_account.OfflineProducer`).
* readback: the worker's `SignalCheckpointWriter._apply` on each record as the follower
  thread reads it back (made as the worker makes it, so it sees what this process published).

    .venv/bin/python bench/signal_cost.py [--spans 60000] [--tenants 20 --users-per-tenant 10
        --calls-per-session 40] [--repeat 5] [--compare REV] [--rounds 2]

`--compare REV` measures the code of git revision REV (`contracts` and `stream`) too, on the same
usage records, alternating old and new; both must publish the same signals (count, actions).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from revisions import add_compare_arguments, alternating_runs, child_result
from span_load import SpanMix
from stream_account import make_records, new_job

PHASES = ("decide", "state_changelog", "send", "readback")


class Record:
    """What `SignalCheckpointWriter._apply` reads of a consumer record."""

    __slots__ = ("key", "offset", "partition", "value")

    def __init__(self, partition: int, offset: int, key: bytes, value: bytes) -> None:
        self.partition, self.offset, self.key, self.value = partition, offset, key, value


def capture(job: Any, records: list[tuple[int, bytes]]) -> list[tuple[Any, ...]]:
    """Stage 2 over `records`; the inputs of each `changed_signal` call that returned a signal."""
    import burnguard.stream.app as app
    from burnguard.stream.accounting import WindowTotals

    decide, kept = app.changed_signal, []

    def recording(budget, key, window_start_ns, totals, now, previous, ttl, refresh=False):  # type: ignore[no-untyped-def]
        signal = decide(budget, key, window_start_ns, totals, now, previous, ttl, refresh)
        if signal is not None:
            state = WindowTotals.from_state(json.loads(json.dumps(totals.to_state())))
            kept.append((budget, key, window_start_ns, state, now, copy.deepcopy(previous), refresh))
        return signal

    app.changed_signal = recording
    try:
        loads = job.app.serializers.loads_value
        serializer = job.usage_topic.value_serializer or "json"

        async def run() -> None:
            for partition, payload in records:
                job.changes.partition = partition
                await job._account_one(loads(None, payload, serializer=serializer))

        asyncio.run(run())
    finally:
        app.changed_signal = decide
    return kept


def checkpoint_writer(job: Any) -> Any:
    """The worker's checkpoint writer for `job`, made as its `create_job` makes it (not started)."""
    import burnguard.stream.app as app

    if hasattr(app, "signal_checkpoint_writer"):
        return app.signal_checkpoint_writer(job, timedelta(seconds=30))
    return app.SignalCheckpointWriter(job.settings.kafka, job.settings.topics, timedelta(seconds=30))


def one_run(job: Any, inputs: list[tuple[Any, ...]]) -> tuple[dict[str, float], list[str]]:
    """CPU seconds per phase over every captured signal, on a fresh job; the actions published."""
    store = job.states.data.data  # Faust's memory store's dict (`changelog.plain_store`)
    writer = checkpoint_writer(job)
    seconds: dict[str, float] = {}
    signals: list[Any] = []
    gc.collect()
    started = time.process_time()
    for budget, key, window_start_ns, totals, now, previous, refresh in inputs:
        state_key = f"{budget.id}|{key}"
        if previous is None:
            store.pop(state_key, None)
        else:
            store[state_key] = previous
        signals.append(job._signal_if_changed(budget, key, window_start_ns, totals, now, refresh))
    seconds["decide"] = time.process_time() - started
    started = time.process_time()
    job.changes.take_records()
    seconds["state_changelog"] = time.process_time() - started

    async def send() -> None:
        for signal in signals:
            await job._send_signal(signal)

    started = time.process_time()
    asyncio.run(send())
    seconds["send"] = time.process_time() - started
    read = [Record(0, n, s.kafka_key.encode(), s.to_json()) for n, s in enumerate(signals)]
    started = time.process_time()
    for record in read:
        writer._apply(record)
    seconds["readback"] = time.process_time() - started
    return seconds, [signal.action for signal in signals]


def measure(args: argparse.Namespace, records_file: Path) -> dict[str, Any]:
    """The figures of the code this process imports, on the records in `records_file`."""
    import burnguard.stream.app as app

    logging.getLogger().setLevel(logging.WARNING)
    load = json.loads(records_file.read_text())
    records = [(partition, payload.encode()) for partition, payload in load["records"]]
    best = dict.fromkeys(PHASES, float("inf"))
    with tempfile.TemporaryDirectory() as scratch:
        inputs = capture(new_job(Path(scratch) / "capture"), records)
        for run in range(args.repeat):
            seconds, actions = one_run(new_job(Path(scratch) / f"job-{run}"), inputs)
            best = {phase: min(best[phase], seconds[phase]) for phase in PHASES}
    per_signal = {phase: s / len(inputs) * 1e6 for phase, s in best.items()}
    return {"code": app.__file__, "us_per_signal": per_signal, "actions": dict(Counter(actions))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=60_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--users-per-tenant", type=int, default=10)
    parser.add_argument("--calls-per-session", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts")
    add_compare_arguments(parser)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("faust").setLevel(logging.WARNING)
    if args.child:
        print(json.dumps(measure(args, Path(args.child))))
        return
    args.batch_min, args.batch_max = SpanMix.batch_min, SpanMix.batch_max
    args.messages_per_batch, args.combine = 50, "on"
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        records, spans, _ = make_records(args, scratch / "stage1")
        records_file = scratch / "records.json"
        payloads = [(partition, payload.decode()) for partition, payload in records]
        records_file.write_text(json.dumps({"records": payloads}))
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(records_file)]
        command += ["--repeat", str(args.repeat)]
        runs = alternating_runs(
            args.compare,
            args.rounds,
            ("contracts", "stream"),
            lambda: child_result(command, None),
            lambda old_path: child_result(command, old_path),
        )
    fields = []
    for side in ("old", "new") if runs["old"] else ("new",):
        best = {phase: min(run["us_per_signal"][phase] for run in runs[side]) for phase in PHASES}
        total = sum(best.values())
        first = runs[side][0]
        print(f"{side} ({first['code']}): signals {first['actions']}")
        phases = "  ".join(f"{phase} {us:.2f}" for phase, us in best.items())
        print(f"  {phases}  total {total:.2f} us/signal")
        prefix = "" if side == "new" else "old_"
        fields += [f"{prefix}{phase}_us={us:.2f}" for phase, us in best.items()]
        fields.append(f"{prefix}total_us={total:.2f}")
    if runs["old"] and runs["old"][0]["actions"] != runs["new"][0]["actions"]:
        print(f"SIGNALS DIFFER: old {runs['old'][0]['actions']} new {runs['new'][0]['actions']}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load} ({os.cpu_count()} CPUs, shared); {spans} spans")
    print(f'RESULT signal_cost spans={spans} compare={args.compare} {" ".join(fields)} load="{load}"')


if __name__ == "__main__":
    main()
