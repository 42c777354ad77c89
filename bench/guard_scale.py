"""BudgetGuard start-up time and memory with 200,000 signals on `burnguard.signals` (issue 17).

A real broker gets a compacted signals topic (4 partitions, the worker's default)
holding --signals records, one per user key of a `user` budget: --ok-share of them
`ok`s issued hours ago (long expired, as a topic collects them: one for every key
that was ever restricted), the rest current restrictions (warn, downgrade, throttle
in 6:2:2) valid for the next hour. Each measurement runs in a fresh Python process:
it imports the guard, reads its VmRSS (the bare process, the same-run baseline),
starts a `BudgetGuard`, times `start()` until the replay is done, and reads VmRSS and
VmHWM (peak) again. It then asks the guard about 500 throttled and 500 `ok` users
to show the replay was complete (all throttled denied, all `ok` allowed).

The guard starts from the worker's signal checkpoints (docs/ARCHITECTURE.md §7, §12): the bench
runs the worker's `SignalCheckpointWriter` over the topic until it has checkpointed every
partition (its time and the checkpoints' size are printed), then adds --tail more signals (new
throttles, read after the checkpoint; some are probed too). The same-run baseline is the same
guard told not to use checkpoints (`checkpoints=False`): the full replay from offset 0.

With --compare REV (default: the commit before the guard held only restrictions,
if this checkout has it) the same measurement runs on that revision's code,
exported with `git archive`, for the old behaviour's figures in the same run.

Then the steady state the worker's retirement of `ok`s produces (docs/ARCHITECTURE.md §8):
the same signals and a tombstone for every `ok` (as the worker writes one when it expires) go
to a second topic configured to compact within seconds (segments rolled every second, any dirty
share cleanable, tombstones removed at once); the broker compacts it for real (the bench waits
until it has, --compact-wait-s at most), and the guard's start-up is measured on what is left.

    .venv/bin/python bench/guard_scale.py [--signals 200000] [--ok-share 0.9] [--compare REV|none]
                                          [--tail 2000] [--compact-wait-s 300]
    .venv/bin/python bench/guard_scale.py --ingest-only   # the guard's CPU on the records alone, no broker
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from revisions import export_revision

if TYPE_CHECKING:
    from burnguard.contracts.topics import Topics
    from pipeline_setup import BenchPipeline

TARGET_START_S = 1.0
TARGET_ABOVE_BARE_MB = 50.0
OLD_REV = "83bb60b"  # main before issue 17: the guard kept every signal, `ok`s included
PROBES = 500
BUDGET = "user-daily"
PARTITIONS = 4
#: A signals topic the broker compacts within seconds, tombstones included.
QUICK_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "min.cleanable.dirty.ratio": "0",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "0",
}
#: What the guard's code is made of, exported from the compared revision.
GUARD_COMPONENTS = ("contracts", "instrumentation")
ROLL_KEYS = 32  # tombstones of keys never used, sent to roll every partition's active segment
BENCH_DIR = Path(__file__).resolve().parent


def rss_kb(field_name: str = "VmRSS") -> int:
    """A `kB` field of this process's /proc status (the measured process imports no bench helpers)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise KeyError(field_name)


def user(n: int) -> str:
    return f"user-{n:07d}"


def signal_records(count: int, ok_share: float, seed: int = 17) -> tuple[list[tuple[bytes, bytes]], dict]:
    """(key, value) of every signal, shuffled, and which users are throttled and which `ok`."""
    from burnguard.contracts.signals import Signal

    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    rng = random.Random(seed)
    restrictions = ["warn"] * 6 + ["downgrade"] * 2 + ["throttle"] * 2
    records, kinds = [], {"throttle": [], "ok": []}
    for n in range(count):
        action = "ok" if rng.random() < ok_share else rng.choice(restrictions)
        issued = now - timedelta(hours=rng.uniform(1, 12)) if action == "ok" else now
        spent = {"ok": 0.3, "warn": 8.5, "downgrade": 9.2, "throttle": 10.4}[action]
        signal = Signal(
            scope="user",
            key=user(n),
            budget=BUDGET,
            action=action,
            downgrade_to="standard" if action == "downgrade" else None,
            spent=spent,
            limit=10.0,
            ratio=spent / 10.0,
            window_start=day,
            window_end=day + timedelta(days=1),
            burn_rate_per_hour=0.4,
            issued_at=issued,
            expires_at=issued + (timedelta(minutes=2) if action == "ok" else timedelta(hours=1)),
            reason=f"budget {BUDGET} (user={user(n)}): cost_usd {spent:.6g} of 10 ({spent * 10:.0f}%) "
            f"in window 1d {day.isoformat()}..{(day + timedelta(days=1)).isoformat()} -> {action}; "
            "calls 120, fallbacks 0%",
        )
        records.append((signal.kafka_key.encode(), signal.to_json()))
        if action in kinds:
            kinds[action].append(user(n))
    rng.shuffle(records)
    return records, {kind: rng.sample(users, min(PROBES, len(users))) for kind, users in kinds.items()}


def tail_records(first_user: int, count: int) -> list[tuple[bytes, bytes]]:
    """New throttles written after the checkpoint: what a guard must still read from the topic."""
    from burnguard.contracts.signals import Signal

    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    signals = [
        Signal(
            scope="user",
            key=user(n),
            budget=BUDGET,
            action="throttle",
            spent=10.4,
            limit=10.0,
            ratio=1.04,
            window_start=day,
            window_end=day + timedelta(days=1),
            issued_at=now,
            expires_at=now + timedelta(hours=1),
        )
        for n in range(first_user, first_user + count)
    ]
    return [(signal.kafka_key.encode(), signal.to_json()) for signal in signals]


def checkpoint(bootstrap: str, topic: str) -> dict:
    """Run the worker's checkpoint writer over `topic` until every partition is checkpointed."""
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.stream.signal_checkpoints import SignalCheckpointWriter

    topics = Topics(signals=topic, signal_checkpoints=f"{topic}.checkpoints")
    writer = SignalCheckpointWriter(KafkaSettings(bootstrap=bootstrap), topics, timedelta(seconds=0.1))
    started = time.monotonic()
    writer.start(wait_s=600)
    replayed_s = time.monotonic() - started
    while writer.checkpoints_written < PARTITIONS and time.monotonic() - started < 600:
        time.sleep(0.05)
    written_s = time.monotonic() - started
    writer.stop()
    if writer.checkpoints_written < PARTITIONS or writer.failed_writes:
        raise RuntimeError(
            f"checkpoints: {writer.checkpoints_written} written, {writer.failed_writes} failed"
        )
    return {"replayed_s": replayed_s, "written_s": written_s, "bytes": checkpoint_bytes(bootstrap, topics)}


def checkpoint_bytes(bootstrap: str, topics: Topics) -> int:
    from burnguard.contracts.compacted_topics import read_compacted_topic
    from burnguard.contracts.topics import KafkaSettings

    values = read_compacted_topic(KafkaSettings(bootstrap=bootstrap), topics.signal_checkpoints)
    return sum(len(value) for value in values.values())


def with_retirements(records: list[tuple[bytes, bytes]], seed: int = 17) -> list[tuple[bytes, bytes | None]]:
    """The signals, then the worker's tombstone for every `ok` (each once it expired), shuffled."""
    tombstones = [(key, None) for key, value in records if b'"action":"ok"' in value]
    random.Random(seed).shuffle(tombstones)
    return [*records, *tombstones]


def count_records(bootstrap: str, topic: str) -> int:
    """How many records (tombstones included) the topic holds now."""
    from burnguard.contracts.topics import KafkaSettings
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**KafkaSettings(bootstrap=bootstrap).kafka_python_config(), group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        count = 0
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            count += sum(len(batch) for batch in consumer.poll(timeout_ms=200).values())
        return count
    finally:
        consumer.close()


def wait_for_compaction(bootstrap: str, topic: str, keep: int, wait_s: float) -> tuple[int, float]:
    """Roll the segments until the broker has compacted the topic to ~`keep` records; (left, seconds).

    The active segment is never cleaned and a clean log is not cleaned again, so a few
    tombstones of unused keys go out each round: they roll the segments and make a second
    pass (which drops the retired `ok`s' own tombstones) possible.
    """
    from pipeline_setup import produce_all

    started = time.monotonic()
    rolls = 0
    while True:
        time.sleep(2.0)
        rolls += produce_all(bootstrap, topic, [(f"roll-{n}".encode(), None) for n in range(ROLL_KEYS)])
        left = count_records(bootstrap, topic)
        if left <= keep + rolls or time.monotonic() - started > wait_s:
            return left, time.monotonic() - started


def measure(
    pipeline: BenchPipeline,
    name: str,
    probes: dict,
    pythonpath: Path | None,
    topic: str | None = None,
    checkpoints: bool = True,
) -> dict:
    """Run the guard in a fresh process (the code on `pythonpath`, else this checkout's); its figures."""
    probe_file = pipeline.write(f"{name}-probes.json", json.dumps(probes))
    env = {"BURNGUARD_GUARD_SCALE_PROBES": str(probe_file)}
    if not checkpoints:
        env["BURNGUARD_GUARD_SCALE_REPLAY"] = "1"
    if topic is not None:
        env["BURNGUARD_TOPIC_SIGNALS"] = topic
        env["BURNGUARD_TOPIC_SIGNAL_CHECKPOINTS"] = f"{topic}.checkpoints"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(BENCH_DIR)])
    process = pipeline.spawn(name, [str(Path(__file__).resolve()), "--child", pipeline.bootstrap], env)
    if process.wait(timeout=600) != 0:
        raise RuntimeError(f"{name} failed:\n{pipeline.log(name)[-3000:]}")
    last = pipeline.log(name).strip().splitlines()[-1]
    return json.loads(last)


def child(bootstrap: str) -> None:
    """In the measured process: bare RSS, then a guard started and replayed, then the probes."""
    from burnguard.contracts.budgets import BudgetConfig
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.instrumentation import guard as guard_module

    bare_kb = rss_kb()
    options = {"checkpoints": False} if os.environ.get("BURNGUARD_GUARD_SCALE_REPLAY") else {}
    kafka, topics = KafkaSettings(bootstrap=bootstrap), Topics.from_env()
    guard = guard_module.BudgetGuard(kafka, topics, BudgetConfig(), **options)
    started = time.monotonic()
    guard.start(wait_s=300)
    start_s = time.monotonic() - started
    after_kb, peak_kb = rss_kb(), rss_kb("VmHWM")
    probes = json.loads(Path(os.environ["BURNGUARD_GUARD_SCALE_PROBES"]).read_text())
    denied = sum(not guard.check(attribution={"user": u}).allowed for u in probes["throttle"])
    allowed = sum(guard.check(attribution={"user": u}).allowed for u in probes["ok"])
    guard.stop()
    print(
        json.dumps(
            {
                "code": guard_module.__file__,
                "ready": guard.ready,
                "start_s": start_s,
                "bare_mb": bare_kb / 1024,
                "rss_mb": after_kb / 1024,
                "peak_mb": peak_kb / 1024,
                "throttled_denied": denied,
                "throttled_probed": len(probes["throttle"]),
                "ok_allowed": allowed,
                "ok_probed": len(probes["ok"]),
                "checkpoint_partitions": getattr(guard.stats, "checkpoint_partitions", 0),
                "records_read": guard.stats.signals_received,
            }
        )
    )


def ingest_child(count: int, ok_share: float) -> None:
    """In the measured process: the guard's own work on a replay, no Kafka (records fed to `_ingest`)."""
    from burnguard.contracts.budgets import BudgetConfig
    from burnguard.contracts.topics import KafkaSettings, Topics
    from burnguard.instrumentation import guard as guard_module

    records, _ = signal_records(count, ok_share)
    guard = guard_module.BudgetGuard(KafkaSettings(bootstrap="127.0.0.1:9"), Topics(), BudgetConfig())
    started = time.process_time()
    for key, value in records:
        guard._ingest(key, value)
    cpu_s = time.process_time() - started
    print(json.dumps({"code": guard_module.__file__, "cpu_s": cpu_s, "held": guard.held}))


def ingest_only(args: argparse.Namespace, compare: str | None) -> None:
    """The guard's CPU time to apply the replayed records, this checkout and `compare`, no broker."""
    command = [sys.executable, str(Path(__file__).resolve()), "--ingest-child"]
    command += ["--signals", str(args.signals), "--ok-share", str(args.ok_share)]
    runs = {"new": None, "old": None}
    with tempfile.TemporaryDirectory() as scratch:
        pythonpaths = {
            "new": None,
            "old": export_revision(compare, Path(scratch), GUARD_COMPONENTS) if compare else None,
        }
        for name, pythonpath in pythonpaths.items():
            if name == "old" and pythonpath is None:
                continue
            env = dict(os.environ)
            if pythonpath is not None:
                env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(BENCH_DIR)])
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
            print(f"{name}: {runs[name]}")
    old_part = f" old_ingest_cpu_s={runs['old']['cpu_s']:.2f}" if runs["old"] else ""
    print(
        f"RESULT guard_scale_ingest signals={args.signals} ok_share={args.ok_share:g} "
        f"ingest_cpu_s={runs['new']['cpu_s']:.2f}{old_part}"
    )


def has_revision(rev: str) -> bool:
    found = subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=BENCH_DIR.parent, check=False)
    return found.returncode == 0


def report(label: str, figures: dict) -> None:
    from pipeline_setup import note

    above = figures["rss_mb"] - figures["bare_mb"]
    note(
        f"{label}: start-up {figures['start_s']:.2f}s, VmRSS {figures['rss_mb']:.0f} MB "
        f"(bare {figures['bare_mb']:.0f} MB, +{above:.0f} MB), peak {figures['peak_mb']:.0f} MB; "
        f"throttled denied {figures['throttled_denied']}/{figures['throttled_probed']}, "
        f"ok allowed {figures['ok_allowed']}/{figures['ok_probed']}, "
        f"{figures.get('checkpoint_partitions', 0)} partitions from a checkpoint, "
        f"{figures.get('records_read', 0)} signals applied ({figures['code']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--signals", type=int, default=200_000)
    parser.add_argument("--ok-share", type=float, default=0.9)
    parser.add_argument("--compare", default=OLD_REV, help="git revision of the old behaviour, or 'none'")
    parser.add_argument("--compact-wait-s", type=float, default=300.0, help="at most, for the broker")
    parser.add_argument("--tail", type=int, default=2_000, help="signals written after the checkpoint")
    parser.add_argument(
        "--ingest-only", action="store_true", help="the guard's CPU on the records, no broker"
    )
    parser.add_argument("--child", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    parser.add_argument("--ingest-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.ingest_child:
        ingest_child(args.signals, args.ok_share)
        return
    compare = args.compare if args.compare != "none" and has_revision(args.compare) else None
    if args.ingest_only:
        ingest_only(args, compare)
        return
    from pipeline_setup import BenchPipeline, machine_note, note, produce_all

    records, probes = signal_records(args.signals, args.ok_share)
    with BenchPipeline("guard_scale") as pipeline, tempfile.TemporaryDirectory() as scratch:
        topic = pipeline.topics.signals
        pipeline.broker.create_topic(topic, partitions=PARTITIONS, config={"cleanup.policy": "compact"})
        sent = produce_all(pipeline.bootstrap, topic, records)
        note(f"{sent} signals on {topic} ({args.ok_share:.0%} expired ok)")
        checkpointed = checkpoint(pipeline.bootstrap, topic)
        note(
            f"checkpoint writer: replayed in {checkpointed['replayed_s']:.2f}s, every partition "
            f"checkpointed after {checkpointed['written_s']:.2f}s, "
            f"{checkpointed['bytes'] / 1e6:.1f} MB on the checkpoints topic"
        )
        tail = tail_records(args.signals, args.tail)
        sent += produce_all(pipeline.bootstrap, topic, tail)
        tail_users = [key.decode().split(":")[1].split("@")[0] for key, _ in tail[: PROBES // 5]]
        with_tail = {**probes, "throttle": [*probes["throttle"], *tail_users]}
        note(f"{len(tail)} throttles written after the checkpoint ({sent} signals on the topic)")
        new = measure(pipeline, "guard-new", with_tail, None, topic)
        report("this checkout, from the checkpoint", new)
        replay = measure(pipeline, "guard-replay", with_tail, None, topic, checkpoints=False)
        report("this checkout, full replay (checkpoints=False)", replay)
        old = None
        if compare:
            old = measure(
                pipeline,
                "guard-old",
                with_tail,
                export_revision(compare, Path(scratch), GUARD_COMPONENTS),
                topic,
            )
            report(f"old behaviour ({compare})", old)
        compacted_topic = f"{topic}.compacted"
        pipeline.broker.create_topic(compacted_topic, partitions=PARTITIONS, config=QUICK_COMPACTION)
        written = produce_all(pipeline.bootstrap, compacted_topic, with_retirements(records))
        restrictions = sum(b'"action":"ok"' not in value for _, value in records)
        left, waited = wait_for_compaction(
            pipeline.bootstrap, compacted_topic, restrictions, args.compact_wait_s
        )
        note(f"{written} records (signals + retirement tombstones) compacted to {left} in {waited:.0f}s")
        steady = measure(pipeline, "guard-compacted", probes, None, compacted_topic)
        report("this checkout, compacted topic", steady)
    above = new["rss_mb"] - new["bare_mb"]
    print(f"\nmachine: {machine_note()}")
    print(
        f"{sent} signals: start-up {new['start_s']:.2f}s (target <= {TARGET_START_S:g}s), "
        f"+{above:.0f} MB above the bare process (target <= {TARGET_ABOVE_BARE_MB:g} MB)"
    )
    old_part = (
        f" old_start_s={old['start_s']:.2f} old_rss_above_bare_mb={old['rss_mb'] - old['bare_mb']:.0f}"
        if old
        else ""
    )
    print(
        f"RESULT guard_scale signals={sent} ok_share={args.ok_share:g} start_s={new['start_s']:.2f} "
        f"rss_above_bare_mb={above:.0f} bare_rss_mb={new['bare_mb']:.0f} peak_mb={new['peak_mb']:.0f} "
        f"checkpoint_partitions={new['checkpoint_partitions']} tail={len(tail)} "
        f"replay_start_s={replay['start_s']:.2f} "
        f"replay_rss_above_bare_mb={replay['rss_mb'] - replay['bare_mb']:.0f}"
        f" checkpoint_write_s={checkpointed['written_s']:.2f} checkpoint_mb={checkpointed['bytes'] / 1e6:.1f}"
        f"{old_part} compacted_records={left} compacted_start_s={steady['start_s']:.2f} "
        f"compacted_rss_above_bare_mb={steady['rss_mb'] - steady['bare_mb']:.0f}"
    )


if __name__ == "__main__":
    sys.exit(main())
