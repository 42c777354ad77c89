"""The worker's consumer asks the broker for a short fetch wait and the configured fetch size."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.protocol.fetch import FetchRequest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.stream import fetching
from burnguard.stream.app import BudgetJob
from burnguard.stream.settings import StreamSettings
from faust.transport.utils import DefaultSchedulingStrategy
from faust.types import TP

from tests.factories import budgets_yaml, tenant_cost


def _worker_consumer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = StreamSettings.from_env()
    settings.data_dir = tmp_path / "stream"
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1.0))))
    thread = job.app.consumer._thread

    async def create() -> Any:
        # The aiokafka consumer Faust's thread creates at start (constructed only: no broker needed).
        return thread._create_worker_consumer(job.app.transport)

    return asyncio.run(create())


def test_defaults_replace_fausts_fetch_wait(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    consumer = _worker_consumer(monkeypatch, tmp_path, {})
    assert consumer._fetch_max_wait_ms == 20  # Faust's own is 1,500 ms
    assert consumer._max_partition_fetch_bytes == StreamSettings.fetch_partition_bytes


def test_environment_sets_wait_and_fetch_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"BURNGUARD_FETCH_MAX_WAIT_MS": "35", "BURNGUARD_FETCH_PARTITION_BYTES": str(3 << 20)}
    consumer = _worker_consumer(monkeypatch, tmp_path, env)
    assert consumer._fetch_max_wait_ms == 35
    assert consumer._max_partition_fetch_bytes == 3 << 20


@pytest.mark.parametrize("wait_ms", [0, -5, 1501])
def test_out_of_range_wait_is_refused(wait_ms: int) -> None:
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        fetching.FetchWaitTransport([], None, fetch_max_wait_ms=wait_ms)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "0"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "-5"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "nan"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "1501"),
        ("BURNGUARD_FETCH_MAX_WAIT_MS", "soon"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "0"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "-1"),
        ("BURNGUARD_FETCH_PARTITION_BYTES", "1.5"),
        ("BURNGUARD_FETCH_SPANS_PARTITION_BYTES", "0"),
        ("BURNGUARD_FETCH_SPANS_PARTITION_BYTES", "2.5"),
        ("BURNGUARD_INGEST_BATCH_BYTES", "0"),
        ("BURNGUARD_INGEST_BATCH_BYTES", "1.5"),
    ],
)
def test_bad_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        StreamSettings.from_env()


def test_an_aiokafka_without_the_wait_attribute_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The wait is a private attribute of aiokafka's consumer: if it is renamed, the worker says so."""

    def without_wait(self: Any, transport: Any) -> object:
        return object()

    monkeypatch.setattr(fetching.driver.AIOKafkaConsumerThread, "_create_worker_consumer", without_wait)
    with pytest.raises(RuntimeError, match="_fetch_max_wait_ms"):
        _worker_consumer(monkeypatch, tmp_path, {})


class _Delivering:
    """What `_Consumer._deliver` reads of Faust's consumer: read offsets, gap and commit bookkeeping."""

    def __init__(
        self,
        read_offsets: dict[Any, int | None],
        commit_every: int | None = None,
        direct: set[int] = frozenset(),
    ) -> None:
        self._read_offset = defaultdict(lambda: None, read_offsets)
        self._commit_every, self._n_acked = commit_every, 0
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))
        #: the offsets `DirectDelivery` takes (the rest go to the conductor's callback)
        self.direct = direct
        self.delivered: list[int] = []
        self.put_directly: list[int] = []
        self.gaps: list[tuple[Any, int, int]] = []
        self.commits = 0

    async def callback(self, message: Any) -> None:
        self.delivered.append(message.offset)
        self._n_acked += 1

    async def _add_gap(self, tp: Any, start: int, end: int) -> None:
        self.gaps.append((tp, start, end))

    def _direct_delivery(self) -> Any:
        return SimpleNamespace(put=self._put)

    def _put(self, tp: Any, message: Any) -> bool:
        if message.offset not in self.direct:
            return False
        self.put_directly.append(message.offset)
        return True

    async def commit(self) -> None:
        self.commits += 1


def _fetched(tp: str, *offsets: int) -> list[tuple[str, Any]]:
    return [(tp, SimpleNamespace(offset=offset, topic="otlp_spans")) for offset in offsets]


def test_a_fetch_is_delivered_with_fausts_read_offsets_and_gaps() -> None:
    """As Faust's per-message loop: below the read offset skipped, a hole recorded as a gap."""
    consumer = _Delivering({"p0": 4, "p1": None})
    fetched = _fetched("p0", 3, 4, 5, 8) + _fetched("p1", 0, 1)
    asyncio.run(fetching._Consumer._deliver(consumer, fetched))  # type: ignore[arg-type]
    assert consumer.delivered == [4, 5, 8, 0, 1]
    assert consumer.gaps == [("p0", 6, 8)]
    assert dict(consumer._read_offset) == {"p0": 8, "p1": 1}


def test_a_fetch_goes_straight_to_the_channel_where_it_may_else_through_the_conductor_each_once() -> None:
    consumer = _Delivering({"p0": None}, direct={0, 1, 3})
    asyncio.run(fetching._Consumer._deliver(consumer, _fetched("p0", *range(5))))  # type: ignore[arg-type]
    assert consumer.put_directly == [0, 1, 3]
    assert consumer.delivered == [2, 4]
    assert dict(consumer._read_offset) == {"p0": 4}


class _Getting:
    """What `_Consumer.getmany` reads of Faust's consumer: the fetch, flow, generation, high watermarks."""

    def __init__(self, records: dict[Any, list[int]], active: set[Any] | None) -> None:
        self.records, self.active = records, active
        self.app = SimpleNamespace(
            consumer_generation_id=1, monitor=SimpleNamespace(track_tp_end_offset=self._track)
        )
        self.should_stop, self.flow_active = False, True
        self._buffered_partitions: set[Any] = set()
        self.scheduler = DefaultSchedulingStrategy()
        self.log = SimpleNamespace(dev=lambda *args: None, warning=lambda *args: None)
        self.asked: list[Any] = []
        self.tracked: list[tuple[Any, int]] = []
        self.seeks = 0

    async def _wait_next_records(self, timeout: float) -> tuple[dict[Any, list[int]], set[Any] | None]:
        return self.records, self.active

    def highwater(self, tp: Any) -> int:
        self.asked.append(tp)
        return 100 + tp.partition

    def _track(self, tp: Any, offset: int) -> None:
        self.tracked.append((tp, offset))

    def _to_message(self, tp: Any, record: int) -> tuple[Any, int]:
        return tp, record

    async def perform_seek(self) -> None:
        self.seeks += 1


def _got(consumer: _Getting, stop_after: int | None = None, then: Callable[[], None] = lambda: None) -> list:
    async def run() -> list:
        got = []
        async for _tp, message in fetching._Consumer.getmany(consumer, 1.0):  # type: ignore[arg-type]
            got.append(message)
            if len(got) == stop_after:
                then()
        return got

    return asyncio.run(run())


def test_getmany_yields_fausts_messages_and_tells_the_monitor_each_partitions_high_watermark_once() -> None:
    spans0, spans1, usage0 = TP("otlp_spans", 0), TP("otlp_spans", 1), TP("usage", 0)
    consumer = _Getting({spans0: [1, 2, 3], spans1: [7, 8], usage0: [4]}, active={spans0, spans1})
    got = _got(consumer)
    assert sorted(got) == [(spans0, 1), (spans0, 2), (spans0, 3), (spans1, 7), (spans1, 8)]  # usage0 paused
    assert [message for message in got if message[0] == spans0] == [(spans0, 1), (spans0, 2), (spans0, 3)]
    assert consumer.asked == [spans0, spans1] or consumer.asked == [spans1, spans0]
    assert sorted(consumer.tracked) == [(spans0, 100), (spans1, 101)]


def test_getmany_stops_at_a_new_generation_or_a_suspended_flow_and_seeks_when_suspended_before() -> None:
    records = {TP("otlp_spans", 0): [1, 2, 3, 4]}
    consumer = _Getting(records, active=None)
    assert len(_got(consumer, 2, lambda: setattr(consumer.app, "consumer_generation_id", 2))) == 2
    consumer = _Getting(records, active=None)
    assert len(_got(consumer, 1, lambda: setattr(consumer, "flow_active", False))) == 1
    consumer = _Getting(records, active=None)
    consumer.flow_active = False
    assert _got(consumer) == [] and consumer.seeks == 1


def test_a_fetch_commits_every_so_many_acks_as_fausts_loop() -> None:
    consumer = _Delivering({"p0": None}, commit_every=3)
    asyncio.run(fetching._Consumer._deliver(consumer, _fetched("p0", *range(7))))  # type: ignore[arg-type]
    assert consumer.delivered == list(range(7))
    assert consumer.commits == 2  # before the 4th and the 7th message


class _Fetching:
    """What `_Consumer.behind` and `_note_behind` read of Faust's consumer: assignment, high watermarks."""

    def __init__(self, highwaters: dict[Any, int | None], assigned: set[Any]) -> None:
        self.highwaters, self.assigned = highwaters, assigned
        self._behind: set[Any] = set()

    def highwater(self, tp: Any) -> int | None:
        if tp not in self.assigned:
            raise AssertionError("Partition is not assigned")  # as aiokafka's
        return self.highwaters[tp]

    def assignment(self) -> set[Any]:
        return set(self.assigned)


def test_a_fetch_ending_before_the_high_watermark_leaves_its_partition_behind_until_one_reaches_it() -> None:
    spans0, spans1, usage0 = TP("otlp_spans", 0), TP("otlp_spans", 1), TP("usage", 0)
    consumer = _Fetching({spans0: 10, spans1: 3, usage0: 9}, {spans0, spans1, usage0})
    note, behind = fetching._Consumer._note_behind, fetching._Consumer.behind
    note(consumer, [(spans0, SimpleNamespace(offset=4)), (spans1, SimpleNamespace(offset=2))])  # type: ignore[arg-type]
    assert consumer._behind == {spans0}  # 5..9 still in Kafka; spans1 read to its end
    assert behind(consumer, {"otlp_spans"})  # type: ignore[arg-type]
    assert not behind(consumer, {"usage"})  # type: ignore[arg-type]

    note(consumer, [(usage0, SimpleNamespace(offset=1))])  # type: ignore[arg-type]
    consumer.assigned.discard(spans0)  # revoked: its backlog is another worker's
    assert not behind(consumer, {"otlp_spans"})  # type: ignore[arg-type]
    assert behind(consumer, {"usage"})  # type: ignore[arg-type]

    consumer.assigned.add(spans0)
    note(consumer, [(spans0, SimpleNamespace(offset=9))])  # type: ignore[arg-type]
    assert not behind(consumer, {"otlp_spans"})  # type: ignore[arg-type]
    consumer.assigned.discard(usage0)
    note(consumer, [(usage0, SimpleNamespace(offset=2))])  # type: ignore[arg-type]  # unassigned meanwhile
    assert consumer._behind == set()


def test_spans_partitions_are_fetched_at_their_own_size_the_rest_at_the_consumers() -> None:
    def planned(assignment: Any) -> tuple[list[tuple[int, FetchRequest]], dict, float, bool, list]:
        topics = [("otlp_spans", [(0, 7, 1 << 20), (1, 0, 1 << 20)]), ("usage", [(0, 3, 1 << 20)])]
        return [(1, FetchRequest(20, 1, 50 << 20, 0, topics))], {}, 0.1, False, []

    fetcher = SimpleNamespace(_get_actions_per_node=planned)
    fetching.size_fetches(fetcher, {"otlp_spans": 4 << 20})
    requests, *rest = fetcher._get_actions_per_node(None)
    assert requests[0][1].topics == [
        ("otlp_spans", [(0, 7, 4 << 20), (1, 0, 4 << 20)]),
        ("usage", [(0, 3, 1 << 20)]),
    ]
    assert rest == [{}, 0.1, False, []]
    with pytest.raises(RuntimeError, match="_get_actions_per_node"):
        fetching.size_fetches(SimpleNamespace(), {"otlp_spans": 4 << 20})


def test_the_worker_sizes_spans_fetches_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BURNGUARD_FETCH_SPANS_PARTITION_BYTES", str(6 << 20))
    settings = StreamSettings.from_env()
    settings.data_dir = tmp_path / "stream"
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1.0))))
    assert job.app.transport.topic_partition_bytes == {settings.topics.spans: 6 << 20}
    assert StreamSettings.fetch_spans_partition_bytes == 5 << 20


def _planned_fetch(assignment: Any) -> tuple[list[tuple[int, FetchRequest]], dict, float, bool, list]:
    topics = [("otlp_spans", [(0, 7, 1 << 20)]), ("usage", [(0, 3, 1 << 20)])]
    return (
        [(1, FetchRequest(20, 1, 50 << 20, 0, topics)), (2, FetchRequest(20, 1, 50 << 20, 0, []))],
        {},
        0.1,
        False,
        [],
    )


def test_a_fetch_naming_every_partition_with_records_to_come_waits_long_one_with_records_held_short() -> None:
    spans0, changelog0 = TP("otlp_spans", 0), TP("totals-changelog", 0)
    paused = {changelog0}  # Faust's: after recovery, its tables' changelogs
    fetcher = SimpleNamespace(_get_actions_per_node=_planned_fetch, _records={})
    fetching.wait_longer_when_nothing_is_held(fetcher, lambda: paused, 500)

    def waits() -> list[int]:
        requests, *rest = fetcher._get_actions_per_node(None)
        assert rest == [{}, 0.1, False, []]
        return [request._max_wait_ms for _, request in requests]

    assert waits() == [500, 500]  # nothing buffered: every partition that can have news is named
    fetcher._records = {changelog0: "a fetch Faust never takes"}
    assert waits() == [500, 500]
    # a busy partition's records wait to be taken: the others' fetch keeps the short wait, so the
    # busy one is fetched again at most that long after they are taken
    fetcher._records = {changelog0: "never taken", spans0: "to be taken"}
    assert waits() == [20, 20]
    paused.add(spans0)  # Faust paused it too: its records are not taken before a resume
    assert waits() == [500, 500]
    with pytest.raises(RuntimeError, match="_get_actions_per_node"):
        fetching.wait_longer_when_nothing_is_held(SimpleNamespace(_records={}), lambda: paused, 500)
    with pytest.raises(RuntimeError, match="_records"):
        fetching.wait_longer_when_nothing_is_held(
            SimpleNamespace(_get_actions_per_node=_planned_fetch), set, 500
        )


def test_a_fetch_sent_while_faust_rebalances_keeps_the_short_wait() -> None:
    """Its recovery pauses the agents' partitions, then resumes and seeks them (and the rewind asks
    for their log start) while the request is in flight: held long, it held the catch-up up too."""
    rebalancing = [True]
    fetcher = SimpleNamespace(_get_actions_per_node=_planned_fetch, _records={})
    fetching.wait_longer_when_nothing_is_held(fetcher, set, 500, rebalancing=lambda: rebalancing[0])

    def waits() -> list[int]:
        requests, *_ = fetcher._get_actions_per_node(None)
        return [request._max_wait_ms for _, request in requests]

    assert waits() == [20, 20]
    rebalancing[0] = False  # recovery done, the partitions resumed: every one can be named
    assert waits() == [500, 500]


@pytest.mark.parametrize(("short_ms", "long_ms"), [("20", 500), ("800", 800)])
def test_the_workers_consumer_thread_waits_long_when_nothing_is_held_never_below_its_short_wait(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, short_ms: str, long_ms: int
) -> None:
    monkeypatch.setenv("BURNGUARD_FETCH_MAX_WAIT_MS", short_ms)
    settings = StreamSettings.from_env()
    settings.data_dir = tmp_path / "stream"
    job = BudgetJob(settings, parse_budget_yaml(budgets_yaml(tenant_cost(1.0))))
    thread = job.app.consumer._thread

    async def started_elsewhere(self: Any) -> None:  # aiokafka's start: a broker
        return None

    monkeypatch.setattr(fetching.driver.AIOKafkaConsumerThread, "on_start", started_elsewhere)
    fetcher = SimpleNamespace(_get_actions_per_node=_planned_fetch, _records={})
    thread._consumer = SimpleNamespace(_fetcher=fetcher)
    asyncio.run(thread.on_start())
    requests, *_ = fetcher._get_actions_per_node(None)
    assert [request._max_wait_ms for _, request in requests] == [long_ms, long_ms]
    job.app.rebalancing = True  # Faust's, from the revoke until the agents' partitions are resumed
    requests, *_ = fetcher._get_actions_per_node(None)
    assert [request._max_wait_ms for _, request in requests] == [20, 20]  # the plan's own, untouched
    job.app.rebalancing = False
    # and the spans partitions still at their own size (`size_fetches`, installed first)
    assert requests[0][1].topics[0] == ("otlp_spans", [(0, 7, settings.fetch_spans_partition_bytes)])
