"""The worker's Kafka consumer transport: Faust's aiokafka driver with a short broker fetch wait.

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

from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as driver


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


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FetchWaitTransport(driver.Transport):
    """Faust's aiokafka transport whose worker consumer asks the broker to wait `fetch_max_wait_ms`."""

    Consumer = _Consumer

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        if not 0 < fetch_max_wait_ms <= 1500:
            raise ValueError(f"fetch_max_wait_ms must be in (0, 1500], got {fetch_max_wait_ms}")
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms


def install(app: Any, fetch_max_wait_ms: int) -> None:
    """Give `app` this transport; call before anything touches `app.transport` (topics, agents)."""
    if getattr(app, "_transport", None) is not None:
        raise RuntimeError("install the fetch transport before declaring topics")
    app.transport = FetchWaitTransport(app.conf.broker_consumer, app, fetch_max_wait_ms=fetch_max_wait_ms)
