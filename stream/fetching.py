"""The worker's Kafka consumer transport: Faust's aiokafka driver with a short broker fetch wait,
and each fetch handed to the agents in one task (`_Consumer._drain_messages`, which says why),
stage 1's messages straight into its channel (`DirectDelivery`, which says why).

Why this exists: aiokafka keeps at most one fetch request in flight per broker, and a request
names only the partitions whose previous records were already handed to Faust. When a busy
partition's records wait in aiokafka's buffer for longer than its prefetch back-off (0.1 s, e.g.
while stage 1 works through a micro-batch), the next request carries only the idle partitions
(the `__assignor-__leader` topic, standby changelogs, a caught-up usage partition). With no data
for them the broker holds that request for `fetch_max_wait_ms`, which Faust hard-codes to
1,500 ms, and the busy partitions cannot be fetched again until it returns: the worker idles with
a backlog waiting in Kafka. A short wait bounds that stall; its price is one empty fetch round
trip per wait while such records are buffered. With none buffered a fetch may wait longer
(`wait_longer_when_nothing_is_held`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import aiokafka
import aiokafka.conn
from burnguard.stream import frame_reader, record_crcs
from faust.exceptions import ConsumerNotStarted
from faust.serializers.schemas import Schema
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

#: Faust's fetcher loop lets the event loop run after this many messages.
YIELD_EVERY_MESSAGES = 100
#: aiokafka's connections buffer this much of a response before they pause reading (its own: 64 KiB).
#: A response is read whole before it is handled (`readexactly(size)`), so the limit bounds no memory
#: that is not held anyway; what it sets is how often reading pauses and resumes while a response
#: arrives: at 64 KiB a fetch of several MiB paused the socket after every 256 KiB read (two epoll
#: registrations, a select and a task step each), ~40% of the consumer thread's CPU (BENCHMARKS.md,
#: "Faust's per-message delivery").
READER_LIMIT_BYTES = 16 << 20
#: How long the broker may hold a fetch that names every partition with records to come
#: (`wait_longer_when_nothing_is_held`); the short wait (`fetch_max_wait_ms`) otherwise.
IDLE_FETCH_WAIT_MS = 500


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, creating its aiokafka consumer with the transport's fetch wait."""

    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # set below, the wait would be ignored in silence
            raise RuntimeError("aiokafka consumer without _fetch_max_wait_ms: update stream/fetching.py")
        # Faust passes fetch_max_wait_ms=1500 with no setting to change it; aiokafka reads this
        # attribute when `start()` creates its fetcher, which happens after this returns.
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        fetcher = self._consumer._fetcher  # type: ignore[union-attr]
        sizes = self.transport.topic_partition_bytes  # type: ignore[attr-defined]
        if sizes:
            size_fetches(fetcher, sizes)
        faust_consumer = self.consumer
        app = faust_consumer.app
        wait_longer_when_nothing_is_held(
            fetcher,
            lambda: faust_consumer._paused_partitions,
            max(IDLE_FETCH_WAIT_MS, self.transport.fetch_max_wait_ms),  # type: ignore[attr-defined]
            rebalancing=lambda: bool(app.rebalancing),
        )


def size_fetches(fetcher: Any, sizes: Mapping[str, int]) -> None:
    """Make `fetcher` ask for `sizes[topic]` bytes per partition of those topics, its own size for the rest.

    aiokafka sizes every partition of a fetch alike. A fetch of `otlp_spans` at 1 MiB per partition
    holds ~13 messages of 150 spans per partition, a few percent of stage 1's micro-batch, and the
    next fetch comes a round trip of the event loop later: so its partitions get more, the other
    topics' (changelogs read once at recovery, the usage topic's small records) keep the consumer's size.
    """
    actions = getattr(fetcher, "_get_actions_per_node", None)
    if actions is None:  # the sizes would be ignored in silence
        raise RuntimeError("aiokafka fetcher without _get_actions_per_node: update stream/fetching.py")

    def sized(assignment: Any) -> Any:
        planned = actions(assignment)
        for _node, request in planned[0]:
            request._topics = [
                (topic, [(partition, offset, sizes.get(topic, size)) for partition, offset, size in parts])
                for topic, parts in request._topics
            ]
        return planned

    fetcher._get_actions_per_node = sized


def wait_longer_when_nothing_is_held(
    fetcher: Any,
    paused: Callable[[], Collection[Any]],
    wait_ms: int,
    rebalancing: Callable[[], bool] = lambda: False,
) -> None:
    """Let the broker hold `fetcher`'s requests `wait_ms` when they name every partition that may be
    handed over next: none waits in aiokafka's buffer for the worker to take it.

    The short fetch wait bounds one stall: a request for the idle partitions in flight while a busy
    partition's buffered records are taken, which is fetched again only once that request is back
    (the module's docstring). With nothing buffered that Faust will take (its paused partitions'
    records, e.g. its tables' changelogs after recovery, are never taken) every partition that can
    have news is named in the request, and the broker answers it as soon as any of them has a
    record: a longer wait delays nothing that comes, and an idle or caught-up worker makes one empty
    fetch per `wait_ms` instead of one per short wait, each a round trip through the consumer
    thread (~1 ms of its CPU, most of it the send and the epoll wake-up; BENCHMARKS.md, "The
    consumer thread's empty fetches"). What it can delay, by `wait_ms` at most: a partition seeked
    or reset while the request waits, and one Faust resumes after its buffered records were taken.
    `paused()` is Faust's set, read by membership only (its `TP`s equal aiokafka's as tuples).

    Not while `rebalancing()` (Faust's `app.rebalancing`: from the revoke until recovery is done and
    the agents' partitions are resumed and sought to their commits): Faust pauses those partitions
    for its recovery, so a request then names only the changelogs, and it is in flight when the
    partitions are resumed, sought and rewound (`takeover.RewindAfterRecovery`, whose look-up of the
    log start queues behind it on the broker's connection). Held long, it made every catch-up start
    ~0.45 s late, the main thread idle (BENCHMARKS.md, "Where the main thread waits").
    """
    actions = getattr(fetcher, "_get_actions_per_node", None)
    if actions is None or not hasattr(fetcher, "_records"):  # the wait would stay short in silence
        raise RuntimeError(
            "aiokafka fetcher without _get_actions_per_node or _records: update stream/fetching.py"
        )

    def planned(assignment: Any) -> Any:
        plan = actions(assignment)
        if plan[0] and not rebalancing() and not holds_records_to_take(fetcher._records, paused()):
            for _node, request in plan[0]:
                request._max_wait_ms = wait_ms
        return plan

    fetcher._get_actions_per_node = planned


def holds_records_to_take(buffered: Collection[Any], paused: Collection[Any]) -> bool:
    """Whether aiokafka's buffer holds a partition's fetch that Faust will take (not one it paused)."""
    return any(tp not in paused for tp in buffered)


class _Consumer(driver.Consumer):
    def _reset_state(self) -> None:
        super()._reset_state()
        #: The partitions whose last fetch ended before their high watermark: more messages are in
        #: Kafka, the next fetch brings them (`behind`).
        self._behind: set[Any] = set()

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        """Faust's `Consumer.getmany` (round-robin over the fetched partitions, stopping at a flow
        suspension or a new generation, only active or buffered partitions), asking for a partition's
        high watermark once per fetch: Faust asked the consumer thread's aiokafka for it and told the
        monitor per record, ~2 us a message of the main thread for the same figure."""
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
            try:
                await self.perform_seek()
            except Exception as ex:
                self.log.warning(f"exception performing seek when flow not active {ex}")
            return
        to_message = self._to_message
        app = self.app
        tracked: set[Any] = set()
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active:
                break
            if app.consumer_generation_id != generation_id:
                self.log.dev(
                    "Generation id changed from %r to %r. Cancelling getmany.",
                    generation_id,
                    app.consumer_generation_id,
                )
                break
            if active_partitions is None or tp in active_partitions or tp in self._buffered_partitions:
                if tp not in tracked:
                    tracked.add(tp)
                    app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                yield tp, to_message(tp, record)

    def behind(self, topics: Collection[str]) -> bool:
        """Whether an assigned partition of `topics` holds more messages than were handed over.

        aiokafka buffers one fetch per partition and asks for the next only once the fetch before
        was handed to Faust, a round trip later (tens of ms under load, stage 1's body and stage 2
        sharing the event loop): an agent whose queue is empty while this holds gets more soon.
        """
        behind = self._behind
        if not behind:
            return False
        try:
            assigned = self.assignment()
        except ConsumerNotStarted:
            return False
        return any(tp.topic in topics and tp in assigned for tp in behind)

    def _note_behind(self, messages: list[tuple[Any, Any]]) -> None:
        """Per partition in a fetch: is its last message before the high watermark the fetch came
        with (a fetch cut at the partition's fetch size or at a log segment's end)?"""
        last = {tp: message.offset for tp, message in messages}
        for tp, offset in last.items():
            try:
                end = self.highwater(tp)
            except AssertionError:  # aiokafka's: no longer assigned (a rebalance meanwhile)
                end = None
            if end is not None and end > offset + 1:
                self._behind.add(tp)
            else:
                self._behind.discard(tp)

    async def _drain_messages(self, fetcher: Any) -> None:
        """Faust's fetcher loop, handing each fetch's messages to the agents in one task.

        Faust delivers every message through `wait_first(callback(message), suspend_flow)`:
        four tasks and at least two turns of the event loop per message, and each turn also runs
        whatever slice of stage 1 or stage 2 is ready. Under a backlog the agents' channels were
        nearly empty when stage 1's 20 ms window ended (a few dozen small messages per micro-batch,
        not 200). Here one task delivers a whole fetch in order, with the same read offsets, gaps and
        commits per message; a rebalance (`suspend_flow`) still cancels it between messages.
        """
        getmany = self.getmany
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched = getmany(timeout=1.0)
                await self.sleep(0)  # as Faust's: a loop of empty fetches still lets the loop run
                if not self.should_stop:
                    messages = [pair async for pair in fetched]
                    if messages:
                        self._note_behind(messages)
                        await self.wait_first(self._deliver(messages), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _deliver(self, messages: list[tuple[Any, Any]]) -> None:
        """Each fetched message to its agent's channel, as Faust's loop body does for one: straight
        into the queue where `DirectDelivery` may, else through the conductor's callback."""
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        put = self._direct_delivery().put
        callback = self.callback
        for index, (tp, message) in enumerate(messages):
            if index and not index % YIELD_EVERY_MESSAGES:
                await asyncio.sleep(0)
            offset = message.offset
            last_read = read_offset.get(tp)
            if last_read is not None and offset < last_read:
                continue  # read already (Faust logs it at dev level and drops it)
            if last_read and offset - last_read > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, last_read + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            if not put(tp, message):
                await callback(message)
            read_offset[tp] = offset

    def _direct_delivery(self) -> DirectDelivery:
        direct = getattr(self, "_direct", None)
        if direct is None:
            direct = self._direct = DirectDelivery(self.app)
        return direct


class DirectDelivery:
    """A fetched message put into its agent's channel queue without the conductor's callback, where
    that callback could only do the same.

    Faust's conductor hands each message to `on_message`, which takes a lock to look up the
    partition's handler, awaits the flow control and the producer buffer, decodes key and value
    through the topic's schema, asks the settings for the `Event` class and puts the event into each
    channel of the partition: ~20 us of the main thread per message, a third of what it cost to get
    a message to stage 1 and ack it (BENCHMARKS.md, "Faust's per-message delivery"). For a
    partition read by one channel whose keys and values are raw bytes (`otlp_spans`: stage 1) the
    decode gives back the bytes, so the event is made here with the same fields, referenced once,
    and put with the same pressure callbacks (a full queue pauses the partition's fetches).

    Whenever the conductor would wait or do more, `put` declines and the caller takes the conductor's
    path: its handlers being rebuilt (a resubscription holds its lock), the flow suspended (a
    rebalance), the producer buffer over its bound, the queue full, or the partition read by another
    channel, none, or one that decodes. So a message goes either way in order, never both.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.conductor = app.topics
        self.flow_control = app.flow_control
        self.buffer = app.producer.buffer
        #: Faust's `ProducerBuffer.size` asks the settings on every call; with a threaded producer
        #: it counts another queue, which this does not look at: then nothing goes this way
        self.threaded_producer = bool(app.conf.producer_threaded)
        self.event_type = app.conf.Event
        #: per channel the conductor delivered to, whether it takes raw bytes (`takes_raw_bytes`)
        self._raw: dict[Any, bool] = {}
        #: per partition, the callbacks the conductor passes a queue for it (built once, as its are)
        self._pressure: dict[Any, tuple[Callable[[], None], Callable[[], None]]] = {}

    def put(self, tp: Any, message: Any) -> bool:
        """Put `message`'s event into its partition's only channel, as the conductor would; False
        (nothing done) where the conductor's callback is to take it."""
        channel = self._raw_channel(tp)
        if channel is None or not self._flowing():
            return False
        queue = channel.queue
        if queue.full():
            return False
        message.incref(1)
        event = self.event_type(self.app, message.key, message.value, message.headers, message)
        high, drop = self._pressure.get(tp) or self._pressure_callbacks(tp)
        queue.put_nowait_enhanced(event, on_pressure_high=high, on_pressure_drop=drop)
        return True

    def _raw_channel(self, tp: Any) -> Any:
        """The partition's one channel if it takes raw bytes as they come, else None."""
        conductor = self.conductor
        if conductor._tp_to_callback_lock.locked():
            return None
        channels = conductor._tp_index.get(tp)
        if channels is None or len(channels) != 1:
            return None
        (channel,) = channels
        raw = self._raw.get(channel)
        if raw is None:
            raw = self._raw[channel] = takes_raw_bytes(channel)
        return channel if raw else None

    def _flowing(self) -> bool:
        """Whether the conductor's callback would go on at once (flow active, producer buffer ebbed)."""
        if not self.flow_control.is_active() or self.threaded_producer:
            return False
        buffer = self.buffer
        return len(buffer.pending._queue) <= buffer.max_messages

    def _pressure_callbacks(self, fetched: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        """The conductor's `on_pressure_high` / `on_pressure_drop` for a partition, made once.

        They are given Faust's `TP`, as the conductor's (its index's keys): a fetch names its
        partitions with aiokafka's `TopicPartition`, equal but not a `TP`, and Faust's consumer
        asserts its active partitions are `TP`s once a paused one is resumed.
        """
        tp = TP(fetched.topic, fetched.partition)
        on_topic_buffer_full = self.app.sensors.on_topic_buffer_full
        consumer = self.app.consumer

        def on_pressure_high() -> None:
            on_topic_buffer_full(tp)
            consumer.on_buffer_full(tp)

        def on_pressure_drop() -> None:
            consumer.on_buffer_drop(tp)

        callbacks = self._pressure[fetched] = (on_pressure_high, on_pressure_drop)
        return callbacks


def takes_raw_bytes(channel: Any) -> bool:
    """Whether a topic channel decodes a message into its key and value bytes as they are: Faust's
    own schema over raw bytes (its `loads_key` / `loads_value` then give back what they are given)."""
    schema = channel.schema
    return (
        type(schema) is Schema
        and schema.key_type is bytes
        and schema.value_type is bytes
        and schema.key_serializer == "raw"
        and schema.value_serializer == "raw"
    )


def read_responses_whole() -> None:
    """Let every aiokafka connection of this process buffer `READER_LIMIT_BYTES` before it pauses, and
    read each response with one copy of its bytes (`stream/frame_reader.py`)."""
    if not isinstance(getattr(aiokafka.conn, "READER_LIMIT", None), int):  # the limit would be ignored
        raise RuntimeError("aiokafka without conn.READER_LIMIT: update stream/fetching.py")
    aiokafka.conn.READER_LIMIT = max(aiokafka.conn.READER_LIMIT, READER_LIMIT_BYTES)
    frame_reader.install()


class FetchWaitTransport(driver.Transport):
    """Faust's aiokafka transport whose worker consumer asks the broker to wait `fetch_max_wait_ms`."""

    Consumer = _Consumer

    def __init__(
        self,
        *args: Any,
        fetch_max_wait_ms: int,
        topic_partition_bytes: Mapping[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0 < fetch_max_wait_ms <= 1500:
            raise ValueError(f"fetch_max_wait_ms must be in (0, 1500], got {fetch_max_wait_ms}")
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        #: bytes per partition per fetch of these topics, instead of `consumer_max_fetch_size`
        self.topic_partition_bytes = dict(topic_partition_bytes or {})


def install(app: Any, fetch_max_wait_ms: int, topic_partition_bytes: Mapping[str, int] | None = None) -> None:
    """Give `app` this transport; call before anything touches `app.transport` (topics, agents)."""
    if getattr(app, "_transport", None) is not None:
        raise RuntimeError("install the fetch transport before declaring topics")
    read_responses_whole()
    record_crcs.install()
    app.transport = FetchWaitTransport(
        app.conf.broker_consumer,
        app,
        fetch_max_wait_ms=fetch_max_wait_ms,
        topic_partition_bytes=topic_partition_bytes,
    )
