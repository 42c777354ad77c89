"""Kafka topics and connection settings shared by the app, the stream and the sinks.

Connection secrets (SASL) come from the environment only; they are never
logged, and `KafkaSettings.__repr__` hides them.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names (docs/ARCHITECTURE.md §5); each overridable with BURNGUARD_TOPIC_<NAME>."""

    spans: str = "otlp_spans"
    signals: str = "burnguard.signals"
    #: compacted: what a guard starts from instead of replaying `signals` (`contracts/signal_checkpoints.py`)
    signal_checkpoints: str = "burnguard.signals.checkpoints"
    budgets: str = "burnguard.budgets"
    deadletter: str = "burnguard.deadletter"
    usage: str = "burnguard.usage"  # internal: usage deltas repartitioned by budget key
    budget_usage: str = "burnguard.budget_usage"  # compacted: running totals per budget window
    notify_state: str = "burnguard.notify.state"  # compacted: the last action `burnguard notify` sent per key
    notify_deadletter: str = "burnguard.notify.deadletter"  # notifications a destination refused

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
    #: PEM file of the CA (or self-signed broker certificate) to trust; else the system's CAs.
    ssl_cafile: str | None = None

    @classmethod
    def from_env(cls, bootstrap: str | None = None) -> KafkaSettings:
        env = os.environ
        return cls(
            bootstrap=bootstrap or env.get("BURNGUARD_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP),
            security_protocol=env.get("BURNGUARD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
            sasl_mechanism=env.get("BURNGUARD_KAFKA_SASL_MECHANISM"),
            sasl_username=env.get("BURNGUARD_KAFKA_SASL_USERNAME"),
            sasl_password=env.get("BURNGUARD_KAFKA_SASL_PASSWORD"),
            ssl_cafile=env.get("BURNGUARD_KAFKA_SSL_CAFILE"),
        )

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol.upper() in ("SSL", "SASL_SSL")

    def check(self) -> None:
        """Fail early, naming the variable (never its value), on an incomplete SASL setup."""
        if not self.security_protocol.upper().startswith("SASL_"):
            return
        missing = [
            f"BURNGUARD_KAFKA_SASL_{name.upper()}"
            for name in ("mechanism", "username", "password")
            if not getattr(self, f"sasl_{name}")
        ]
        if missing:
            raise ValueError(f"Kafka security protocol {self.security_protocol} needs {', '.join(missing)}")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for aiokafka/Faust (kafka-python takes `ssl_cafile` instead)."""
        return ssl.create_default_context(cafile=self.ssl_cafile) if self.uses_ssl else None

    def kafka_python_config(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients."""
        self.check()
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
        if self.ssl_cafile and self.uses_ssl:
            config["ssl_cafile"] = self.ssl_cafile
        return config


class _AuthFailures(logging.Handler):
    """Notices kafka-python logging a refused SASL handshake (it retries them until a timeout).

    kafka-python often drops the broker's refusal when the close follows it in the
    same read, and logs a bare "socket disconnected"; those are counted too.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.refused = 0
        self.disconnected = 0

    def emit(self, record: logging.LogRecord) -> None:
        from kafka.errors import KafkaConnectionError, SaslAuthenticationFailedError

        if record.name != "kafka.net.manager":  # its bootstrap warning carries the cause
            return
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, SaslAuthenticationFailedError):
                self.refused += 1
            elif isinstance(arg, KafkaConnectionError) and "socket disconnected" in str(arg):
                self.disconnected += 1


def check_connection(kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Connect once (with SASL), so refused credentials end a start-up with a clear error, not a wait.

    kafka-python retries a refused SASL handshake until its bootstrap timeout and then
    only says "Unable to bootstrap". This raises `SaslAuthenticationFailedError` naming
    the broker and user (never the password) within `timeout_s`.
    """
    if not kafka.sasl_mechanism:
        return
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError

    watcher, logger = _AuthFailures(), logging.getLogger("kafka.net")
    level = logger.level
    logger.addHandler(watcher)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        KafkaAdminClient(**kafka.kafka_python_config(), bootstrap_timeout_ms=int(timeout_s * 1000)).close()
    except KafkaTimeoutError:
        if not watcher.refused and not watcher.disconnected:
            raise  # e.g. connection refused: no broker there
        how = "refused" if watcher.refused else "closed every connection during authentication of"
        raise SaslAuthenticationFailedError(
            f"Kafka at {kafka.bootstrap} {how} user {kafka.sasl_username!r} ({kafka.sasl_mechanism}): "
            "wrong password or unknown user? Check BURNGUARD_KAFKA_SASL_USERNAME and _PASSWORD"
        ) from None
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


#: `otlp_spans` is stamped by the broker (LogAppendTime): the stream trusts a span's event time only
#: near its record's time, and a producer's CreateTime would be the sender's clock again.
SPANS_TOPIC_CONFIG: dict[str, str] = {"message.timestamp.type": "LogAppendTime"}
#: Compaction never touches the active segment (by default up to 1 GB or 7 days): rolling it hourly
#: lets retired `ok`s and their tombstones leave `burnguard.signals` within hours, not a week.
SIGNALS_TOPIC_CONFIG: dict[str, str] = {"segment.ms": "3600000"}
#: A checkpoint replaces the last one every half minute or so: ten-minute segments let the broker
#: drop the replaced ones soon (several MB each with many restrictions).
CHECKPOINTS_TOPIC_CONFIG: dict[str, str] = {"segment.ms": "600000"}


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

    check_connection(kafka)
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
