"""Kafka topics and connection settings shared by the app, the stream and the sinks.

Connection secrets (SASL) come from the environment only; they are never
logged, and `KafkaSettings.__repr__` hides them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names (DESIGN.md §4); each overridable with BURNGUARD_TOPIC_<NAME>."""

    spans: str = "otlp_spans"
    signals: str = "burnguard.signals"
    budgets: str = "burnguard.budgets"
    deadletter: str = "burnguard.deadletter"
    usage: str = "burnguard.usage"  # internal: usage deltas repartitioned by budget key
    budget_usage: str = "burnguard.budget_usage"  # compacted: running totals per budget window

    @classmethod
    def from_env(cls) -> Topics:
        defaults = cls()
        return cls(
            **{
                name: os.environ.get(f"BURNGUARD_TOPIC_{name.upper()}", getattr(defaults, name))
                for name in cls.__dataclass_fields__
            }
        )


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """How to reach Kafka. Built from BURNGUARD_KAFKA_* variables."""

    bootstrap: str = DEFAULT_BOOTSTRAP
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = field(default=None, repr=False)
    sasl_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, bootstrap: str | None = None) -> KafkaSettings:
        env = os.environ
        return cls(
            bootstrap=bootstrap or env.get("BURNGUARD_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP),
            security_protocol=env.get("BURNGUARD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
            sasl_mechanism=env.get("BURNGUARD_KAFKA_SASL_MECHANISM"),
            sasl_username=env.get("BURNGUARD_KAFKA_SASL_USERNAME"),
            sasl_password=env.get("BURNGUARD_KAFKA_SASL_PASSWORD"),
        )

    def kafka_python_config(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return config


#: `otlp_spans` is stamped by the broker (LogAppendTime): the stream trusts a span's event time only
#: near its record's time, and a producer's CreateTime would be the sender's clock again.
SPANS_TOPIC_CONFIG: dict[str, str] = {"message.timestamp.type": "LogAppendTime"}


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int = 1
    compacted: bool = False
    config: dict[str, str] | None = None  # topic configs set at creation


def ensure_topics(kafka: KafkaSettings, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet (compaction set at creation); return those created.

    Replication is left to the broker's default (-1), so the same call suits a
    single local broker and a production cluster.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka.kafka_python_config())
    created = []
    try:
        existing = set(admin.list_topics())
        for spec in specs:
            if spec.name in existing:
                continue
            configs = {"cleanup.policy": "compact"} if spec.compacted else {}
            configs.update(spec.config or {})
            try:
                admin.create_topics([NewTopic(spec.name, spec.partitions, -1, topic_configs=configs)])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another worker or CLI created it meanwhile
    finally:
        admin.close()
    return created
