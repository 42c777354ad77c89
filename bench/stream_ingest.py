"""In-process CPU per OTLP message of the stream worker's whole stage 1 (`BudgetJob._ingest_batch`).

`stream_decode.py` measures decode and `usage_deltas` per span; with small messages
(10-20 spans, what `KafkaSpanExporter` writes for many tenants) most of stage 1's cost
is per message, around them. This bench runs the worker's own `_ingest_batch` on a
`BudgetJob` built from settings as the worker builds it, without a broker: the
events are Faust's `Event`/`Message` objects for `otlp_spans` records (LogAppendTime,
stamped now), handed over in micro-batches as `take_batches` ends them under load (at
`INGEST_BATCH_MESSAGES`, or at `StreamSettings.ingest_batch_bytes` of values where the revision
has it). Everything `_ingest_batch` does runs: the in-order check, the duplicate digests, decode,
the clock check, `usage_deltas`, context observations, the sub-batches, the micro-batch records and
their JSON. Only the producer's `send` is replaced by one that drops the queued records (the
records are built and encoded; aiokafka's send, Faust's `take_events` and acks are
not in the figure).

Both sides of `--compare` read the same load (generated at the same clock) and must send the
same records, byte for byte: the digest of what the first reading sent is compared, and
the bench stops if they differ, unless the two end micro-batches apart (combined rows differ) or
one side combines messages (`combine_messages`, `records.GroupRows`) and the other does not. Delta
rows and usage-record bytes per message (and bytes per row) are printed for each side.

Each figure is the best of `--repeat` runs of CPU time (`time.process_time`),
divided by the messages and by the spans of the load. Each run reads the load at
new offsets, with an empty duplicate memory (the load repeats byte for byte), on a
job warmed by one untimed run.

    .venv/bin/python bench/stream_ingest.py [--spans 30000] [--repeat 5]
        [--batch-min 10 --batch-max 20] [--tenants 50] [--users-per-tenant 20]
        [--calls-per-session 20] [--plain-fraction 0.08] [--compare REV] [--rounds 2] [--profile] [--split]

The defaults are the small-message load of issue 16 (`stream_throughput.py --batch-min 10
--batch-max 20 --tenants 50 --users-per-tenant 20 --calls-per-session 20`). `--compare REV`
also measures the stage-1 code of git revision REV (its `burnguard`, `contracts` and
`stream` trees, imported first in a child process) on the same load, alternating old
and new `--rounds` times. `--profile` runs stage 1 once more under cProfile and prints
the top functions by own time; `--split` once more with each part timed around its call
(decode, sum (`usage_rows`, or `usage_rows_detached` for a native group), context observations,
the duplicate digest, the clock check, adding a message's rows to its group (`group_add`, where the
revision makes groups by `new_group_rows`), combining a micro-batch's rows (`combine`: the group's
`rows`), grouping by partition, JSON; the rest is the per-message bookkeeping around them) and
the cyclic GC's time and collections. The worker's GC set-up (`stream/app.py:tune_gc`, called by
`run_worker`) is applied as the worker applies it, where the measured revision has it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream.app import INGEST_BATCH_MESSAGES, LOG_APPEND_TIME, BudgetJob
from burnguard.stream.duplicates import RecentBatches
from burnguard.stream.partitioner import key_partition
from burnguard.stream.settings import StreamSettings
from faust.events import Event
from faust.types.tuples import TP, Message
from revisions import add_compare_arguments, alternating_runs, child_result
from span_load import BUDGETS_YAML, SpanMix, count_spans

COMPARED_COMPONENTS = ("contracts", "stream")
#: `otlp_spans` partitions of the load (as `stream_throughput.py` creates the topic).
SOURCE_PARTITIONS = 4
SPANS_TOPIC = "otlp_spans"


def make_load(args: argparse.Namespace) -> tuple[list[tuple[bytes, bytes]], int]:
    """((key, value) of each message, spans in them): at least `args.spans` spans, seeded."""
    mix = SpanMix.from_args(args)
    messages = []
    with mock.patch.object(time, "time_ns", lambda: args.epoch_ns):  # both sides of --compare alike
        while mix.spans < args.spans:
            messages.append(mix.message())
    return messages, sum(count_spans(value) for _, value in messages)


class Stage1:
    """A `BudgetJob` without a broker, fed the load as Faust's events at ever higher offsets."""

    def __init__(self, data_dir: Path, messages: list[tuple[bytes, bytes]]) -> None:
        settings = StreamSettings(data_dir=data_dir, app_id="stream-ingest-bench")
        self.job = BudgetJob(settings, parse_budget_yaml(BUDGETS_YAML))
        self.job.dead_letters.stale = False  # no broker to read the dead letters back from
        self.job.usage_records.send = self._drop_sent  # records built and encoded, not sent
        self.messages = messages
        self.sent = 0
        #: the messages of each micro-batch of the last reading
        self.micro_batches: list[int] = []
        #: while True (the first reading, untimed): what is sent is digested and its rows counted
        self.inspecting = True
        #: the usage records sent (topic, partition, key, value, headers of each), digested in order
        self.sent_digest = hashlib.blake2b(digest_size=16)
        self.rows = 0
        self.usage_bytes = 0  # of the usage records' values
        self._next_offset = [0] * SOURCE_PARTITIONS

    async def _drop_sent(self) -> None:
        pending = self.job.usage_records._pending
        self.sent += len(pending)
        usage = self.job.settings.topics.usage
        for record in pending if self.inspecting else ():  # `unpriced` warns (wall clock): not compared
            if record[0] == usage:  # its value as stage 2 reads it: revisions may write other bytes
                value = json.loads(record[3])
                self.sent_digest.update(repr((*record[:3], value, record[4])).encode())
                self.rows += sum(len(batch[2]) for batch in value["batches"])
                self.usage_bytes += len(record[3])
        self.job.usage_records._pending = []

    def events(self) -> list[Event]:
        """The load as one reading: new offsets, stamped now (built outside the timed part)."""
        now = time.time()
        events = []
        for key, value in self.messages:
            partition = key_partition(key, SOURCE_PARTITIONS)
            offset = self._next_offset[partition]
            self._next_offset[partition] += 1
            tp = TP(SPANS_TOPIC, partition)
            message = Message(
                SPANS_TOPIC, partition, offset, now, LOG_APPEND_TIME, None, key, value, None, tp=tp
            )
            events.append(Event(self.job.app, key, value, None, message))
        return events

    def forget_digests(self) -> None:
        """An empty duplicate memory: the next reading's bytes were all seen by the last one."""
        recent = self.job.recent
        self.job.recent = RecentBatches(recent.window_ns, recent.cap)
        self.job.recent.primed.update(range(SOURCE_PARTITIONS))

    def run(self, events: list[Event]) -> None:
        asyncio.run(self._ingest(events))

    async def _ingest(self, events: list[Event]) -> None:
        max_bytes = getattr(self.job.settings, "ingest_batch_bytes", None)  # None: a revision without it
        self.micro_batches.clear()
        for batch in micro_batches(events, INGEST_BATCH_MESSAGES, max_bytes):
            self.micro_batches.append(len(batch))
            await self.job._ingest_batch(batch)


def micro_batches(events: list[Event], max_messages: int, max_bytes: int | None) -> Iterator[list[Event]]:
    """A backlog's micro-batches as `take_batches` ends them: at `max_messages`, or once their
    values hold `max_bytes` (the message that reaches it included)."""
    batch: list[Event] = []
    room = max_bytes if max_bytes is not None else float("inf")
    for event in events:
        batch.append(event)
        room -= len(event.value)
        if len(batch) == max_messages or room <= 0:
            yield batch
            batch, room = [], max_bytes if max_bytes is not None else float("inf")
    if batch:
        yield batch


#: Stage 1's parts, as `stream/app.py` names them (either revision): decode, sum, group, encode,
#: the duplicate digest.
SPLIT_PARTS = (
    "decode_spans",
    "usage_rows",
    "usage_rows_detached",
    "usage_deltas",
    "context_observations",
    "encode_record",
    "encode",
    "digest",
    "group_sub_batches",
)
#: Methods timed too, where the revision has them: (module, class, method). `GroupRows.rows` is the
#: combining of a micro-batch's rows (`_combined`); `_trust_clock`, the clock check per message.
SPLIT_METHODS = (
    ("burnguard.stream.app", "BudgetJob", "_batch_records"),
    ("burnguard.stream.app", "BudgetJob", "_trust_clock"),
    ("burnguard.stream.records", "GroupRows", "rows"),
    ("burnguard.stream.records", "MicroBatch", "encoded_records"),
)


#: Parts named after what they replaced: a micro-batch's records written (`encode_record` before).
SPLIT_LABELS = {"rows": "combine", "usage_rows_detached": "usage_rows", "encoded_records": "encode_record"}


def untimed_group(write: Any) -> Any:
    """`records.group_sub_batches` handed the group a `TimedGroup` times (the native writer takes
    only the native group itself)."""
    return lambda group, *rest: write(getattr(group, "group", group), *rest)


class TimedGroup:
    """A micro-batch's group (`records.new_group_rows`: `GroupRows` or the native `Groups`, whose
    methods cannot be wrapped in place) with its `add` (`group_add`) and `rows` (`combine`) timed."""

    def __init__(self, group: Any, spent: dict[str, float]) -> None:
        self.group, self.spent = group, spent

    @property
    def last_offset(self) -> int:
        return self.group.last_offset

    def add(self, offset: int, rows: Any) -> None:
        started = time.process_time()
        try:
            self.group.add(offset, rows)
        finally:
            self.spent["group_add"] = self.spent.get("group_add", 0.0) + time.process_time() - started

    def rows(self) -> list[tuple[list[Any], int]]:
        started = time.process_time()
        try:
            return self.group.rows()
        finally:
            self.spent["combine"] = self.spent.get("combine", 0.0) + time.process_time() - started


def split(stage1: Stage1) -> dict[str, float]:
    """CPU µs per message of each of stage 1's parts in one more reading (the rest: `_ingest_one`'s
    own work, the duplicate memory, the in-order check, grouping rows, the micro-batch, freeing what
    it made, and the loop). Each part is timed around its call, so a part's share is approximate (a
    call costs ~0.2 µs); a group's `rows` is named `combine`, its `add` `group_add`, the others as in
    `stream/app.py`."""
    import importlib

    import burnguard.stream.app as app

    spent: dict[str, float] = {}
    owners: dict[str, Any] = {name: app for name in SPLIT_PARTS if hasattr(app, name)}
    for module, owner, method in SPLIT_METHODS:
        found = getattr(importlib.import_module(module), owner, None)
        if found is not None and hasattr(found, method):
            owners[method] = found
    if hasattr(app, "new_group_rows"):  # a group's `add` and `rows` timed, whichever kind it is
        owners["new_group_rows"] = app
        owners.pop("rows", None)
    originals = {name: getattr(owner, name) for name, owner in owners.items()}

    def timed(name: str, function: Any) -> Any:
        label = SPLIT_LABELS.get(name, name)
        if name == "new_group_rows":
            return lambda: TimedGroup(function(), spent)
        if name == "group_sub_batches":
            function = untimed_group(function)

        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                result = function(*args, **kwargs)
                return list(result) if name == "_batch_records" else result
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - started

        return run

    collecting = [0.0]

    def collector(phase: str, info: dict[str, int]) -> None:  # the cyclic GC's time, wherever it ran
        now = time.process_time()
        if phase == "start":
            collecting[0] = now
        else:
            spent["gc"] = spent.get("gc", 0.0) + now - collecting[0]

    stage1.forget_digests()
    events = stage1.events()
    gc.collect()
    collections = [generation["collections"] for generation in gc.get_stats()]
    gc.callbacks.append(collector)
    try:
        for name, function in originals.items():
            setattr(owners[name], name, timed(name, function))
        started = time.process_time()
        stage1.run(events)
        spent["whole"] = time.process_time() - started
    finally:
        gc.callbacks.remove(collector)
        for name, function in originals.items():
            setattr(owners[name], name, function)
    made = [after["collections"] - before for after, before in zip(gc.get_stats(), collections, strict=True)]
    parts = {name: seconds / len(stage1.messages) * 1e6 for name, seconds in spent.items() if seconds}
    return {**parts, "collections": made}


def best_cpu_s(stage1: Stage1, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        stage1.forget_digests()
        events = stage1.events()
        gc.collect()
        started = time.process_time()
        stage1.run(events)
        best = min(best, time.process_time() - started)
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The figures of the code this process imports: CPU µs per message and per span."""
    import burnguard.stream.app as app

    messages, spans = make_load(args)
    if hasattr(app, "tune_gc"):  # the worker's set-up (`run_worker`), where the revision has it
        app.tune_gc()
    with tempfile.TemporaryDirectory() as scratch:
        stage1 = Stage1(Path(scratch), messages)
        stage1.forget_digests()
        stage1.run(stage1.events())  # warms the price book, the matchers and the partition cache
        if stage1.job.duplicates or stage1.job.deadlettered or stage1.job.agent_errors:
            raise SystemExit(f"the load was not ingested cleanly: {vars(stage1.job)}")
        stage1.inspecting = False
        records, rows, sent_digest = stage1.sent, stage1.rows, stage1.sent_digest.hexdigest()
        usage_bytes = stage1.usage_bytes
        combines = getattr(stage1.job.settings, "combine_messages", False)
        micro_batch_sizes = stage1.micro_batches
        seconds = best_cpu_s(stage1, args.repeat)
        parts = split(stage1) if args.split else {}
        if args.profile:
            stage1.forget_digests()
            events = stage1.events()
            profiler = cProfile.Profile()
            profiler.enable()
            stage1.run(events)
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile_top)
    load = (
        f"{spans} spans in {len(messages)} messages ({spans / len(messages):.1f} per message), "
        f"{records} records and {rows} delta rows ({rows / len(messages):.1f} per message) per reading, "
        f"in {len(micro_batch_sizes)} micro-batches of {len(messages) / len(micro_batch_sizes):.0f} messages"
    )
    if rows:
        load += f"; {usage_bytes / rows:.0f} bytes per delta row (usage records' values / rows)"
    return {
        "code": app.__file__,
        "load": load,
        "per_message_us": seconds / len(messages) * 1e6,
        "per_span_us": seconds / spans * 1e6,
        "sent_digest": sent_digest,
        "combines": combines,
        "micro_batches": micro_batch_sizes,
        "rows_per_message": rows / len(messages),
        "usage_bytes_per_message": usage_bytes / len(messages),
        "split_us": parts,
    }


def measure_child(args: argparse.Namespace, pythonpath: Path) -> dict[str, Any]:
    """`measure` in a process that imports the exported revision (its module path proves which)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *_load_args(args)]
    command += ["--epoch-ns", str(args.epoch_ns)]
    return child_result(command, pythonpath)


def _load_args(args: argparse.Namespace) -> list[str]:
    names = ("spans", "repeat", "batch_min", "batch_max", "tenants", "users_per_tenant", "calls_per_session")
    out = [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return [*out, "--plain-fraction", str(args.plain_fraction), *(["--split"] if args.split else [])]


def show_split(label: str, run: dict[str, Any]) -> None:
    """The parts of one reading; the cyclic GC's time overlaps them (it runs inside whatever allocates)."""
    parts = dict(run["split_us"])
    whole, collections, collecting = parts.pop("whole"), parts.pop("collections"), parts.pop("gc", 0.0)
    shown = ", ".join(f"{name} {micros:.0f}" for name, micros in sorted(parts.items(), key=lambda i: -i[1]))
    rest = whole - sum(parts.values())
    print(f"  {label}, one more reading: {whole:.0f} us/message; of it {shown}; rest {rest:.0f}")
    print(f"    of all that, in the cyclic GC: {collecting:.0f} us/message (collections {collections})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--spans", type=int, default=30_000, help="spans in the load (default 30000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts (default 5)")
    parser.add_argument("--batch-min", type=int, default=10, help="spans per message, least (default 10)")
    parser.add_argument("--batch-max", type=int, default=20, help="spans per message, most (default 20)")
    parser.add_argument("--tenants", type=int, default=50, help="tenants (default 50)")
    parser.add_argument("--users-per-tenant", type=int, default=20, help="users per tenant (default 20)")
    parser.add_argument(
        "--calls-per-session", type=int, default=20, help="spans per session across messages (default 20)"
    )
    parser.add_argument(
        "--plain-fraction", type=float, default=SpanMix.plain_fraction, help="share of plain HTTP spans"
    )
    add_compare_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of stage 1")
    parser.add_argument("--split", action="store_true", help="also print CPU µs per message of each part")
    parser.add_argument("--profile-top", type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--epoch-ns", type=int, default=time.time_ns(), help=argparse.SUPPRESS)
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
    new = min(runs["new"], key=lambda run: run["per_message_us"])
    print(f"load: {new['load']}; {' '.join(_load_args(args))}; best of {args.repeat}")
    print(
        f"this checkout ({new['code']}): "
        f"{new['per_message_us']:.1f} us/message, {new['per_span_us']:.2f} us/span"
    )
    if args.split:
        show_split("this checkout", new)
    fields = f"per_message_us={new['per_message_us']:.1f} per_span_us={new['per_span_us']:.2f}"
    fields += f" combine={int(new['combines'])} rows_per_message={new['rows_per_message']:.2f}"
    fields += f" usage_bytes_per_message={new['usage_bytes_per_message']:.0f}"
    if runs["old"]:
        old = min(runs["old"], key=lambda run: run["per_message_us"])
        print(
            f"--compare {args.compare} ({old['code']}): "
            f"{old['per_message_us']:.1f} us/message, {old['per_span_us']:.2f} us/span"
        )
        fields += f" old_per_message_us={old['per_message_us']:.1f} old_per_span_us={old['per_span_us']:.2f}"
        fields += f" speedup={old['per_message_us'] / new['per_message_us']:.2f}"
        fields += f" old_combine={int(old.get('combines', False))}"
        fields += f" old_rows_per_message={old.get('rows_per_message', 0):.2f}"
        fields += f" old_usage_bytes_per_message={old.get('usage_bytes_per_message', 0):.0f}"
        print(f"  --compare {args.compare} load: {old['load']}")
        if args.split:
            show_split(f"--compare {args.compare}", old)
        digests = {run["sent_digest"] for run in runs["old"] + runs["new"]}
        if len(digests) == 1:
            print("records sent: the same values from both revisions")
            fields += " same_records=1"
        elif old.get("micro_batches") != new["micro_batches"] and old.get("combines") and new["combines"]:
            print("records sent: not the same (the revisions end micro-batches apart: other combined rows)")
            fields += " same_records=0"
        elif old.get("combines", False) == new["combines"]:
            raise SystemExit(f"the two revisions sent different records for the same load: {digests}")
        else:  # one side sums rows across messages (`records.GroupRows`), the other does not
            print("records sent: not the same (one revision combines messages, the other not)")
            fields += " same_records=0"
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    shape = f"spans_per_message={args.batch_min}-{args.batch_max} plain_fraction={args.plain_fraction:g}"
    print(f"RESULT stream_ingest {shape} {fields}")


if __name__ == "__main__":
    main()
