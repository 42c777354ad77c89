"""Kafka records sent without Faust's topic layer, and table changes written once per flush interval.

Faust writes one changelog record for every `table[key] = value`, through
its topic layer and a `FutureMessage` per record: ~150 µs a record, which was
most of the worker's time (BENCHMARKS.md). The job changes the same window
key many times in a burst, and only the last value matters to a recovery. So
the agent updates the table's store at once, remembers the changed keys, and
after each batch of events writes each changed key once, straight to
aiokafka's producer.

Why this keeps exactly-once accounting: Faust acks the events of a
`take_events` batch only after the agent's loop body returns, and flushes the
producer before it commits any acked offset. The body ends by handing every
pending change to the producer, so a committed offset always has its changes
in the changelog. A crash in between replays the batch, and the marks inside
each value (`WindowTotals.applied`) recognise what the changelog already holds.

A record cache, as Kafka Streams keeps one: with a flush interval
(`BURNGUARD_CHANGELOG_FLUSH_MS`) the changes stay pending across batches and
each changed key is written once per interval, not once per batch. Faust
still acks every batch, so its commits are capped instead: `write` returns,
per partition, the offset below which every processed record's changes are
delivered to the changelog (the delivery future of each record batch
succeeded; the producer's flush, which Faust runs before a commit, does not
fail when the broker refused a batch), and `stream/takeover.py:InOrderReads` never lets
Faust commit past it. A crash then replays from a commit whose changes are
all in the changelog, as before. A record that fails (its batch refused, or
the hand-over failing half way through a write) stops the cache for good
(`ChangelogWriteFailed`): every later cover would include it.
Before a rebalance hands the partitions away the pending changes are written
and flushed, so the next owner recovers them (`BudgetJob._on_revoked`).

A write goes out as aiokafka record batches, one or more per changelog
(topic, partition), each key encoded straight into its batch: a write is
thousands of records to a few partitions, and `producer.send` per record (a
coroutine, a future and the accumulator's checks each) was most of its cost.
One delivery future per batch; a write counts as delivered when every batch
holding one of its records was. `stream/record_batches.py:RecordBatches` says how the partition's
order holds and why the agent does not wait for the producer's drains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import msgspec
from burnguard.stream.accounting import Ring, WindowTotals
from burnguard.stream.partitioner import native_part
from burnguard.stream.record_batches import RecordBatches, always
from faust.serializers import codecs
from faust.types import TP, AppT, CollectionT

logger = logging.getLogger(__name__)

#: The producer's record batch size at most (`producer_max_batch_size`): a burst of changelog
#: records or snapshots fills few batches, and the broker accepts 1 MiB by default.
MAX_BATCH_BYTES = 512 * 1024
#: Distinct keys pending at most before a write is due whatever the flush interval: a flood of
#: new keys within one interval is written in parts, so a write's records stay bounded.
MAX_PENDING_KEYS = 20_000
#: The changelog-flush timer's period when changes are written after every batch (no flush interval).
CHANGELOG_TICK_S = 1.0
#: The flush timer ticks this many times per flush interval: a tick that came just short of due
#: left a quiet stream's last changes pending for almost two intervals, and its commit after them.
FLUSH_TICKS_PER_INTERVAL = 4
#: ... but never more often than this.
FLUSH_TICK_MIN_S = 0.05


def flush_tick_s(flush_interval_s: float) -> float:
    """The changelog-flush timer's period: pending changes are written at most a quarter of the
    interval after they are due (`TableChanges.due`), not up to a whole interval later."""
    if not flush_interval_s:
        return CHANGELOG_TICK_S
    return max(flush_interval_s / FLUSH_TICKS_PER_INTERVAL, FLUSH_TICK_MIN_S)


#: Kafka record headers, as aiokafka takes them.
Headers = list[tuple[str, bytes]]
#: `dict.get`'s default for a key with no pending change (None is a pending deletion).
_ABSENT = object()


class PendingRecords:
    """Records for many (topic, partition)s, handed to aiokafka's producer together on `send`.

    Skips Faust's topic layer (a `FutureMessage`, a callback and a buffer
    per record). aiokafka's own `send` appends to the partition's open batch;
    its `send_batch` would wait for the previous batch of the partition to be
    drained, one produce round trip, which under load delayed every signal.

    Stage 1's usage records and dead letters (`BudgetJob.usage_records`), sent
    after each micro-batch; `stream/deliveries.py` follows their delivery.
    Signals go into the producer's open batches (`stream/signal_records.py`),
    table changes as record batches (`RecordBatches`), which need no `send`
    before the ack, as commits wait for `TableChanges.write` (module doc).
    """

    def __init__(self, app: AppT) -> None:
        self.app = app
        self._pending: list[tuple[str, int | None, bytes | None, bytes | None, Headers | None]] = []

    def add(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
    ) -> int:
        """Queue a record; its index in `send`'s futures. Partition None leaves it to the default
        partitioner (murmur2 of the key)."""
        self._pending.append((topic, partition, key, value, headers))
        return len(self._pending) - 1

    def drop(self) -> None:
        """Forget the pending records unsent (their batch is not acked: it is read again)."""
        self._pending = []

    async def send(self) -> list[asyncio.Future[Any]]:
        """Hand every pending record to the producer; each record's delivery future.

        Delivered by the producer's next flush at the latest, but a flush does
        not fail when the broker refused a record: only its future tells.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust runs
        return [
            await producer.send(topic, value, key=key, partition=partition, headers=headers)
            for topic, partition, key, value, headers in pending
        ]


def encode(serializer: str, value: Any) -> bytes:
    """`value` as Faust's codec `serializer` writes it; JSON without Faust's encoder, 2-5x faster.

    Faust's JSON encoder checks every value against a list of types it can
    convert; the tables here hold JSON types and objects with `__json__`.
    """
    if serializer == "json":
        return _json_encoder()(value)
    return codecs.dumps(serializer, value)


def _faust_json(value: Any) -> Any:
    if hasattr(value, "__json__"):
        return value.__json__()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: `json.dumps(value, default=_faust_json, separators=(",", ":"))` with its encoder built once:
#: `dumps` with arguments builds a `JSONEncoder` per call, twice per changelog record.
_encode_json = json.JSONEncoder(default=_faust_json, separators=(",", ":")).encode


#: msgspec's JSON encoder: ~0.6 us for a window's state where the stdlib's takes ~2.7 us (floats
#: written by the stdlib's `repr` are most of it). Not orjson: with orjson installed Faust's own
#: JSON codec switches to it, for decoding too (NaN refused, ints past 64 bits read as floats),
#: and it writes a dataclass such as `WindowTotals` as an object of its fields.
_encode_plain = msgspec.json.Encoder().encode


def _json_value(value: Any) -> bytes:
    """A changelog key or value as JSON that `json.loads` reads back as it read the stdlib
    encoder's: the reference of the native `ChangelogJson` (`_json_encoder`).

    A `WindowTotals` (most changelog records: ~1 per changed window per flush) by `_totals_json`.
    A signal state (~0.1 per span at realistic keys, one per signal) is a flat object of plain text
    and ints: msgspec (`_plain_flat`). Keys (text) and other values (clocks, context growth): the
    stdlib encoder, as before.
    """
    if type(value) is not WindowTotals:
        if type(value) is dict and _plain_flat(value):  # a signal state: ~0.2 us, not ~1.5
            return _encode_plain(value)
        return _encode_json(value).encode()
    return _totals_json(value)


def _json_encoder() -> Callable[[Any], bytes]:
    """The JSON encoder of changelog keys and values in use, chosen once (`native_part`): the
    native `ChangelogJson` where the native module is in use (a plain key, a signal state, most
    `WindowTotals`; the rest handed to `_json_value`), else `_json_value`. The same bytes."""
    return native_part("ChangelogJson", _new_changelog_json) or _json_value


def _new_changelog_json(native: Any) -> Callable[[Any], bytes] | None:
    """The `encode` of a `ChangelogJson` made by the native module's class `native` (contracts/
    native/src/state.rs), or None if it does not fit `WindowTotals` (an older build)."""
    try:
        return native(_json_value, WindowTotals, Ring).encode
    except (AttributeError, TypeError, ValueError) as exc:
        logger.warning("native changelog JSON not used (the Python encoder is): %s; rebuild: make venv", exc)
        return None


def _totals_json(value: WindowTotals) -> bytes:
    """A `WindowTotals`' changelog value, the reference (`ChangelogJson` writes the same bytes ~4x
    faster, without building the state's lists).

    msgspec writes the state: it holds only what JSON decodes to and what `add` computes (floats,
    ints, lists, None and the str-keyed marks), which msgspec and the stdlib write as the same
    value, floats bit for bit. Except a NaN or an infinity: msgspec writes null, so an output with
    more nulls than the state has Nones at its top level (the only place `to_state` puts them) is
    written by the stdlib, as are marks with a key that is not a str (msgspec writes a float key as
    `1e16`, the stdlib `1e+16`) and whatever msgspec refuses (a lone surrogate).
    """
    state = value.to_state()
    try:
        "".join(value.applied)  # TypeError unless every key is a str
        encoded = _encode_plain(state)
    except (TypeError, ValueError):  # the stdlib's output, or its error
        return _encode_json(state).encode()
    if encoded.count(b"null") != state.count(None):  # a non-finite float (or "null" in a text)
        return _encode_json(state).encode()
    return encoded


def _plain_text(text: str) -> bool:
    """Whether both encoders write `text` alike: printable ASCII with nothing to escape (the
    stdlib escapes non-ASCII as `\\uXXXX`, msgspec writes UTF-8; their escapes of control
    characters need not match)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _plain_flat(value: dict[Any, Any]) -> bool:
    """Whether `value` is a flat object msgspec writes as the stdlib does: plain text keys (see
    `_plain_text`), each value plain text or an int (both write any int in its digits). Not a
    bool, float or None, which are not worth the check: a signal state, `{"action",
    "window_start_ns"[, "retire_at_ns"]}`, holds none."""
    for key, item in value.items():
        if type(key) is not str or not _plain_text(key):
            return False
        if type(item) is not int and (type(item) is not str or not _plain_text(item)):
            return False
    return True


def _encoder(serializer: str) -> Callable[[Any], bytes]:
    """`encode` for one serializer, the choice made once per table rather than per record."""
    if serializer == "json":
        return _json_encoder()
    return lambda value: codecs.dumps(serializer, value)


def _encoded(
    values: dict[Any, Any], encode_key: Callable[[Any], bytes], encode_value: Callable[[Any], bytes]
) -> Iterator[tuple[bytes, bytes | None]]:
    """(key, value) records of `values`, encoded one at a time; a None value is a tombstone."""
    for key, value in values.items():
        yield encode_key(key), None if value is None else encode_value(value)


def plain_store(table: Any) -> Any:
    """The dict under a table's in-memory store (`store="memory://"`), for reads and writes on the hot path.

    Faust's store (`faust.stores.memory.Store`) keeps its entries in a plain dict, `.data`, and
    wraps it in Python-level mapping methods: a `get` through them was three Python calls. Any
    other store is used as it is.
    """
    store = table.data
    plain = getattr(store, "data", None)
    return plain if isinstance(plain, dict) else store


class TableChanges:
    """Changes to Faust tables, applied to their stores at once and to their changelogs in batches.

    `partition` is the partition of the event being processed: a table is
    co-partitioned with the topic it is changed from, so a key's changelog
    records must go where the worker that owns that partition will recover
    them from.

    `flush_interval_s` is how long changes may stay pending (0: written after
    every batch); see the module doc for what makes that safe.
    """

    def __init__(self, app: AppT, flush_interval_s: float = 0.0) -> None:
        self.batches = RecordBatches(app)
        self.partition = 0
        self.flush_interval_s = flush_interval_s
        self._changed: dict[tuple[CollectionT, int], dict[Any, Any]] = defaultdict(dict)
        #: id(table) -> (table, partition, its store, its pending changes there): `_target`
        self._targets: dict[int, tuple[CollectionT, int, Any, dict[Any, Any]]] = {}
        #: per source partition, the offset after the last record whose processing has finished
        self._processed: dict[TP, int] = {}
        #: how many distinct keys are in `_changed`
        self._pending_keys = 0
        self._last_write = time.monotonic()
        self._writing: asyncio.Lock | None = None
        #: each write's delivery futures and cover, oldest first, until all its records are delivered
        self._sent: deque[tuple[list[asyncio.Future[Any]], dict[TP, int]]] = deque()
        #: the cover of the writes delivered so far
        self._delivered: dict[TP, int] = {}
        self._failed: BaseException | None = None

    def set(self, table: CollectionT, key: str, value: Any) -> None:
        """Change a key; its record moves behind the batch's other changes (see `stream/eviction.py`)."""
        known = self._targets.get(id(table))
        if known is None or known[0] is not table or known[1] != self.partition:
            known = self._target(table)
        known[2][key] = value
        changed = known[3]
        if changed.pop(key, _ABSENT) is _ABSENT:
            self._pending_keys += 1
        changed[key] = value

    def target(self, table: CollectionT) -> tuple[Any, dict[Any, Any]]:
        """(the table's store, its pending changes of the current partition): what `set` writes, for
        a caller that sets many keys as `set` does without a call per key (stage 2's native rows,
        `stream/app.py`), then counts the keys it newly made pending with `added`. Valid until the
        changes are taken: ask again after any await."""
        known = self._targets.get(id(table))
        if known is None or known[0] is not table or known[1] != self.partition:
            known = self._target(table)
        return known[2], known[3]

    def added(self, keys: int) -> None:
        """`keys` keys were newly made pending through `target`'s dict."""
        self._pending_keys += keys

    def delete(self, table: CollectionT, key: str) -> None:
        if table.data.pop(key, None) is not None:  # rare (evictions): no pending entry made for nothing
            changed = self._target(table)[3]
            if changed.get(key, _ABSENT) is _ABSENT:
                self._pending_keys += 1
            changed[key] = None

    def _target(self, table: CollectionT) -> tuple[CollectionT, int, Any, dict[Any, Any]]:
        """(table, the current partition, the table's store as `plain_store` gives it, its pending
        changes of the partition), remembered for `set` until the changes are taken.

        Stage 2 changes a key per delta row: `table.data[key]` and `_changed[(table, partition)]`
        were three Python calls (Faust's `data` property, its store's `__setitem__`, the table's
        `__hash__`) and a tuple each time.
        """
        known = (table, self.partition, plain_store(table), self._changed[(table, self.partition)])
        self._targets[id(table)] = known
        return known

    def take_records(self) -> list[tuple[str, int, bytes, bytes | None]]:
        """(changelog topic, partition, key, value) of each changed key's latest value, once: what
        `write` would hand over, as a list.

        A deleted key's value is None: a tombstone, as Faust writes one.
        """
        return [
            (topic, partition, *record) for topic, partition, records in self._take() for record in records
        ]

    def _take(self) -> list[tuple[str, int, Iterator[tuple[bytes, bytes | None]]]]:
        """Per changelog (topic, partition), its changed keys' (key, value), each encoded when the
        iterator reaches it (straight into its batch, no list in between), in change order."""
        changed, self._changed = self._changed, defaultdict(dict)
        self._targets.clear()  # their pending changes are taken
        self._pending_keys = 0
        taken = []
        for (table, partition), values in changed.items():
            topic = table.changelog_topic.get_topic_name()
            encode_key = _encoder(table.key_serializer or table.app.conf.key_serializer)
            encode_value = _encoder(table.value_serializer or table.app.conf.value_serializer)
            taken.append((topic, partition, _encoded(values, encode_key, encode_value)))
        return taken

    def _hand_over(self) -> list[asyncio.Future[None]]:
        """Each changed key's record queued in its changelog partition's batches; their delivery futures."""
        sent = []
        for topic, partition, records in self._take():
            sent += self.batches.append(topic, partition, records)
        return sent

    def pending(self) -> bool:
        """Whether some change is in the stores but not yet handed to the producer."""
        return any(self._changed.values())

    def processed(self, tp: TP, offset: int) -> None:
        """The record at `offset` of `tp` is fully processed: its changes are all pending or written."""
        if offset >= self._processed.get(tp, 0):
            self._processed[tp] = offset + 1

    def due(self) -> bool:
        """Whether the flush interval has passed since the last write, or too many keys are pending."""
        if self._pending_keys >= MAX_PENDING_KEYS:
            return True
        return time.monotonic() - self._last_write >= self.flush_interval_s

    async def write(self, may_write: Callable[[], Awaitable[bool]] = always) -> dict[TP, int] | None:
        """Hand the changed keys' records to the producer in record batches; per partition, the offset
        now delivered.

        Returns what the writes whose records have all been delivered so far
        cover (`delivered`, without waiting): every record below the returned
        offset of its partition has its changes in the changelog. One write
        at a time: two interleaved ones could put a key's older value after
        its newer one. Raises `ChangelogWriteFailed` once a record failed
        (a refused batch: all its records).

        `may_write` (the stall guard) is asked after the write's waits (the
        lock, room for its batches), right before its records are taken: a
        stall during a wait would go unseen by a check before it. None when
        it says no: nothing is taken, the changes stay pending.
        """
        if self._writing is None:
            self._writing = asyncio.Lock()
        async with self._writing:
            self._check()
            await self.batches.room()
            if not await may_write():
                return None
            self.batches.may_hand_over = may_write
            covered = dict(self._processed)  # taken with the records: nothing runs in between
            self._last_write = time.monotonic()
            try:
                sent = self._hand_over()
            except Exception as exc:  # the rest of the write is lost: never cover it
                self._failed = exc
                raise ChangelogWriteFailed(f"a changelog write failed half way: {exc!r}") from exc
            self._sent.append((sent, covered))
            return self._release()

    async def delivered(self) -> dict[TP, int]:
        """Wait for every write so far to be delivered; what they cover.

        After a producer flush at once, but for batches still queued behind
        a partition's earlier one (`RecordBatches`): a round trip each.
        """
        for sent, _ in list(self._sent):
            if sent:
                await asyncio.wait(sent)
        return self._release()

    def undelivered(self) -> bool:
        """Whether some write handed over is not delivered yet (its cover not yet counted)."""
        return bool(self._sent)

    def _release(self) -> dict[TP, int]:
        """The cover of the writes delivered so far, taken in write order (a later write's cover
        includes the earlier writes' records)."""
        self._check()
        while self._sent and all(future.done() for future in self._sent[0][0]):
            sent, covered = self._sent.popleft()
            for future in sent:
                if future.cancelled():
                    self._failed = asyncio.CancelledError()
                elif future.exception() is not None:
                    self._failed = future.exception()
            self._check()
            self._delivered = covered
        return dict(self._delivered)

    def _check(self) -> None:
        """Refuse to go on after a failed record: the store holds a change its changelog lacks,
        and every later cover includes it. Only a restart (recovery, then a replay) repairs it."""
        if self._failed is not None:
            raise ChangelogWriteFailed(f"a changelog record was not written: {self._failed!r}")

    def forget(self, tps: Iterable[TP]) -> None:
        """Drop what is kept for partitions this worker no longer reads."""
        for tp in tps:
            self._processed.pop(tp, None)
            self._delivered.pop(tp, None)
            for _, covered in self._sent:
                covered.pop(tp, None)


class ChangelogWriteFailed(RuntimeError):
    """A table change did not reach its changelog; the worker must stop without committing past it."""
