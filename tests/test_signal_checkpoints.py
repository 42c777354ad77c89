"""Signal checkpoints (contracts/signal_checkpoints.py): their format, which one a guard takes,
and, on a real broker, that a guard started from the worker's checkpoint holds exactly what a
guard replaying the whole signals topic holds."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from burnguard.contracts import compacted_topics
from burnguard.contracts.budgets import BudgetConfig
from burnguard.contracts.compacted_topics import CompactedTopicFollower
from burnguard.contracts.signal_checkpoints import (
    CLOCK_MARGIN,
    MAX_AGE_BEHIND,
    MAX_PART_BODY,
    PART_BYTES,
    CheckpointPart,
    can_still_matter,
    decode_parts,
    latest_checkpoints,
    part_key,
    split_checkpoint,
    usable_at,
)
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.deploy.kafka import KafkaBroker
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.stream.settings import StreamSettings
from burnguard.stream.signal_checkpoints import (
    FETCH_MIN_BYTES,
    FETCH_WAIT_MS,
    PublishedSignals,
    SignalCheckpointWriter,
)
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource
from kafka.errors import KafkaConnectionError

from tests import factories

NOW = datetime.now(UTC).replace(microsecond=0)
TOPIC = "burnguard.signals"


def records(count: int, size: int = 300) -> list[tuple[bytes, bytes]]:
    return [(f"tenant:t{n}@daily".encode(), bytes([65 + n % 26]) * size) for n in range(count)]


def test_a_checkpoint_round_trips_in_parts_that_fit_a_request() -> None:
    kept = records(5_000)
    parts = split_checkpoint(TOPIC, 3, 12_345, kept, NOW)
    assert len(parts) > 1
    assert {p.parts for p in parts} == {len(parts)} and len({p.checkpoint_id for p in parts}) == 1
    encoded = [part.encode() for part in parts]
    assert all(len(value) < 1_000_000 for value in encoded)
    assert all(sum(len(k) + len(v) for k, v in p.records) <= PART_BYTES for p in parts)
    decoded = [CheckpointPart.decode(value) for value in encoded]
    assert decoded == parts
    assert [record for part in decoded for record in part.records] == kept  # the topic's order
    assert [part.kafka_key for part in decoded] == [part_key(TOPIC, 3, n) for n in range(len(parts))]


def test_an_empty_checkpoint_is_one_part_saying_so() -> None:
    (part,) = split_checkpoint(TOPIC, 0, 7, [], NOW)
    assert CheckpointPart.decode(part.encode()).records == () and part.next_offset == 7


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"no header", "no header line"),
        (b'{"topic": "x"}\n', "unreadable"),
        (b"not json\n" + b"x", "unreadable"),
    ],
)
def test_an_unreadable_part_is_refused_with_its_reason(value: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        CheckpointPart.decode(value)


def test_a_truncated_or_out_of_range_part_is_refused() -> None:
    part = split_checkpoint(TOPIC, 0, 9, records(3), NOW)[0]
    head, _, body = part.encode().partition(b"\n")
    cut = zlib.compress(zlib.decompress(body)[:-10])
    with pytest.raises(ValueError, match="truncated"):
        CheckpointPart.decode(head + b"\n" + cut)
    bad = head.replace(b'"part":0', b'"part":5')
    with pytest.raises(ValueError, match="out of range"):
        CheckpointPart.decode(bad + b"\n" + body)
    parts, problems = decode_parts({b"k1": part.encode(), b"k2": b"garbage"})
    assert parts == [part] and len(problems) == 1 and "k2" in problems[0]


def test_the_newest_complete_checkpoint_of_each_partition_is_taken() -> None:
    old = split_checkpoint(TOPIC, 0, 100, records(3_000), NOW)
    new = split_checkpoint(TOPIC, 0, 200, records(3_000), NOW)
    other = split_checkpoint(TOPIC, 1, 50, records(10), NOW)
    foreign = split_checkpoint("another.signals", 0, 999, records(10), NOW)
    assert len(new) > 1
    chosen = latest_checkpoints([*old, *new, *other, *foreign], TOPIC)
    assert chosen == {0: new, 1: other}
    # a part of the newest is missing: the older complete one stands
    assert latest_checkpoints([*old, *new[1:]], TOPIC) == {0: old}
    # two writers' parts for the same offset never combine, however they split
    twin = split_checkpoint(TOPIC, 0, 200, records(3_000), NOW)
    assert latest_checkpoints([new[0], *twin[1:]], TOPIC) == {}


def test_a_checkpoint_is_usable_by_a_guard_at_most_the_margin_behind_its_writer_and_recent() -> None:
    taken = NOW.isoformat()
    assert usable_at(taken, NOW, True) and usable_at(taken, NOW + MAX_AGE_BEHIND, True)
    assert usable_at(taken, NOW + timedelta(days=9), False)  # nothing after it: nothing it could outlive
    assert not usable_at(taken, NOW + MAX_AGE_BEHIND + timedelta(seconds=1), True)
    assert usable_at(taken, NOW - CLOCK_MARGIN, True)
    assert not usable_at(taken, NOW - CLOCK_MARGIN - timedelta(seconds=1), False)
    assert not usable_at("yesterday", NOW, False)
    assert not usable_at(NOW.replace(tzinfo=None).isoformat(), NOW, False)


def signal_mix(rng: random.Random, n: int) -> Signal:
    action = rng.choice(["ok", "warn", "downgrade", "throttle"])
    issued = NOW - timedelta(minutes=rng.uniform(0, 600))
    day = issued.replace(hour=0, minute=0, second=0, microsecond=0)
    window_end = rng.choice([day + timedelta(days=1), NOW + timedelta(minutes=rng.uniform(-20, 20))])
    return factories.make_signal(
        action,
        issued_at=issued,
        ttl=timedelta(minutes=rng.uniform(1, 600)),
        key=f"t{n}",
        window_end=window_end,
        metric=rng.choice(["cost_usd", "tool_calls", "something_else"]),
        downgrade_to="standard" if action == "downgrade" else None,
    )


def test_what_a_guard_holds_can_still_matter() -> None:
    """The checkpoint's keep rule covers all a guard holds: leaving a signal out changes no guard."""
    rng = random.Random(17)
    held_count = 0
    for n in range(2_000):
        signal = signal_mix(rng, n)
        guard = BudgetGuard(KafkaSettings(), Topics(), BudgetConfig(), clock=lambda: NOW)
        guard._ingest(signal.kafka_key.encode(), signal.to_json())
        holds = guard.held != (0, 0)
        held_count += holds
        if holds:
            assert can_still_matter(signal, NOW), signal
        if not can_still_matter(signal, NOW - timedelta(seconds=1)):
            assert not holds, signal
    assert 200 < held_count < 1_800  # both cases were tried


# --- on a real broker ----------------------------------------------------------------------------


def signal_topics(kafka_broker: KafkaBroker, partitions: int = 2) -> Topics:
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(signals=f"signals-{suffix}", signal_checkpoints=f"checkpoints-{suffix}")
    kafka_broker.create_topic(topics.signals, partitions=partitions, compact=True)
    kafka_broker.create_topic(topics.signal_checkpoints, partitions=1, compact=True)
    return topics


def clients(kafka_broker: KafkaBroker) -> tuple[KafkaSettings, KafkaProducer]:
    """The broker's settings for a guard or writer, and a producer of signals (the test closes it)."""
    return KafkaSettings(bootstrap=kafka_broker.bootstrap), KafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, acks="all"
    )


def restriction(key: str, action: str = "throttle", **fields: object) -> tuple[bytes, bytes]:
    signal = factories.make_signal(action, key=key, issued_at=NOW, ttl=timedelta(hours=1), **fields)
    return signal.kafka_key.encode(), signal.to_json()


def expired_ok(key: str) -> tuple[bytes, bytes]:
    signal = factories.make_signal(
        "ok", key=key, issued_at=NOW - timedelta(hours=3), ttl=timedelta(minutes=2)
    )
    return signal.kafka_key.encode(), signal.to_json()


def live_ok(key: str) -> tuple[bytes, bytes]:
    signal = factories.make_signal("ok", key=key, issued_at=NOW, ttl=timedelta(hours=1))
    return signal.kafka_key.encode(), signal.to_json()


def send(producer: KafkaProducer, topic: str, batch: list[tuple[bytes, bytes | None]]) -> None:
    for key, value in batch:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=30)


Held = tuple[dict[str, bytes], set[str]]


def held_state(guard: BudgetGuard) -> Held:
    """What a guard holds: its restrictions' JSON by key, and the keys of its baselines."""
    restrictions = {key: held.payload for key, held in guard._restrictions.items()}
    return restrictions, set(guard._ledger._tallies)


def started_guard(kafka: KafkaSettings, topics: Topics, checkpoints: bool) -> BudgetGuard:
    guard = BudgetGuard(kafka, topics, BudgetConfig(), checkpoints=checkpoints).start(wait_s=60)
    assert guard.ready
    return guard


def held_with_and_without_checkpoints(kafka: KafkaSettings, topics: Topics) -> tuple[Held, Held, int]:
    """What a guard started with checkpoints holds, what a replaying one holds, and how many
    partitions the first started from a checkpoint."""
    from_checkpoint = started_guard(kafka, topics, checkpoints=True)
    replayed = started_guard(kafka, topics, checkpoints=False)
    try:
        checkpointed = from_checkpoint.stats.checkpoint_partitions
        return held_state(from_checkpoint), held_state(replayed), checkpointed
    finally:
        from_checkpoint.stop()
        replayed.stop()


def assert_comes_to_hold_what_a_replay_holds(
    guard: BudgetGuard, kafka: KafkaSettings, topics: Topics
) -> None:
    """Within 20 s `guard` holds what a guard replaying the whole topic holds."""
    replayed = started_guard(kafka, topics, checkpoints=False)
    try:
        deadline = time.monotonic() + 20
        while held_state(guard) != held_state(replayed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held_state(guard) == held_state(replayed)
    finally:
        replayed.stop()


def test_a_guard_started_from_a_checkpoint_holds_what_a_full_replay_holds(
    kafka_broker: KafkaBroker, batches_impl: str
) -> None:
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    before = [restriction(f"r{n}", ("warn", "downgrade", "throttle")[n % 3]) for n in range(40)]
    before += [expired_ok(f"gone{n}") for n in range(300)] + [live_ok(f"live{n}") for n in range(20)]
    key_of = {n: restriction(f"r{n}")[0] for n in range(40)}
    before += [
        live_ok("r2"),  # lifts r2
        (key_of[5], None),  # a removed budget: r5 forgotten
        (key_of[8], b'{"action": "ok", "not": "a signal"}'),  # malformed: r8's throttle stands
        restriction("ended", window_end=NOW - timedelta(minutes=1)),  # its window is over
    ]
    writer = SignalCheckpointWriter(kafka, topics, timedelta(seconds=0.2))
    try:
        send(producer, topics.signals, before)
        writer.start(wait_s=60)
        deadline = time.monotonic() + 60
        while writer.checkpoints_written < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.checkpoints_written >= 2 and writer.failed_writes == 0
    finally:
        writer.stop()
    after = [restriction("late"), live_ok("r11"), (key_of[14], None), restriction("r17", "warn")]
    send(producer, topics.signals, after)
    producer.close()

    from_checkpoint = started_guard(kafka, topics, checkpoints=True)
    replayed = started_guard(kafka, topics, checkpoints=False)
    try:
        assert from_checkpoint.stats.checkpoint_partitions == 2
        assert replayed.stats.checkpoint_partitions == 0
        # the checkpoint holds the live records only, and the records before it were not read
        assert 40 <= from_checkpoint.stats.checkpoint_records < 70
        read = from_checkpoint.stats.signals_received
        assert read <= from_checkpoint.stats.checkpoint_records + len(after) < 100
        assert replayed.stats.signals_received > 350
        assert held_state(from_checkpoint) == held_state(replayed)
        restrictions, baselines = held_state(from_checkpoint)
        assert {"tenant:late@tenant-daily", "tenant:r8@tenant-daily"} <= restrictions.keys()
        assert not {"tenant:r2@tenant-daily", "tenant:r5@tenant-daily", "tenant:r11@tenant-daily"} & set(
            restrictions
        )
        assert "tenant:live3@tenant-daily" in baselines and "tenant:gone3@tenant-daily" not in baselines
        assert not from_checkpoint.check(attribution={"tenant": "r8"}).allowed
        assert from_checkpoint.check(attribution={"tenant": "r17"}).action == "allow"
    finally:
        from_checkpoint.stop()
        replayed.stop()


def test_an_unusable_checkpoint_falls_back_to_replaying_that_partition(kafka_broker: KafkaBroker) -> None:
    """Partition 0: an unreadable part; 1: an offset past the end; 2: a checkpoint of an earlier topic
    of this name (taken before records below its offset were written: deleted and created again)."""
    topics = signal_topics(kafka_broker, partitions=3)
    kafka, producer = clients(kafka_broker)
    for n in range(30):
        key, value = restriction(f"r{n}")
        producer.send(topics.signals, key=key, value=value, partition=n % 3)
    producer.flush(timeout=30)
    phantom = [restriction("phantom")]
    garbage = [(part_key(topics.signals, 0, 0), b'{"not": "a part"}\nxx')]
    ahead = split_checkpoint(topics.signals, 1, 10_000, phantom, NOW)
    earlier = split_checkpoint(topics.signals, 2, 5, phantom, datetime.now(UTC) - timedelta(minutes=30))
    checkpoints = [*garbage, *((p.kafka_key, p.encode()) for p in [*ahead, *earlier])]
    send(producer, topics.signal_checkpoints, checkpoints)
    producer.close()
    guard = started_guard(kafka, topics, checkpoints=True)
    try:
        assert guard.stats.checkpoint_partitions == 0
        restrictions, _ = held_state(guard)
        assert len(restrictions) == 30 and "tenant:phantom@tenant-daily" not in restrictions
    finally:
        guard.stop()


@pytest.mark.parametrize("value", ["-1", "nan", "often", "3600"])
def test_a_bad_checkpoint_interval_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BURNGUARD_SIGNAL_CHECKPOINT_S", value)
    with pytest.raises(ValueError, match="BURNGUARD_SIGNAL_CHECKPOINT_S"):
        StreamSettings.from_env()


def test_checkpoints_are_written_every_30s_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StreamSettings.from_env().signal_checkpoint_interval == timedelta(seconds=30)
    monkeypatch.setenv("BURNGUARD_SIGNAL_CHECKPOINT_S", "0")
    assert not StreamSettings.from_env().signal_checkpoint_interval


def write_checkpoints(
    kafka: KafkaSettings, topics: Topics, clock: object = None, partitions: int = 2
) -> None:
    """Run a real writer until it has checkpointed each partition of what is on the topic now."""
    extra = {"clock": clock} if clock is not None else {}
    writer = SignalCheckpointWriter(kafka, topics, timedelta(seconds=0.2), **extra)
    try:
        writer.start(wait_s=60)
        deadline = time.monotonic() + 60
        while writer.checkpoints_written < partitions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.checkpoints_written >= partitions and writer.failed_writes == 0
    finally:
        writer.stop()


def test_a_guard_that_reconnects_goes_on_from_where_it_was_not_from_a_newer_checkpoint(
    kafka_broker: KafkaBroker,
) -> None:
    """A lost connection while a key's restriction was lifted and a checkpoint written past it:
    the guard must still read the lift, not jump to the checkpoint keeping its stale restriction."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    held_key, _ = restriction("held")
    send(producer, topics.signals, [restriction("held"), restriction("other", "warn")])
    guard = started_guard(kafka, topics, checkpoints=True)
    trigger, paused, resume = threading.Event(), threading.Event(), threading.Event()

    def lose_connection(consumer: object) -> None:  # a fault injected on the guard's follower thread
        if trigger.is_set() and not paused.is_set():
            paused.set()
            resume.wait(60)
            raise KafkaConnectionError("injected: connection lost")

    guard._follower._after_poll = lose_connection  # type: ignore[method-assign]
    try:
        assert held_key.decode() in held_state(guard)[0]
        trigger.set()
        assert paused.wait(10)
        send(producer, topics.signals, [(held_key, None), restriction("new")])  # while it is away
        write_checkpoints(kafka, topics)
        resume.set()
        assert_comes_to_hold_what_a_replay_holds(guard, kafka, topics)
        assert held_key.decode() not in held_state(guard)[0]
        assert "tenant:new@tenant-daily" in held_state(guard)[0]
    finally:
        resume.set()
        producer.close()
        guard.stop()


def test_a_checkpoint_from_a_writer_clock_too_far_ahead_is_not_used(kafka_broker: KafkaBroker) -> None:
    """The writer leaves out what ended by its clock less the margin: a guard whose clock is
    further behind than that would still hold it, so it replays instead."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    ending = restriction("ending", window_end=datetime.now(UTC) + timedelta(minutes=3))
    send(producer, topics.signals, [ending, restriction("other")])
    producer.close()
    write_checkpoints(kafka, topics, clock=lambda: datetime.now(UTC) + timedelta(minutes=10))
    from_checkpoint, replayed, checkpointed = held_with_and_without_checkpoints(kafka, topics)
    assert ending[0].decode() in replayed[0]
    assert from_checkpoint == replayed and checkpointed == 0


def test_a_checkpoint_part_nested_too_deep_is_passed_over_and_the_guard_replays(
    kafka_broker: KafkaBroker,
) -> None:
    """json.loads raises RecursionError (not a ValueError) on it: it must not end the guard's thread."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    send(producer, topics.signals, [restriction(f"r{n}") for n in range(5)])
    send(producer, topics.signal_checkpoints, [(part_key(topics.signals, 0, 0), b"[" * 100_000 + b"\n")])
    producer.close()
    parts, problems = decode_parts({b"deep": b"[" * 100_000 + b"\n"})
    assert parts == [] and "unreadable" in problems[0]
    guard = BudgetGuard(kafka, topics, BudgetConfig()).start(wait_s=30)
    try:
        assert guard.ready and len(held_state(guard)[0]) == 5
    finally:
        guard.stop()


def test_an_unexpected_error_on_the_follower_thread_does_not_end_it(kafka_broker: KafkaBroker) -> None:
    """The thread is the guard's only source of signals: any error is logged and it goes on."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    send(producer, topics.signals, [restriction("first")])
    guard = started_guard(kafka, topics, checkpoints=True)
    failures: list[int] = []

    def fail_once(consumer: object) -> None:  # a fault injected on the guard's follower thread
        if not failures:
            failures.append(1)
            raise RuntimeError("injected: not a KafkaError")

    guard._follower._after_poll = fail_once  # type: ignore[method-assign]
    try:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        send(producer, topics.signals, [restriction("second")])
        deadline = time.monotonic() + 20
        while "tenant:second@tenant-daily" not in held_state(guard)[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert failures and "tenant:second@tenant-daily" in held_state(guard)[0]
        assert "tenant:first@tenant-daily" in held_state(guard)[0]
    finally:
        producer.close()
        guard.stop()


def test_a_record_under_another_key_than_its_signal_is_refused_by_guard_and_writer(
    kafka_broker: KafkaBroker,
) -> None:
    """The worker keys each signal by its own key. A record under another key would outlive its
    tombstone in a replay while the checkpoint dropped it, or keep a restriction that its own
    key's (expired) `ok` lifted: both read it as malformed, so both hold the same."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    for n in range(4):  # on both partitions
        elsewhere = f"tenant:elsewhere{n}@tenant-daily".encode()
        _, hidden = restriction(f"hidden{n}")
        lifted_key, lifted = restriction(f"lifted{n}")
        assert expired_ok(f"lifted{n}")[0] == lifted_key
        batch = [(elsewhere, hidden), (elsewhere, None)]  # a tombstone for the record's key
        batch += [(f"tenant:other{n}@tenant-daily".encode(), lifted), expired_ok(f"lifted{n}")]
        send(producer, topics.signals, batch)
    producer.close()
    write_checkpoints(kafka, topics)
    from_checkpoint = started_guard(kafka, topics, checkpoints=True)
    replayed = started_guard(kafka, topics, checkpoints=False)
    try:
        assert from_checkpoint.stats.checkpoint_partitions == 2
        assert held_state(from_checkpoint) == held_state(replayed)
        assert held_state(replayed) == ({}, set())
        assert replayed.stats.malformed_signals == 8
    finally:
        from_checkpoint.stop()
        replayed.stop()


def raw_records(kafka_broker: KafkaBroker, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every record the broker still holds in partition 0 of `topic`, tombstones included."""
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        found: list[tuple[bytes, bytes | None]] = []
        while consumer.position(tp) < end:
            for batch in consumer.poll(timeout_ms=500).values():
                found += [(r.key, r.value) for r in batch]
        return found
    finally:
        consumer.close()


@pytest.mark.slow
def test_a_checkpoint_left_behind_by_a_stopped_writer_is_not_used_once_old(kafka_broker: KafkaBroker) -> None:
    """Checkpoints switched off (or failing) for long: the cleaner has since removed the tombstone
    that retired a key after the checkpoint, whose old restriction the checkpoint still holds."""
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(signals=f"signals-{suffix}", signal_checkpoints=f"checkpoints-{suffix}")
    cleaned_fast = {
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.001",
        "delete.retention.ms": "0",
        "min.compaction.lag.ms": "0",
    }
    kafka_broker.create_topic(topics.signals, partitions=1, compact=True, config=cleaned_fast)
    kafka_broker.create_topic(topics.signal_checkpoints, partitions=1, compact=True)
    kafka, producer = clients(kafka_broker)
    retired_key, retired = restriction("retired")
    send(producer, topics.signals, [(retired_key, retired), restriction("stays")])
    # the last checkpoint, written two hours ago (by the writer's clock) before it was switched off
    write_checkpoints(kafka, topics, clock=lambda: datetime.now(UTC) - timedelta(hours=2), partitions=1)
    send(producer, topics.signals, [live_ok("retired"), (retired_key, None)])
    deadline = time.monotonic() + 120
    while any(key == retired_key for key, _ in raw_records(kafka_broker, topics.signals)):
        assert time.monotonic() < deadline, "the broker's cleaner never removed the retired key"
        time.sleep(1.0)
        send(producer, topics.signals, [restriction("filler")])  # rolls the segment the tombstone is in
    producer.close()
    from_checkpoint, replayed, checkpointed = held_with_and_without_checkpoints(kafka, topics)
    assert retired_key.decode() not in replayed[0]
    assert from_checkpoint == replayed and checkpointed == 0


def test_a_connection_lost_right_after_a_checkpoint_was_applied_goes_on_from_it(
    kafka_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost before the first poll after a checkpoint: the guard already holds the checkpoint's
    records, so a newer checkpoint (which left out a key since retired) must not be laid over them."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    retired_key, retired = restriction("retired")
    send(producer, topics.signals, [(retired_key, retired), restriction("stays")])
    write_checkpoints(kafka, topics)
    paused, resume = threading.Event(), threading.Event()
    caught_up = compacted_topics._caught_up

    def lose_connection_once(consumer: KafkaConsumer, end_offsets: dict[TopicPartition, int]) -> bool:
        """A fault injected after the guard's first poll of the signals topic."""
        on_signals = {tp.topic for tp in end_offsets} == {topics.signals}
        if threading.current_thread().name == "burnguard-guard" and on_signals and not paused.is_set():
            paused.set()
            resume.wait(60)
            raise KafkaConnectionError("injected: connection lost")
        return caught_up(consumer, end_offsets)

    monkeypatch.setattr(compacted_topics, "_caught_up", lose_connection_once)
    guard = BudgetGuard(kafka, topics, BudgetConfig()).start(wait_s=0)
    try:
        assert paused.wait(30)
        assert guard.stats.checkpoint_partitions == 2 and retired_key.decode() in held_state(guard)[0]
        send(producer, topics.signals, [(retired_key, None)])
        write_checkpoints(kafka, topics)  # a newer checkpoint, without the retired key
        resume.set()
        assert_comes_to_hold_what_a_replay_holds(guard, kafka, topics)
        assert retired_key.decode() not in held_state(guard)[0]
    finally:
        resume.set()
        producer.close()
        guard.stop()


def test_a_writer_clock_stepped_back_stamps_the_latest_time_it_judged_by(kafka_broker: KafkaBroker) -> None:
    """Records left out by the clock before it stepped back: the checkpoint's time must say so."""
    topics = signal_topics(kafka_broker)
    kafka, producer = clients(kafka_broker)
    ending = restriction("ending", window_end=datetime.now(UTC) + timedelta(minutes=3))
    send(producer, topics.signals, [ending, restriction("other")])
    producer.close()
    calls = itertools.count()

    def stepped_back() -> datetime:  # ten minutes ahead while it reads the two records, then right
        return datetime.now(UTC) + (timedelta(minutes=10) if next(calls) < 2 else timedelta(0))

    write_checkpoints(kafka, topics, clock=stepped_back)
    from_checkpoint = started_guard(kafka, topics, checkpoints=True)
    replayed = started_guard(kafka, topics, checkpoints=False)
    try:
        assert ending[0].decode() in held_state(replayed)[0]
        assert held_state(from_checkpoint) == held_state(replayed)
    finally:
        from_checkpoint.stop()
        replayed.stop()


def test_a_checkpoint_before_the_log_start_reads_on_from_the_earliest_record(
    kafka_broker: KafkaBroker, batches_impl: str
) -> None:
    """Records deleted up to past the checkpoint (retention on a `compact,delete` topic, or an
    operator's delete-records): the guard must read what remains, not jump to the end."""
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(signals=f"signals-{suffix}", signal_checkpoints=f"checkpoints-{suffix}")
    kafka_broker.create_topic(topics.signals, partitions=1, config={"cleanup.policy": "compact,delete"})
    kafka_broker.create_topic(topics.signal_checkpoints, partitions=1, compact=True)
    kafka, producer = clients(kafka_broker)
    send(producer, topics.signals, [restriction("first"), restriction("second")])
    write_checkpoints(kafka, topics, partitions=1)  # at offset 2
    send(producer, topics.signals, [restriction("third"), restriction("fourth")])
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    try:
        admin.delete_records({TopicPartition(topics.signals, 0): 3})
    finally:
        admin.close()
    send(producer, topics.signals, [restriction("after")])
    producer.close()
    guard = started_guard(kafka, topics, checkpoints=True)
    try:
        assert guard.stats.checkpoint_partitions == 1
        held = held_state(guard)[0]
        assert {"tenant:fourth@tenant-daily", "tenant:after@tenant-daily"} <= held.keys()
    finally:
        guard.stop()


def test_a_part_inflating_past_its_bound_is_refused_without_inflating_it() -> None:
    header = split_checkpoint(TOPIC, 0, 9, [], NOW)[0].encode().partition(b"\n")[0]
    bomb = zlib.compress(b"\0" * (MAX_PART_BODY + 1), 9)  # ~16 kB that would inflate to 16 MB
    with pytest.raises(ValueError, match="over"):
        CheckpointPart.decode(header + b"\n" + bomb)
    whole = zlib.compress(b"")
    with pytest.raises(ValueError, match="truncated"):
        CheckpointPart.decode(header + b"\n" + whole[:-2])


def test_a_writer_whose_writes_fail_counts_them_goes_on_and_writes_once_it_can(
    kafka_broker: KafkaBroker,
) -> None:
    """The broker refuses every part (too large for the topic): logged and counted each interval,
    the thread goes on following the signals, and the next write after the cause is gone lands."""
    topics = signal_topics(kafka_broker)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    resource = ConfigResource("TOPIC", topics.signal_checkpoints, {"max.message.bytes": "64"})
    admin.alter_configs([resource])
    kafka, producer = clients(kafka_broker)
    send(producer, topics.signals, [restriction(f"r{n}") for n in range(10)])
    writer = SignalCheckpointWriter(kafka, topics, timedelta(seconds=0.2))
    try:
        writer.start(wait_s=60)
        deadline = time.monotonic() + 60
        while writer.failed_writes < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.failed_writes >= 3 and writer.checkpoints_written == 0
        send(producer, topics.signals, [restriction("meanwhile")])
        while sum(writer.positions.values()) < 11 and time.monotonic() < deadline:
            time.sleep(0.1)  # read back (its fetches wait up to FETCH_WAIT_MS): the next write holds it
        admin.alter_configs(
            [ConfigResource("TOPIC", topics.signal_checkpoints, {"max.message.bytes": "1048588"})]
        )
        while writer.checkpoints_written < 2 and time.monotonic() < deadline + 30:
            time.sleep(0.1)
        assert writer.checkpoints_written >= 2 and writer._thread.is_alive()
    finally:
        writer.stop()
        admin.close()
        producer.close()
    guard = started_guard(kafka, topics, checkpoints=True)
    try:
        assert guard.stats.checkpoint_partitions == 2 and guard.stats.checkpoint_records == 11
    finally:
        guard.stop()


@pytest.mark.slow
def test_a_writer_outlives_its_broker_going_down_and_checkpoints_after_it_is_back(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka").start()
    writer = None
    try:
        topics = Topics(signals="burnguard.signals", signal_checkpoints="burnguard.signals.checkpoints")
        broker.create_topic(topics.signals, partitions=1, compact=True)
        broker.create_topic(topics.signal_checkpoints, partitions=1, compact=True)
        kafka = KafkaSettings(bootstrap=broker.bootstrap)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        send(producer, topics.signals, [restriction("before")])
        producer.close()
        writer = SignalCheckpointWriter(kafka, topics, timedelta(seconds=0.5)).start(wait_s=60)
        deadline = time.monotonic() + 60
        while writer.checkpoints_written < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.checkpoints_written == 1
        broker.stop()
        time.sleep(2)  # the writer's connection is gone; it keeps trying (every second)
        broker.start()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        send(producer, topics.signals, [restriction("after")])
        producer.close()
        deadline = time.monotonic() + 90
        while writer.checkpoints_written < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert writer.checkpoints_written >= 2 and writer._thread.is_alive()
        writer.stop()
        guard = started_guard(kafka, topics, checkpoints=True)
        try:
            assert guard.stats.checkpoint_partitions == 1 and guard.stats.checkpoint_records == 2
            assert {"tenant:before@tenant-daily", "tenant:after@tenant-daily"} <= held_state(guard)[0].keys()
        finally:
            guard.stop()
    finally:
        if writer is not None:
            writer.stop()
        broker.stop()


# --- the worker's own signals, read back without parsing (`PublishedSignals`) -------------------


class ReadBack:
    """What the writer's `_apply` reads of a consumer record."""

    def __init__(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        self.partition, self.key, self.value = partition, key, value


def offline_writer(published: PublishedSignals | None) -> SignalCheckpointWriter:
    """A writer that is never started: its `_apply` alone, at a fixed clock."""
    kafka = KafkaSettings(bootstrap="127.0.0.1:9")
    return SignalCheckpointWriter(kafka, Topics(), timedelta(seconds=30), lambda: NOW, published=published)


def kept_by(writer: SignalCheckpointWriter) -> dict[int, list[tuple[bytes, bytes, datetime]]]:
    return {p: [(k, e.value, e.until) for k, e in kept.items()] for p, kept in writer._kept.items()}


def test_the_writer_keeps_what_it_would_parse_from_the_signals_this_worker_published() -> None:
    """Random read-backs of four keys: the worker's own records (the latest it noted, or one it
    published before it), another worker's, malformed ones, records under another key than
    their signal's, tombstones. A writer told what was published keeps exactly what one that
    parses every record keeps, and parses only what it was not told."""
    rng = random.Random(16)
    published = PublishedSignals()
    told, parsing = offline_writer(published), offline_writer(None)
    keys = [f"k{n}" for n in range(4)]
    for n in range(2_000):
        name = rng.choice(keys)
        action = rng.choice(["ok", "warn", "downgrade", "throttle"])
        ttl = timedelta(minutes=rng.choice([1, 10, 60]))
        signal = factories.make_signal(
            action, key=name, issued_at=NOW - timedelta(minutes=rng.randint(0, 8)), ttl=ttl
        )
        key, value = signal.kafka_key.encode(), signal.to_json()
        kind = rng.random()
        if kind < 0.5:
            published.note(key, value, signal)
            if rng.random() < 0.2:  # a newer one noted before this is read back
                newer = factories.make_signal("throttle", key=name, issued_at=NOW, ttl=ttl)
                published.note(key, newer.to_json(), newer)
        elif kind < 0.6:
            value = value[: rng.randint(0, len(value) - 1)]  # malformed
        elif kind < 0.7:
            key = f"tenant:elsewhere@{name}".encode()  # under another key than its signal's
        elif kind < 0.8:
            value = None  # a tombstone
        record = ReadBack(n % 2, key, value)
        told._apply(record)
        parsing._apply(record)
        assert kept_by(told) == kept_by(parsing)
    assert kept_by(parsing) and len(published) <= len(keys)


def test_a_record_read_back_is_taken_only_if_its_value_is_the_one_noted_under_its_key() -> None:
    published = PublishedSignals()
    signal = factories.make_signal("throttle")
    key, value = signal.kafka_key.encode(), signal.to_json()
    published.note(key, value, signal)
    assert published.take(key, value[:-1]) is None  # another value under the key: parsed
    assert published.take(b"tenant:other@tenant-daily", value) is None
    assert published.take(key, bytes(value)) == signal.window_end  # a restriction matters until then
    assert published.take(key, value) is None and len(published) == 0  # taken once


def test_what_was_published_but_never_read_back_stays_bounded() -> None:
    published = PublishedSignals()
    signal = factories.make_signal("throttle")
    for n in range(PublishedSignals.MAX_KEPT + 10):
        published.note(f"k{n}".encode(), b"v", signal)
    assert len(published) <= PublishedSignals.MAX_KEPT


def consumer_settings(follower: CompactedTopicFollower, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The settings `follower` makes its consumer with (the consumer itself is never made)."""
    made: dict[str, object] = {}

    def record(**settings: object) -> None:
        made.update(settings)
        follower._stop.set()  # `_run` then ends after this first try
        raise KafkaConnectionError("not made here")

    monkeypatch.setattr(compacted_topics, "KafkaConsumer", record)
    follower._run()
    return made


def test_a_guard_is_answered_at_the_first_signal_and_the_writer_in_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guard's follower hears of a signal one round trip after it is written; the checkpoint
    writer, which only records how far it read, lets the broker gather ~500 signals a fetch."""
    kafka = KafkaSettings(bootstrap="127.0.0.1:9")
    guard = consumer_settings(CompactedTopicFollower(kafka, TOPIC, lambda k, v: None, "guard"), monkeypatch)
    writer = consumer_settings(offline_writer(None), monkeypatch)
    assert guard.get("fetch_min_bytes", 1) == 1 and guard["client_id"] == "guard"
    assert writer["fetch_min_bytes"] == FETCH_MIN_BYTES >= 100 << 10
    assert writer["fetch_max_wait_ms"] == FETCH_WAIT_MS <= 1_000
    assert writer["client_id"] == "burnguard-checkpoints"
    # with no records, a poll comes back as often as an empty fetch does, a guard's every 200 ms
    assert SignalCheckpointWriter.poll_timeout_ms == FETCH_WAIT_MS
    assert CompactedTopicFollower.poll_timeout_ms == 200
