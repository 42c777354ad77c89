"""Where a running component gets its budgets: the compacted `burnguard.budgets` topic.

`burnguard budgets apply` writes the topic; every stream worker reads all of it
(not a consumer group: each worker needs every budget) and swaps in the new
configuration without a restart, and the ClickHouse sink follows it for the
price overrides, so both price a span alike. While the topic is empty, the
YAML file the component was started with (`BURNGUARD_BUDGETS_FILE`) is the
configuration.
"""

from __future__ import annotations

import logging
import threading

from burnguard.contracts.budgets import BudgetConfig, from_records
from burnguard.contracts.compacted_topics import CompactedTopicFollower, read_compacted_topic
from burnguard.contracts.topics import KafkaSettings
from pydantic import ValidationError

logger = logging.getLogger(__name__)


def initial_config(kafka: KafkaSettings, topic: str, file_config: BudgetConfig) -> BudgetConfig:
    """The topic's budgets when it has any, else the file's."""
    records = {key.decode(): value for key, value in read_compacted_topic(kafka, topic).items()}
    if not records:
        return file_config
    return from_records(records)


class BudgetFeed:
    """Follows the budgets topic; `take_update()` returns a new config once per change."""

    def __init__(self, kafka: KafkaSettings, topic: str, current: BudgetConfig) -> None:
        self._records: dict[str, bytes] = {}
        self._current = current
        self._pending: BudgetConfig | None = None
        self._lock = threading.Lock()
        self.rejected = 0
        self._replayed = False
        self._follower = CompactedTopicFollower(kafka, topic, self._on_record, "burnguard-budgets")

    def start(self) -> BudgetFeed:
        self._follower.start(wait_s=0)
        return self

    def stop(self) -> None:
        self._follower.stop()

    def _on_record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        records = dict(self._records)
        if value is None:
            records.pop(key.decode(), None)
        else:
            records[key.decode()] = value
        if not self._follower.ready.is_set():
            self._records = records  # still replaying: a partial state is no configuration yet
            return
        self._consider(records, f"record {key!r}")

    def _consider(self, records: dict[str, bytes], what: str) -> None:
        if not records:
            return  # an emptied topic keeps the last configuration rather than dropping every budget
        try:
            config = from_records(records)
        except (ValidationError, ValueError) as exc:
            self.rejected += 1
            logger.error("ignoring budgets %s: the result does not validate: %s", what, exc)
            return
        self._records = records
        with self._lock:
            if config != self._current:
                self._current = self._pending = config

    @property
    def current(self) -> BudgetConfig:
        """The configuration followed now (its changes are also handed out by `take_update`)."""
        with self._lock:
            return self._current

    def take_update(self) -> BudgetConfig | None:
        """The new configuration if it changed since the last call, else None."""
        if not self._replayed and self._follower.ready.is_set():
            self._replayed = True
            self._consider(dict(self._records), "replayed at start")
        with self._lock:
            update, self._pending = self._pending, None
        return update
