"""Stage 1 sums the rows of many messages of one source partition, and only where that is safe.

A combined sub-batch carries its group's last offset; stage 2's replay check (`WindowTotals.add`)
skips a row at or below a key's mark. So the totals stay exact only if no part of a group can
have been sent before (`BudgetJob._combinable`): (a) a first reading in this process, (b) at or
above the partition's end offset when this worker was assigned it (fetched by `_prime`). The
differential test holds combined and per-message sending to the same totals on span_load-style
input; the rule tests replay what an earlier sending (a failed send, a crashed worker) left
behind, with each half of the rule and with it disabled (a double count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from burnguard.contracts import pricing
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.topics import KafkaSettings, Topics
from burnguard.stream import app as app_module
from burnguard.stream.accounting import ContextGrowth, WindowTotals
from burnguard.stream.app import BudgetJob
from burnguard.stream.deadletters import SOURCE_HEADER
from burnguard.stream.records import sub_batches
from burnguard.stream.settings import StreamSettings
from burnguard.stream.takeover import PartitionsLost
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from tests.fixtures.consumer_events import Event, Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from span_load import BUDGETS_YAML, SpanMix

CONTEXT_GUARD_YAML = """\
context_guards:
  - id: long-context
    max_input_tokens: 1000
    growth_calls: 3
"""
CONFIG = parse_budget_yaml(BUDGETS_YAML + CONTEXT_GUARD_YAML)
MICRO_BATCH = 200


def make_job(
    tmp_path: Path, name: str, kafka: KafkaSettings | None = None, topic: str = "", combine: bool = True
) -> BudgetJob:
    """A job whose stage 1 hands its records to `job.sent` instead of a producer."""
    settings = StreamSettings(
        data_dir=tmp_path / name, app_id=f"combine-{tmp_path.name}-{name}", combine_messages=combine
    )
    if kafka is not None:
        settings.kafka = kafka
        settings.topics = Topics(spans=topic)
    job = BudgetJob(settings, CONFIG)
    job.dead_letters.stale = False
    job.sent = []  # type: ignore[attr-defined]

    async def send() -> None:
        job.sent.extend(job.usage_records._pending)  # type: ignore[attr-defined]
        job.usage_records._pending = []

    job.usage_records.send = send  # type: ignore[method-assign]
    return job


def live(job: BudgetJob, partitions: range) -> BudgetJob:
    """As if `_prime` had found each partition empty when the worker was assigned it."""
    job.recent.primed.update(partitions)
    job._combine_from.update(dict.fromkeys(partitions, 0))
    return job


def span_load_events(mix: SpanMix, messages: int, partitions: int) -> list[Event]:
    """`messages` span_load messages over `partitions` by their key (the tenant), offsets per partition.

    Keyed as `KafkaSpanExporter` keys them, so a session's messages share a partition: the order
    in which a context guard sees a session's calls is then the partition's order either way.
    """
    offsets = [0] * partitions
    events = []
    for _ in range(messages):
        key, value = mix.message()
        partition = zlib.crc32(key) % partitions
        events.append(Event(Message(partition, offsets[partition], time.time()), value))
        offsets[partition] += 1
    return events


def ingest(job: BudgetJob, events: list[Event], size: int = MICRO_BATCH) -> None:
    for first in range(0, len(events), size):
        asyncio.run(job._ingest_batch(events[first : first + size]))


class StageTwo:
    """Stage 2's replay check and sums, over the usage records in the order they were sent."""

    def __init__(self) -> None:
        self.totals: dict[str, WindowTotals] = {}
        self.contexts: dict[str, ContextGrowth] = {}
        self.rows = 0
        #: the source of each sub-batch of delta rows, in the order stage 2 reads them
        self.sub_batches: list[tuple[int, int]] = []

    def apply(self, job: BudgetJob) -> StageTwo:
        usage = job.settings.topics.usage
        for topic, _, _, value, _ in job.sent:  # type: ignore[attr-defined]
            if topic != usage:
                continue
            for batch in sub_batches(json.loads(value)):
                if batch.deltas:  # context observations go per message, combined or not
                    self.sub_batches.append(batch.source)
                for budget, key, start, amount, spans, first, last, bucket, *mix in batch.deltas:
                    totals = self.totals.setdefault(f"{budget}|{key}|{start}", WindowTotals())
                    totals.add(*batch.source, amount, spans, first, last, bucket, mix[0] if mix else None)
                    self.rows += 1
                for guard, session, inputs in batch.contexts:
                    growth = self.contexts.setdefault(f"{guard}|{session}", ContextGrowth())
                    growth.observe(inputs, *batch.source)
        job.sent.clear()  # type: ignore[attr-defined]
        return self

    def spent(self) -> dict[str, float]:
        return {key: totals.spent for key, totals in self.totals.items()}

    def summary(self) -> dict[str, tuple[Any, ...]]:
        """Per window key what the signal reads besides `spent` (spans, event range, call mix)."""
        return {
            key: (t.spans, t.first_event_ns, t.last_event_ns, [round(x, 9) for x in t.mix or []])
            for key, t in self.totals.items()
        }

    def context(self) -> dict[str, tuple[int, int, int]]:
        return {key: (g.last_input, g.streak, g.calls) for key, g in self.contexts.items()}


def assert_same_spent(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    off = {k: (got[k], expected[k]) for k in got if not math.isclose(got[k], expected[k], rel_tol=1e-9)}
    assert not off, f"{len(off)} keys differ, e.g. {list(off.items())[:3]}"


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the default bench shape: 40-260 spans per message
        {"batch_min": 10, "batch_max": 20},  # small messages, many tenants
        {"tenants": 20, "users_per_tenant": 10, "calls_per_session": 40},  # keys recur across messages
    ],
    ids=["default", "small-messages", "recurring-keys"],
)
def test_combined_micro_batches_give_the_per_message_totals_with_fewer_rows(
    tmp_path: Path, shape: dict[str, int]
) -> None:
    events = span_load_events(SpanMix(seed=11, **shape), messages=600, partitions=2)
    combined = live(make_job(tmp_path, "combined"), range(2))
    alone = make_job(tmp_path, "alone")
    alone.recent.primed.update({0, 1})  # no end offset fetched: every message alone, as before
    ingest(combined, events)
    ingest(alone, events)
    by_group, by_message = StageTwo().apply(combined), StageTwo().apply(alone)

    assert_same_spent(by_group.spent(), by_message.spent())
    assert by_group.summary() == by_message.summary()
    assert by_group.context() == by_message.context() and by_group.contexts
    assert (combined.stats.spans, combined.stats.unpriced) == (alone.stats.spans, alone.stats.unpriced)
    spans = combined.stats.spans
    print(
        f"rows/span {shape}: per message {by_message.rows / spans:.2f}, combined {by_group.rows / spans:.2f}"
    )
    assert by_group.rows < 0.9 * by_message.rows
    # one source per partition per micro-batch: the group's last offset
    assert len(set(by_group.sub_batches)) == 2 * math.ceil(len(events) / MICRO_BATCH)
    assert len(set(by_message.sub_batches)) == len(events)


def test_by_default_every_message_goes_alone(tmp_path: Path) -> None:
    """Combining is opt-in (`BURNGUARD_COMBINE_MESSAGES`): by default a live message is never
    summed with others, so each rung of a ladder is published at the call that crossed it."""
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=60, partitions=1)
    default = live(make_job(tmp_path, "default", combine=False), range(1))
    ingest(default, events)
    assert len(set(StageTwo().apply(default).sub_batches)) == len(events)


def test_a_group_passes_over_a_copy_and_a_malformed_message(tmp_path: Path) -> None:
    events = span_load_events(SpanMix(seed=3, batch_min=10, batch_max=20), messages=8, partitions=1)
    events[3] = Event(Message(0, 3, time.time()), events[2].value)  # a producer retry: offset 2's bytes
    events[5] = Event(Message(0, 5, time.time()), b"\x0a\xff not protobuf")
    combined = live(make_job(tmp_path, "combined"), range(1))
    alone = make_job(tmp_path, "alone")
    alone.recent.primed.add(0)
    ingest(combined, events)
    ingest(alone, events)
    by_group, by_message = StageTwo().apply(combined), StageTwo().apply(alone)
    assert by_group.sub_batches and set(by_group.sub_batches) == {(0, 7)}
    assert_same_spent(by_group.spent(), by_message.spent())
    assert (combined.duplicates, combined.deadlettered) == (1, 1)

    ingest(combined, events[2:])  # read again: each message alone, nothing counted twice
    again = StageTwo()
    again.totals, again.contexts = by_group.totals, by_group.contexts
    again.apply(combined)
    assert {source for source in again.sub_batches} <= {(0, o) for o in range(2, 8)}
    assert_same_spent(again.spent(), by_message.spent())


def test_a_message_whose_accounting_fails_sends_its_group_message_by_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    job = live(make_job(tmp_path, "combined"), range(1))
    poisoned = {usage.session for usage in _decoded(job, events[2])}  # each message opens new sessions
    real_usage_rows = app_module.usage_rows

    def usage_rows(usages: list[Any], *args: Any, **kwargs: Any) -> Any:
        if any(usage.session in poisoned for usage in usages):
            raise ValueError("a span accounting cannot take")
        return real_usage_rows(usages, *args, **kwargs)

    monkeypatch.setattr(app_module, "usage_rows", usage_rows)
    ingest(job, events)
    assert sources_and_parked(job) == ([(0, 0), (0, 1), (0, 3), (0, 4), (0, 5)], [b"otlp_spans/0/2"])
    assert job.stats.spans == sum(len(_decoded(job, event)) for event in events[:2] + events[3:])


def sources_and_parked(job: BudgetJob) -> tuple[list[tuple[int, int]], list[bytes]]:
    """The sources of the sub-batches the job sent, and the sources its dead letters name."""
    sent = job.sent  # type: ignore[attr-defined]
    usage = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    parked = [dict(headers) for topic, *_, headers in sent if topic == job.settings.topics.deadletter]
    sources = sorted({batch.source for record in usage for batch in sub_batches(record)})
    return sources, [headers[SOURCE_HEADER] for headers in parked]


def _decoded(job: BudgetJob, event: Event) -> list[Any]:
    from burnguard.contracts.otlp import decode_spans

    return decode_spans(event.value, job.limits).usages


def expected_spent(events: list[Event], tmp_path: Path) -> dict[str, float]:
    """What the events add up to, each message sent once and alone."""
    job = make_job(tmp_path, "reference")
    job.recent.primed.update({0, 1})
    ingest(job, events)
    return StageTwo().apply(job).spent()


@pytest.mark.parametrize("rule_a", [True, False], ids=["rule", "without-first-reading"])
def test_a_re_reading_after_a_failed_send_goes_message_by_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule_a: bool
) -> None:
    """Micro-batch [0-2] delivered, [3-5] failed: the re-reading from the commit (0) straddles 2."""
    events = span_load_events(SpanMix(seed=9, tenants=3, users_per_tenant=2), messages=6, partitions=1)
    job = live(make_job(tmp_path, "worker"), range(1))
    if not rule_a:
        monkeypatch.setattr(job, "_combinable", lambda message, first: message.offset >= 0)
    stage_two = StageTwo()
    ingest(job, events[:3])
    stage_two.apply(job)

    async def broker_gone() -> None:
        job.usage_records._pending = []
        raise KafkaTimeoutError("broker gone")

    working_send = job.usage_records.send
    job.usage_records.send = broker_gone  # type: ignore[method-assign]
    with pytest.raises(KafkaTimeoutError):
        ingest(job, events[3:])
    job.usage_records.send = working_send  # type: ignore[method-assign]
    seen = len(stage_two.sub_batches)
    ingest(job, events)  # not committed: read again from offset 0, in one micro-batch
    stage_two.apply(job)

    expected = expected_spent(events, tmp_path)
    if rule_a:
        assert set(stage_two.sub_batches[seen:]) == {(0, o) for o in range(6)}  # each alone again
        assert_same_spent(stage_two.spent(), expected)
    else:  # the second group (0, 5) holds 0-2 again, above the keys' mark 2: counted twice
        assert sum(stage_two.spent().values()) > 1.1 * sum(expected.values())


@pytest.mark.parametrize("rule_b", [True, False], ids=["rule", "without-end-offset"])
def test_a_fresh_assignment_sends_its_backlog_message_by_message(
    kafka_broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule_b: bool
) -> None:
    """Worker A combined 1-3 and died before its commit; B (a new process) reads 0-5, then more."""
    topic = f"spans-{tmp_path.name}"
    kafka_broker.create_topic(topic, partitions=1)
    kafka = KafkaSettings(bootstrap=kafka_broker.bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    mix = SpanMix(seed=13, tenants=3, users_per_tenant=2)
    events: list[Event] = []

    def produce(count: int) -> list[Event]:
        for _ in range(count):
            _, value = mix.message()
            meta = producer.send(topic, value=value).get(timeout=30)
            events.append(Event(Message(0, meta.offset, time.time(), topic=topic), value))
        return events[-count:]

    stage_two = StageTwo()
    worker_a = make_job(tmp_path, "a", kafka, topic)
    ingest(worker_a, produce(1))  # assigned an empty partition: its end offset is 1 at `_prime`
    assert worker_a._combine_from == {0: 1}
    ingest(worker_a, produce(3))  # live: 1-3 combined
    stage_two.apply(worker_a)
    assert set(stage_two.sub_batches) == {(0, 0), (0, 3)}

    produce(2)
    seen = len(stage_two.sub_batches)
    worker_b = make_job(tmp_path, "b", kafka, topic)
    if not rule_b:
        monkeypatch.setattr(worker_b, "_combinable", lambda message, first: first)
    ingest(worker_b, events[:6])  # from the commit (0)
    stage_two.apply(worker_b)
    ingest(worker_b, produce(3))
    stage_two.apply(worker_b)
    producer.close()

    expected = expected_spent(events, tmp_path)
    if rule_b:
        assert worker_b._combine_from == {0: 6}
        assert set(stage_two.sub_batches[seen:]) == {(0, o) for o in range(6)} | {(0, 8)}
        assert_same_spent(stage_two.spent(), expected)
    else:  # B's group (0, 5) holds 1-3 again, above A's marks at 3 or below: counted twice
        assert sum(stage_two.spent().values()) > 1.1 * sum(expected.values())


def test_a_worker_expelled_while_it_stood_still_sends_no_combined_rows(tmp_path: Path) -> None:
    """Its successor reads the same messages alone; a late group of its own could straddle them."""
    events = span_load_events(SpanMix(seed=17, batch_min=10, batch_max=20), messages=4, partitions=1)
    job = live(make_job(tmp_path, "zombie"), range(1))

    async def expelled() -> bool:
        return False

    job.stall_guard.still_member = expelled  # type: ignore[method-assign]
    with pytest.raises(PartitionsLost):
        ingest(job, events)
    assert not job.sent and not job.usage_records._pending  # type: ignore[attr-defined]
    del job.stall_guard.still_member  # a member again after the rebalance
    ingest(job, events)  # read again (after the rebalance): alone, as the successor sends them
    assert {source for source in StageTwo().apply(job).sub_batches} == {(0, o) for o in range(4)}


async def _expelled() -> bool:
    return False


def test_an_expelled_worker_sends_not_even_a_lone_first_reading_its_successor_may_combine(
    tmp_path: Path,
) -> None:
    """A zombie's lone row below a successor's group mark, applied before the group, counts twice.

    The successor was assigned the partition while the zombie stood still, with nothing in it
    (end offset 0), so it combines 0-2. The resumed zombie's fetcher got offset 0 before its
    heartbeat told it it was out; a micro-batch of that one message makes no group of two, yet
    its row (mark 0) lands before the successor's group (0-2, mark 2): message 0 counted twice.
    """
    events = span_load_events(SpanMix(seed=17, batch_min=10, batch_max=20), messages=3, partitions=1)
    zombie = live(make_job(tmp_path, "zombie"), range(1))
    zombie.stall_guard.still_member = _expelled  # type: ignore[method-assign]
    successor = live(make_job(tmp_path, "successor"), range(1))
    stage_two = StageTwo()
    with contextlib.suppress(PartitionsLost):  # how the zombie's agent ends, or nothing with c7ad6f8
        ingest(zombie, events[:1])
    stage_two.apply(zombie)
    ingest(successor, events)
    stage_two.apply(successor)
    assert_same_spent(stage_two.spent(), expected_spent(events, tmp_path))
    assert set(stage_two.sub_batches) == {(0, 2)}  # only the successor's group was applied


@pytest.mark.parametrize(
    ("combine", "size"),
    [(True, MICRO_BATCH), (True, 1), (False, MICRO_BATCH)],
    ids=["combined", "combinable-one-message-batches", "alone"],
)
def test_a_message_that_breaks_its_context_observations_is_parked_alone_and_its_group_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, combine: bool, size: int
) -> None:
    """Alone, a message whose ingest raises past `usage_rows` is dead-lettered and the rest counted;
    in a group the fallback must do the same, not end the micro-batch (nothing sent, agent crashed),
    and so must a combinable message that is its micro-batch's only one (a group of one)."""
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    job = make_job(tmp_path, "worker")
    if combine:
        live(job, range(1))
    else:
        job.recent.primed.add(0)
    poisoned = {usage.session for usage in _decoded(job, events[2])}
    real_observations = app_module.context_observations

    def context_observations(usages: list[Any], config: Any) -> Any:
        if any(usage.session in poisoned for usage in usages):
            raise ValueError("a session context guards cannot take")
        return real_observations(usages, config)

    monkeypatch.setattr(app_module, "context_observations", context_observations)
    ingest(job, events, size)
    assert sources_and_parked(job) == ([(0, 0), (0, 1), (0, 3), (0, 4), (0, 5)], [b"otlp_spans/0/2"])


def test_a_seek_back_re_reads_alone_and_combines_only_the_first_readings_after_it(tmp_path: Path) -> None:
    """InOrderReads or the watchdog seeks back to 2 after 0-4 went as one group: 2-4 alone, 5-9 a group."""
    events = span_load_events(SpanMix(seed=21, tenants=3, users_per_tenant=2), messages=10, partitions=1)
    job = live(make_job(tmp_path, "worker"), range(1))
    stage_two = StageTwo()
    ingest(job, events[:5])
    stage_two.apply(job)
    seen = len(stage_two.sub_batches)
    ingest(job, events[2:])  # one micro-batch: re-readings, then first readings
    stage_two.apply(job)
    assert set(stage_two.sub_batches[:seen]) == {(0, 4)}
    assert set(stage_two.sub_batches[seen:]) == {(0, 2), (0, 3), (0, 4), (0, 9)}
    assert_same_spent(stage_two.spent(), expected_spent(events, tmp_path))


def test_a_rebalance_in_the_middle_of_a_micro_batch_ends_the_group_and_the_successor_counts_the_rest(
    tmp_path: Path,
) -> None:
    """The rebalance starts (Faust's consumer thread) after 0-2 joined a group: 3-5, read during the
    revoke, go alone (primed again: end offset 6), the group is sent before the revoke ends, and the
    successor reads 0-5 alone from the commit (0) and combines only 6-9."""
    events = span_load_events(SpanMix(seed=23, tenants=3, users_per_tenant=2), messages=10, partitions=1)
    worker = live(make_job(tmp_path, "worker"), range(1))
    successor = make_job(tmp_path, "successor")
    for job in (worker, successor):
        job.primer.prime = lambda partition, offset, ns: 0  # type: ignore[method-assign]
        job.primer.end_offset = lambda partition: 6  # type: ignore[method-assign]
    real_ingest_one = worker._ingest_one

    def ingest_one(event: Event, *args: Any) -> None:
        if event.message.offset == 3:
            app_module._AfterRebalance(worker).on_rebalance_start(worker.app)
            worker.dead_letters.stale = False  # read back already (nothing parked)
        real_ingest_one(event, *args)

    worker._ingest_one = ingest_one  # type: ignore[method-assign]
    stage_two = StageTwo()
    ingest(worker, events[:6])
    stage_two.apply(worker)
    assert set(stage_two.sub_batches) == {(0, 2), (0, 3), (0, 4), (0, 5)}
    seen = len(stage_two.sub_batches)
    ingest(successor, events)
    stage_two.apply(successor)
    assert set(stage_two.sub_batches[seen:]) == {(0, o) for o in range(6)} | {(0, 9)}
    assert_same_spent(stage_two.spent(), expected_spent(events, tmp_path))


@pytest.mark.parametrize("combine", [True, False], ids=["combined", "alone"])
def test_a_group_sent_message_by_message_charges_its_unpriced_calls_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, combine: bool
) -> None:
    """The `unpriced` warning's running charge (`_unpriced`) is what per-message sending adds up,
    also when a message breaks its group's accounting past `usage_rows` and the group goes alone."""
    monkeypatch.setattr(pricing, "resolve_rates", lambda model, provider="": None)  # no model known
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    real_observations = app_module.context_observations
    charged: dict[bool, float] = {}
    for broken in (False, True):
        job = make_job(tmp_path, f"worker-{broken}")
        job.prices = PriceBook(unpriced_prices={"input_mtok": 1.0, "output_mtok": 2.0})
        if combine:
            live(job, range(1))
        else:
            job.recent.primed.add(0)
        poisoned = {usage.session for usage in _decoded(job, events[2])} if broken else set()

        def context_observations(usages: list[Any], config: Any, poisoned: set = poisoned) -> Any:
            if any(usage.session in poisoned for usage in usages):
                raise ValueError("a session context guards cannot take")
            return real_observations(usages, config)

        monkeypatch.setattr(app_module, "context_observations", context_observations)
        ingest(job, events)
        assert job.stats.unpriced > 0
        charged[broken] = sum(total for _, total in job._unpriced.values())
    # the broken message was accounted (and charged) before its observations raised, as alone
    assert math.isclose(charged[True], charged[False], rel_tol=1e-9)
