"""Local Apache Kafka broker from Maven Central jars (no Docker needed)."""

from burnguard.deploy.kafka.broker import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaToolMissing,
    free_port,
    kafka_classpath,
    pid_alive,
    port_is_free,
)

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaToolMissing",
    "free_port",
    "kafka_classpath",
    "pid_alive",
    "port_is_free",
]
