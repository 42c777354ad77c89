"""Stage 1 sums the rows of a micro-batch's messages per key, each message's part kept as a step.

A key touched by several messages of a source partition's group gets one row with their sum and
the `Step` of each message (`records.GroupRows`); stage 2 applies what a step adds exactly as the
message's own row (`records.message_rows`, `WindowTotals.add`'s per-key replay mark). So combining
is exact whatever the cut: a re-reading, a new owner's catch-up, a zombie's late send, all combine.
The differential test holds combined and per-message sending to the same totals and marks on
span_load-style input; the replay tests re-send what an earlier sending left behind, cut otherwise.
"""

from __future__ import annotations

import asyncio
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
from burnguard.stream.app import BudgetJob, _has_steps
from burnguard.stream.deadletters import SOURCE_HEADER
from burnguard.stream.records import message_rows, sub_batches
from burnguard.stream.settings import StreamSettings
from kafka.errors import KafkaTimeoutError

from tests.fixtures.consumer_events import Event, Message, keep_sent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from span_load import BUDGETS_YAML, SpanMix

#: every test here runs with `GroupRows` and with the native `Groups` (which takes the native loop's own rows)
pytestmark = pytest.mark.usefixtures("groups_impl")

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
    keep_sent(job)
    return job


def live(job: BudgetJob, partitions: range) -> BudgetJob:
    """As if `_prime` had digested what came before each partition's first message."""
    job.recent.primed.update(partitions)
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
                for wire_row in batch.deltas:
                    self.rows += 1
                    for source, row in message_rows(wire_row, batch.source):
                        totals = self.totals.setdefault(
                            f"{row.budget}|{row.key}|{row.window_start_ns}", WindowTotals()
                        )
                        totals.add(*source, *row[3:])
                for guard, session, inputs in batch.contexts:
                    growth = self.contexts.setdefault(f"{guard}|{session}", ContextGrowth())
                    growth.observe(inputs, *batch.source)
        job.sent.clear()  # type: ignore[attr-defined]
        return self

    def marks(self) -> dict[str, dict[str, int]]:
        return {key: totals.applied for key, totals in self.totals.items()}

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


def assert_same_marks(got: StageTwo, expected: StageTwo) -> None:
    assert got.marks() == expected.marks()


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the default bench shape: 40-260 spans per message
        {"batch_min": 10, "batch_max": 20},  # small messages, many tenants
        {"tenants": 20, "users_per_tenant": 10, "calls_per_session": 40},  # keys recur across messages
    ],
    ids=["default", "small-messages", "recurring-keys"],
)
def test_combined_micro_batches_give_the_per_message_totals_and_marks_with_fewer_rows(
    tmp_path: Path, shape: dict[str, int]
) -> None:
    messages = 600 if "batch_max" in shape else 400  # two micro-batches of the ~10x bigger messages
    events = span_load_events(SpanMix(seed=11, **shape), messages=messages, partitions=2)
    combined = live(make_job(tmp_path, "combined"), range(2))
    ingest(combined, events)
    # made after the first ingest: its stall guard would take that ingest's time (over 15 s on a
    # loaded machine) for a stall, and ask the consumer these jobs never start
    alone = live(make_job(tmp_path, "alone", combine=False), range(2))
    ingest(alone, events)
    by_group, by_message = StageTwo().apply(combined), StageTwo().apply(alone)

    # the same additions per source partition; the two partitions' order differs (floats, 1e-15)
    assert_same_spent(by_group.spent(), by_message.spent())
    assert by_group.summary() == by_message.summary()
    assert_same_marks(by_group, by_message)
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


def test_combining_is_on_by_default_and_its_switch_sends_every_message_alone(tmp_path: Path) -> None:
    """Off (`BURNGUARD_COMBINE_MESSAGES=false`) stage 1 sends only rows a worker older than the steps
    reads: a rolling upgrade runs with it off until every worker reads steps."""
    assert StreamSettings().combine_messages
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=60, partitions=1)
    switched_off = live(make_job(tmp_path, "off", combine=False), range(1))
    ingest(switched_off, events)
    assert len(set(StageTwo().apply(switched_off).sub_batches)) == len(events)


@pytest.mark.usefixtures("digest_impl")
def test_a_group_passes_over_a_copy_and_a_malformed_message(tmp_path: Path) -> None:
    events = span_load_events(SpanMix(seed=3, batch_min=10, batch_max=20), messages=8, partitions=1)
    events[3] = Event(Message(0, 3, time.time()), events[2].value)  # a producer retry: offset 2's bytes
    events[5] = Event(Message(0, 5, time.time()), b"\x0a\xff not protobuf")
    combined = live(make_job(tmp_path, "combined"), range(1))
    alone = live(make_job(tmp_path, "alone", combine=False), range(1))
    ingest(combined, events)
    ingest(alone, events)
    by_group, by_message = StageTwo().apply(combined), StageTwo().apply(alone)
    assert by_group.sub_batches and set(by_group.sub_batches) == {(0, 7)}
    assert by_group.spent() == by_message.spent()
    assert_same_marks(by_group, by_message)
    assert (combined.duplicates, combined.deadlettered) == (1, 1)

    ingest(combined, events[2:])  # read again, combined again: nothing counted twice
    again = StageTwo()
    again.totals, again.contexts = by_group.totals, by_group.contexts
    again.apply(combined)
    assert set(again.sub_batches) == {(0, 7)}
    assert again.spent() == by_message.spent()
    assert_same_marks(again, by_message)


def test_a_message_whose_accounting_fails_is_parked_alone_and_the_rest_combined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    job = live(make_job(tmp_path, "combined"), range(1))
    poisoned = {usage.session for usage in _decoded(job, events[2])}  # each message opens new sessions
    for name in ("usage_rows", "usage_rows_detached"):  # the lists, or a native group's rows
        real = getattr(app_module, name)

        def summed(usages: list[Any], *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if any(usage.session in poisoned for usage in usages):
                raise ValueError("a span accounting cannot take")
            return _real(usages, *args, **kwargs)

        monkeypatch.setattr(app_module, name, summed)
    ingest(job, events)
    sources, parked = sources_and_parked(job, deltas_only=True)
    assert (sources, parked) == ([(0, 5)], [b"otlp_spans/0/2"])
    assert job.stats.spans == sum(len(_decoded(job, event)) for event in events[:2] + events[3:])


def sources_and_parked(
    job: BudgetJob, deltas_only: bool = False
) -> tuple[list[tuple[int, int]], list[bytes]]:
    """The sources of the sub-batches the job sent (with delta rows only, or any), and its dead letters'."""
    sent = job.sent  # type: ignore[attr-defined]
    usage = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    parked = [dict(headers) for topic, *_, headers in sent if topic == job.settings.topics.deadletter]
    sources = sorted(
        {batch.source for record in usage for batch in sub_batches(record) if batch.deltas or not deltas_only}
    )
    return sources, [headers[SOURCE_HEADER] for headers in parked]


def _decoded(job: BudgetJob, event: Event) -> list[Any]:
    from burnguard.contracts.otlp import decode_spans

    return decode_spans(event.value, job.limits).usages


def reference(events: list[Event], tmp_path: Path) -> StageTwo:
    """What the events add up to, each message sent once and alone."""
    job = live(make_job(tmp_path, "reference", combine=False), range(2))
    ingest(job, events)
    return StageTwo().apply(job)


def test_a_re_reading_after_a_failed_send_combines_and_counts_each_message_once(tmp_path: Path) -> None:
    """Micro-batch [0-2] delivered, [3-5] failed: the re-reading from the commit (0) straddles 2."""
    events = span_load_events(SpanMix(seed=9, tenants=3, users_per_tenant=2), messages=6, partitions=1)
    job = live(make_job(tmp_path, "worker"), range(1))
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

    expected = reference(events, tmp_path)
    assert set(stage_two.sub_batches[seen:]) == {(0, 5)}  # combined: 0-2 again, skipped step by step
    assert stage_two.spent() == expected.spent()
    assert_same_marks(stage_two, expected)


def test_a_new_owner_combines_its_backlog_across_an_earlier_owners_groups(tmp_path: Path) -> None:
    """A combined 1-3 and died before its commit; B (a new process) reads 0-5 in one group, then more."""
    events = span_load_events(SpanMix(seed=13, tenants=3, users_per_tenant=2), messages=9, partitions=1)
    stage_two = StageTwo()
    worker_a = live(make_job(tmp_path, "a"), range(1))
    ingest(worker_a, events[:1])
    ingest(worker_a, events[1:4])
    stage_two.apply(worker_a)
    assert set(stage_two.sub_batches) == {(0, 0), (0, 3)}
    seen = len(stage_two.sub_batches)
    worker_b = live(make_job(tmp_path, "b"), range(1))
    ingest(worker_b, events[:6])  # from the commit (0)
    ingest(worker_b, events[6:])
    stage_two.apply(worker_b)

    expected = reference(events, tmp_path)
    assert set(stage_two.sub_batches[seen:]) == {(0, 5), (0, 8)}
    assert stage_two.spent() == expected.spent()
    assert_same_marks(stage_two, expected)


@pytest.mark.parametrize("zombie_first", [True, False], ids=["zombie-first", "successor-first"])
def test_a_zombie_and_its_successor_sending_the_same_messages_cut_otherwise_count_each_once(
    tmp_path: Path, zombie_first: bool
) -> None:
    """Expelled while it stood still, a worker may still send rows its successor sends too (each in
    offset order): per-message steps make any interleaving of two such senders' rows exact (stage 1
    still asks the stall guard before a send, for its dead letters: `test_combined_differential`)."""
    events = span_load_events(SpanMix(seed=17, tenants=3, users_per_tenant=2), messages=6, partitions=1)
    zombie = live(make_job(tmp_path, "zombie"), range(1))
    successor = live(make_job(tmp_path, "successor"), range(1))
    ingest(zombie, events[:1])
    ingest(zombie, events[1:4])  # 1-3 as a group
    ingest(successor, events[:2])  # 0-1
    ingest(successor, events[2:])  # 2-5
    stage_two = StageTwo()
    for job in (zombie, successor) if zombie_first else (successor, zombie):
        stage_two.apply(job)
    expected = reference(events, tmp_path)
    assert stage_two.spent() == expected.spent()
    assert stage_two.marks() == expected.marks()


@pytest.mark.parametrize(
    ("combine", "size"),
    [(True, MICRO_BATCH), (True, 1), (False, MICRO_BATCH)],
    ids=["combined", "one-message-batches", "alone"],
)
def test_a_message_that_breaks_its_context_observations_is_parked_alone_and_the_rest_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, combine: bool, size: int
) -> None:
    """A message whose ingest raises past `usage_rows` is dead-lettered, none of its rows sent, and
    the rest of its micro-batch counted: combined or not."""
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    job = live(make_job(tmp_path, "worker", combine=combine), range(1))
    poisoned = {usage.session for usage in _decoded(job, events[2])}
    real_observations = app_module.context_observations

    def context_observations(usages: list[Any], config: Any) -> Any:
        if any(usage.session in poisoned for usage in usages):
            raise ValueError("a session context guards cannot take")
        return real_observations(usages, config)

    monkeypatch.setattr(app_module, "context_observations", context_observations)
    ingest(job, events, size)
    sources, parked = sources_and_parked(job)
    assert parked == [b"otlp_spans/0/2"] and (0, 2) not in sources
    expected = reference(events[:2] + events[3:], tmp_path)
    assert StageTwo().apply(job).spent() == expected.spent()


def test_a_seek_back_re_reads_combined_and_counts_each_message_once(tmp_path: Path) -> None:
    """InOrderReads or the watchdog seeks back to 2 after 0-4 went as one group: 2-9 one group."""
    events = span_load_events(SpanMix(seed=21, tenants=3, users_per_tenant=2), messages=10, partitions=1)
    job = live(make_job(tmp_path, "worker"), range(1))
    stage_two = StageTwo()
    ingest(job, events[:5])
    stage_two.apply(job)
    seen = len(stage_two.sub_batches)
    ingest(job, events[2:])  # one micro-batch: re-readings, then first readings
    stage_two.apply(job)
    assert set(stage_two.sub_batches[:seen]) == {(0, 4)}
    assert set(stage_two.sub_batches[seen:]) == {(0, 9)}
    expected = reference(events, tmp_path)
    assert stage_two.spent() == expected.spent()
    assert_same_marks(stage_two, expected)


def test_steps_weigh_as_rows_so_no_record_outgrows_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key in every message of a micro-batch carries a step per message: a record holds at most
    `BATCH_ROWS` rows, observations and steps together (`MicroBatch`, `_close_group`)."""
    mix = SpanMix(seed=2, tenants=1, users_per_tenant=2, batch_min=1, batch_max=3, calls_per_session=50)
    events = span_load_events(mix, messages=160, partitions=1)
    monkeypatch.setattr(app_module, "BATCH_ROWS", 50)
    job = live(make_job(tmp_path, "worker"), range(1))
    ingest(job, events, size=40)
    sent = job.sent  # type: ignore[attr-defined]
    records = [json.loads(value) for topic, _, _, value, _ in sent if topic == job.settings.topics.usage]
    weights = [
        sum(len(b.deltas) + len(b.contexts) + sum(len(r[-1]) for r in b.deltas if _has_steps(r)) for b in sub)
        for sub in map(sub_batches, records)
    ]
    assert max(weights) <= 50 < sum(weights) and len(records) > len(events) // 40
    assert any(
        _has_steps(row) and len(row[-1]) > 20 for r in records for b in sub_batches(r) for row in b.deltas
    )
    job.sent = sent  # type: ignore[attr-defined]
    expected = reference(events, tmp_path)
    assert StageTwo().apply(job).spent() == expected.spent()


@pytest.mark.parametrize("combine", [True, False], ids=["combined", "alone"])
def test_a_broken_message_in_a_group_charges_its_unpriced_calls_as_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, combine: bool
) -> None:
    """The `unpriced` warning's running charge (`_unpriced`) is what per-message sending adds up,
    also when a message breaks past `usage_rows` and is parked."""
    monkeypatch.setattr(pricing, "resolve_rates", lambda model, provider="": None)  # no model known
    events = span_load_events(SpanMix(seed=5, batch_min=10, batch_max=20), messages=6, partitions=1)
    real_observations = app_module.context_observations
    charged: dict[bool, float] = {}
    for broken in (False, True):
        job = live(make_job(tmp_path, f"worker-{broken}", combine=combine), range(1))
        job.prices = PriceBook(unpriced_prices={"input_mtok": 1.0, "output_mtok": 2.0})
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
