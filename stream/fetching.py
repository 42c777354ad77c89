"""The worker's Kafka consumer transport: Faust's aiokafka driver with a short broker fetch wait,
and each fetch handed to the agents in one task (`_Consumer._drain_messages`, which says why).

Why this exists: aiokafka keeps at most one fetch request in flight per broker, and a request
names only the partitions whose previous records were already handed to Faust. When a busy
partition's records wait in aiokafka's buffer for longer than its prefetch back-off (0.1 s, e.g.
while stage 1 works through a micro-batch), the next request carries only the idle partitions
(the `__assignor-__leader` topic, standby changelogs, a caught-up usage partition). With no data
for them the broker holds that request for `fetch_max_wait_ms`, which Faust hard-codes to
1,500 ms, and the busy partitions cannot be fetched again until it returns: the worker idles with
a backlog waiting in Kafka. A short wait bounds that stall; its price is one empty fetch round
trip per wait while the worker is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

import aiokafka
from faust.exceptions import ConsumerNotStarted
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver

#: Faust's fetcher loop lets the event loop run after this many messages.
YIELD_EVERY_MESSAGES = 100


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
        sizes = self.transport.topic_partition_bytes  # type: ignore[attr-defined]
        if sizes:
            size_fetches(self._consumer._fetcher, sizes)  # type: ignore[union-attr]


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


class _Consumer(driver.Consumer):
    def _reset_state(self) -> None:
        super()._reset_state()
        #: The partitions whose last fetch ended before their high watermark: more messages are in
        #: Kafka, the next fetch brings them (`behind`).
        self._behind: set[Any] = set()

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

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
        """Each fetched message to the conductor, as Faust's loop body does for one."""
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
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
            await self.callback(message)
            read_offset[tp] = offset


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
    app.transport = FetchWaitTransport(
        app.conf.broker_consumer,
        app,
        fetch_max_wait_ms=fetch_max_wait_ms,
        topic_partition_bytes=topic_partition_bytes,
    )
