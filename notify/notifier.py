"""`burnguard notify`: a consumer of `burnguard.signals` that tells people when a budget changes state.

A change is a signal whose action differs from the last one seen for its key
(`scope:key@budget`); the periodic refreshes of an unchanged state are not
news. Each change goes to the destinations its routes name.

Delivered once, across retries and restarts:

- The consumer group's offset of a record is committed only after the record
  is done: delivered, or dead-lettered, to every destination.
- The last action of each key is kept in a compacted state topic
  (`burnguard.notify.state`, key `<group>|<signal key>`), written after the
  delivery and before the commit. A notifier restarted after the state write
  but before the commit reads the change again, sees it is not one any more,
  and sends nothing. One restarted after a delivery but before the state
  write sends it again with the same `webhook-id`, for the receiver to drop.
- A destination that is down or answers 408/425/429/5xx is retried with
  exponential backoff (each retry logged), holding back the later changes of
  that partition so none is lost or reordered; the consumer keeps polling
  (partitions paused) meanwhile, so it stays in its group.
- One that answers another 4xx is not retried: the event goes to the
  dead-letter topic (`burnguard.notify.deadletter`) with `burnguard.error`,
  `burnguard.http_status` and `burnguard.destination` headers, and the next
  events go on.

The first start of a group does not announce the states that already exist:
records below the end offsets at that moment only set the known state
(`--from-beginning` announces them too).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import httpx
from burnguard.contracts.acls import NOTIFY_GROUP
from burnguard.contracts.compacted_topics import read_compacted_topic
from burnguard.contracts.env_numbers import env_number
from burnguard.contracts.notify import NotifyConfig
from burnguard.contracts.signals import Signal
from burnguard.contracts.topics import KafkaSettings, Topics, TopicSpec, ensure_topics
from burnguard.notify.delivery import Outcome, Target, send
from burnguard.notify.messages import event_id, slack_payload, webhook_payload
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger("burnguard.notify")

DEFAULT_GROUP = NOTIFY_GROUP
ERROR_HEADER = "burnguard.error"
STATUS_HEADER = "burnguard.http_status"
DESTINATION_HEADER = "burnguard.destination"


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """Where the notifier keeps its state and dead letters, and how patiently it retries."""

    group: str = DEFAULT_GROUP
    state_topic: str = Topics().notify_state
    deadletter_topic: str = Topics().notify_deadletter
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    http_timeout_s: float = 10.0
    from_beginning: bool = False
    #: How soon a notifier that died without leaving loses its partitions (None: kafka-python's 45 s).
    session_timeout_s: float | None = None

    @classmethod
    def from_env(cls, **overrides: object) -> NotifySettings:
        defaults = cls()
        topics = Topics.from_env()
        values = {
            "state_topic": topics.notify_state,
            "deadletter_topic": topics.notify_deadletter,
            "backoff_s": env_number("BURNGUARD_NOTIFY_BACKOFF_S", defaults.backoff_s),
            "max_backoff_s": env_number("BURNGUARD_NOTIFY_MAX_BACKOFF_S", defaults.max_backoff_s),
            "session_timeout_s": env_number("BURNGUARD_NOTIFY_SESSION_TIMEOUT_S", 0.0, zero_ok=True) or None,
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)  # type: ignore[arg-type]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Nothing to flush: every finished record is committed as soon as it is finished."""

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # kafka-python calls this on its IO thread, where the consumer must not block: hand it on
        self.notifier.assigned_pending = set(assigned)


class Notifier:
    """Follows the signal topic and delivers each state change once (see the module doc)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        config: NotifyConfig,
        targets: dict[str, Target],
        settings: NotifySettings | None = None,
        topics: Topics | None = None,
    ) -> None:
        self.kafka = kafka
        self.config = config
        self.targets = targets
        self.settings = settings or NotifySettings()
        self.topics = topics or Topics.from_env()
        self.stop = threading.Event()
        self.known: dict[str, str] = {}  # signal key -> last action handled
        self.silent_until: dict[TopicPartition, int] = {}
        self.assigned_pending: set[TopicPartition] | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.http = httpx.Client(timeout=self.settings.http_timeout_s, follow_redirects=False)

    # --- life cycle -------------------------------------------------------------------
    def run(self) -> None:
        """Consume until `stop` is set."""
        s = self.settings
        ensure_topics(
            self.kafka, [TopicSpec(s.state_topic, 1, compacted=True), TopicSpec(s.deadletter_topic, 1)]
        )
        config = self.kafka.kafka_python_config()
        self.producer = KafkaProducer(**config, acks="all")
        session = {}
        if s.session_timeout_s:  # heartbeats at a third of it, as the sink's --session-timeout-ms
            ms = int(s.session_timeout_s * 1000)
            session = {"session_timeout_ms": ms, "heartbeat_interval_ms": max(ms // 3, 100)}
        self.consumer = KafkaConsumer(
            **config, group_id=s.group, enable_auto_commit=False, auto_offset_reset="earliest", **session
        )
        self.consumer.subscribe([self.topics.signals], listener=_Rebalance(self))
        log.info("notify: group %s reading %s", s.group, self.topics.signals)
        try:
            while not self.stop.is_set():
                self._poll_once()
        finally:
            self.consumer.close()
            self.producer.close()
            self.http.close()

    def _take_assignment(self) -> None:
        assigned, self.assigned_pending = self.assigned_pending, None
        if assigned is not None:
            self.on_assigned(assigned)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Reload the known states (another member may have moved on) and mark a first start's backlog."""
        assert self.consumer is not None
        self.known = self._load_state()
        self.silent_until = {}
        if assigned and not self.settings.from_beginning:
            ends = self.consumer.end_offsets(list(assigned))
            for tp in assigned:
                if self.consumer.committed(tp) is None:
                    self.silent_until[tp] = ends.get(tp, 0)
        partitions = sorted(tp.partition for tp in assigned)
        log.info(
            "notify: following %s partitions %s (%d known states)",
            self.topics.signals,
            partitions,
            len(self.known),
        )

    def _poll_once(self) -> None:
        assert self.consumer is not None
        batches = self.consumer.poll(timeout_ms=500)
        self._take_assignment()
        for tp, records in batches.items():
            done: int | None = None
            for record in records:
                if tp not in self.consumer.assignment() or self.stop.is_set():
                    break
                finished, changed = self._handle(tp, record)
                if not finished:
                    break
                done = record.offset + 1
                if changed:
                    self._commit(tp, done)
                    done = None
            if done is not None:
                self._commit(tp, done)

    def _commit(self, tp: TopicPartition, offset: int) -> None:
        """Commit one partition's progress; if it moved to another member meanwhile, that member
        reads the records again and finds them done in the state topic (or re-sends the same ids)."""
        assert self.consumer is not None
        if tp not in self.consumer.assignment():
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
        except KafkaError as exc:
            log.warning(
                "notify: could not commit %s at %d (%s); its new owner reads them again", tp, offset, exc
            )

    # --- one record -------------------------------------------------------------------
    def _handle(self, tp: TopicPartition, record) -> tuple[bool, bool]:
        """(finished, changed): finished is False when delivery was cut short (stop, partition revoked)."""
        key = record.key.decode(errors="replace") if record.key else ""
        if record.value is None:  # the budget was removed: its next signal starts from ok
            if self.known.pop(key, None) is not None:
                self._save_state(key, None)
            return True, False
        try:
            signal = Signal.from_json(record.value)
        except ValueError as exc:
            reason = f"not a signal: {str(exc).splitlines()[0]}"
            self._dead_letter(key, record.value, reason, None, "-", "")
            return True, True
        previous = self.known.get(signal.kafka_key, "ok")
        if signal.action == previous:
            return True, False  # a refresh
        if record.offset < self.silent_until.get(tp, 0):
            self._save_state(signal.kafka_key, signal.action)
            return True, True
        if not self._deliver_everywhere(tp, signal, previous):
            return False, False
        self._save_state(signal.kafka_key, signal.action)
        return True, True

    def _deliver_everywhere(self, tp: TopicPartition, signal: Signal, previous: str) -> bool:
        message_id = event_id(signal)
        destinations = self.config.destinations_for(signal.scope, signal.budget, signal.action)
        if not destinations:
            log.info("notify: %s %s -> %s routed nowhere", message_id, signal.kafka_key, signal.action)
        for destination in destinations:
            target = self.targets[destination.id]
            body = (
                slack_payload(signal, previous)
                if target.type == "slack"
                else webhook_payload(signal, previous)
            )
            outcome = self._deliver(tp, target, message_id, body)
            if outcome is None:
                return False
            if outcome.result == "dead":
                self._dead_letter(
                    signal.kafka_key, body.encode(), outcome.reason, outcome.status, target.id, message_id
                )
            else:
                log.info(
                    "notify: %s %s %s -> %s delivered to %s (%s)",
                    message_id,
                    signal.kafka_key,
                    previous,
                    signal.action,
                    target.id,
                    outcome.status,
                )
        return True

    def _deliver(self, tp: TopicPartition, target: Target, message_id: str, body: str) -> Outcome | None:
        """Attempts until delivered or dead; None when stopped or the partition was taken away meanwhile."""
        delay = self.settings.backoff_s
        attempt = 0
        while True:
            outcome = send(self.http, target, message_id, body)
            if outcome.result != "retry":
                return outcome
            attempt += 1
            wait = outcome.retry_after_s if outcome.retry_after_s is not None else delay
            delay = min(delay * 2, self.settings.max_backoff_s)
            log.warning("notify: %s; retry %d of %s in %.1f s", outcome.reason, attempt, message_id, wait)
            if not self._wait_in_group(wait, tp):
                log.warning(
                    "notify: %s not delivered to %s yet; it is sent again after a restart",
                    message_id,
                    target.id,
                )
                return None

    def _wait_in_group(self, seconds: float, tp: TopicPartition) -> bool:
        """Sleep while polling with every partition paused, so the group does not drop this member."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        try:
            while not self.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return tp in self.consumer.assignment()
                self.consumer.pause(*self.consumer.assignment())  # also partitions a rebalance just added
                for got, records in self.consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000)).items():
                    self.consumer.seek(got, records[0].offset)  # not handled now: read them again later
                if tp not in self.consumer.assignment():
                    return False
            return False
        finally:
            self.consumer.resume(*self.consumer.assignment())

    # --- Kafka side effects -----------------------------------------------------------
    def _state_key(self, signal_key: str) -> bytes:
        return f"{self.settings.group}|{signal_key}".encode()

    def _load_state(self) -> dict[str, str]:
        prefix = f"{self.settings.group}|".encode()
        records = read_compacted_topic(self.kafka, self.settings.state_topic)
        return {
            key[len(prefix) :].decode(): json.loads(value)["action"]
            for key, value in records.items()
            if key.startswith(prefix)
        }

    def _save_state(self, signal_key: str, action: str | None) -> None:
        value = None if action is None else json.dumps({"action": action}).encode()
        self._produce(self.settings.state_topic, self._state_key(signal_key), value, [])
        if action is None:
            self.known.pop(signal_key, None)
        else:
            self.known[signal_key] = action

    def _dead_letter(
        self, key: str, body: bytes, reason: str, status: int | None, destination: str, message_id: str
    ) -> None:
        headers = [
            (ERROR_HEADER, reason.encode()),
            (STATUS_HEADER, str(status or "").encode()),
            (DESTINATION_HEADER, destination.encode()),
            ("webhook-id", message_id.encode()),
        ]
        self._produce(self.settings.deadletter_topic, key.encode(), body, headers)
        log.warning(
            "notify: %s dead-lettered to %s: %s", message_id or key, self.settings.deadletter_topic, reason
        )

    def _produce(self, topic: str, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Send and wait for the broker's ack; a broker that is away is retried, never skipped."""
        assert self.producer is not None
        delay = self.settings.backoff_s
        while True:
            try:
                self.producer.send(topic, key=key, value=value, headers=headers).get(timeout=30)
                return
            except KafkaError as exc:
                if self.stop.is_set():
                    raise
                log.warning("notify: cannot write to %s (%s); retrying in %.1f s", topic, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.settings.max_backoff_s)
