"""Table changes reach the changelog once per key per write (each batch, or each flush), latest value."""

from __future__ import annotations

import asyncio
import json

import faust
import pytest
from burnguard.stream.accounting import WindowTotals
from burnguard.stream.changelog import TableChanges, encode
from burnguard.stream.settings import StreamSettings
from faust.serializers import codecs
from faust.types import TP


@pytest.fixture
def app() -> faust.App:
    return faust.App("changelog-test", store="memory://", web_enabled=False)


def test_each_changed_key_is_written_once_with_its_latest_value(app: faust.App) -> None:
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app)
    changes.partition = 2
    for spent in (1.0, 2.0, 3.5):
        changes.set(totals, "tenant|acme|0", WindowTotals(spent=spent, spans=1))

    assert totals.data["tenant|acme|0"].spent == 3.5  # the store changes at once
    records = changes.take_records()
    assert len(records) == 1
    topic, partition, key, value = records[0]
    assert (topic, partition, json.loads(key)) == ("changelog-test-totals-changelog", 2, "tenant|acme|0")
    assert WindowTotals.from_state(json.loads(value)).spent == 3.5
    assert changes.take_records() == []  # taken once


def test_a_key_goes_to_the_partition_of_the_event_that_changed_it(app: faust.App) -> None:
    states = app.Table("states", default=None, partitions=4)
    changes = TableChanges(app)
    for partition, key in ((0, "a"), (3, "b")):
        changes.partition = partition
        changes.set(states, key, {"action": "warn"})
    written = sorted((record[1], json.loads(record[2])) for record in changes.take_records())
    assert written == [(0, "a"), (3, "b")]


def test_a_deleted_key_becomes_a_tombstone(app: faust.App) -> None:
    states = app.Table("states", default=None, partitions=4)
    changes = TableChanges(app)
    changes.set(states, "a", {"action": "throttle"})
    changes.take_records()
    changes.delete(states, "a")
    changes.delete(states, "never-set")  # nothing to delete: no record
    assert "a" not in states.data
    assert [(json.loads(record[2]), record[3]) for record in changes.take_records()] == [("a", None)]


@pytest.mark.parametrize(
    "value",
    ["tenant|acme|1", "t\u00e9nant|\u6771\u4eac", {"action": "warn", "window_start_ns": 12}, None, 1.5],
)
def test_values_are_encoded_as_faust_decodes_them(value: object) -> None:
    assert codecs.loads("json", encode("json", value)) == codecs.loads("json", codecs.dumps("json", value))


def test_window_totals_are_encoded_through_their_state() -> None:
    totals = WindowTotals()
    totals.add(1, 7, 0.25, 2, 10, 20, 0, [1.0, 0.0, 0.0, 0.0])
    assert WindowTotals.from_state(json.loads(encode("json", totals))).to_state() == totals.to_state()


class CapturedRecords:
    """Stands in for the producer side: what each `send` handed over."""

    def __init__(self) -> None:
        self.sent: list[list[tuple]] = []
        self._pending: list[tuple] = []

    def add(self, *record: object) -> None:
        self._pending.append(record)

    async def send(self) -> None:
        self.sent.append(self._pending)
        self._pending = []


def test_the_cache_writes_each_key_once_across_batches_and_covers_only_processed_records(
    app: faust.App,
) -> None:
    totals = app.Table("totals", default=None, partitions=4)
    changes = TableChanges(app, flush_interval_s=3600)
    changes.records = CapturedRecords()  # type: ignore[assignment]
    tp = TP("burnguard.usage", 1)
    changes.partition = 1
    for offset, spent in enumerate((1.0, 2.0, 3.0)):  # three batches, the same key
        changes.set(totals, "tenant|acme|0", WindowTotals(spent=spent, spans=1))
        changes.processed(tp, offset)
    assert not changes.due()
    changes.processed(tp, 1)  # a re-reading moves nothing back

    covered = asyncio.run(changes.write())

    assert covered == {tp: 3}
    (sent,) = changes.records.sent
    assert len(sent) == 1 and WindowTotals.from_state(json.loads(sent[0][3])).spent == 3.0
    assert asyncio.run(changes.write()) == {tp: 3}  # nothing new: nothing more written
    assert changes.records.sent[-1] == []
    changes.forget([tp])
    assert asyncio.run(changes.write()) == {}


def test_with_no_flush_interval_every_batch_is_due(app: faust.App) -> None:
    assert TableChanges(app).due()
    assert TableChanges(app, flush_interval_s=0.0).due()


@pytest.mark.parametrize(("raw", "seconds"), [(None, 1.0), ("0", 0.0), ("250", 0.25), ("10000", 10.0)])
def test_the_flush_interval_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, seconds: float
) -> None:
    if raw is None:
        monkeypatch.delenv("BURNGUARD_CHANGELOG_FLUSH_MS", raising=False)
    else:
        monkeypatch.setenv("BURNGUARD_CHANGELOG_FLUSH_MS", raw)
    assert StreamSettings.from_env().changelog_flush.total_seconds() == seconds


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "10001", "soon"])
def test_a_bad_flush_interval_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("BURNGUARD_CHANGELOG_FLUSH_MS", raw)
    with pytest.raises(ValueError, match="BURNGUARD_CHANGELOG_FLUSH_MS"):
        StreamSettings.from_env()
