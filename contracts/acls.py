"""Who may do what on Kafka: the one definition of burnguard's principals and their ACLs.

A signal throttles or lifts spend and a budget record sets a limit, so only the stream
worker may write signals and only the admin may write budgets; an app can merely report
spans and read its verdicts. `burnguard kafka acls` prints this set and `--apply` creates
it; `burnguard dev up --secure` and the secure-broker test apply the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from burnguard.contracts.topics import KafkaSettings, Topics, check_connection

PRINCIPALS = ("app", "worker", "sink", "notify", "admin")
"""SASL user names of the components; each is the principal ``User:<name>``."""
#: The consumer group `burnguard notify` uses unless told otherwise (`--group`).
NOTIFY_GROUP = "burnguard-notify"


@dataclass(frozen=True, slots=True)
class Grant:
    """One ALLOW ACL: `principal` may do `operation` on a topic, group or the cluster."""

    principal: str
    resource: str  # "topic" | "group" | "cluster"
    name: str
    operation: str  # a kafka ACLOperation name, e.g. "READ"
    prefixed: bool = False  # the name is a prefix (Faust's changelog and internal topics)


def _topic(principal: str, operation: str, *names: str) -> list[Grant]:
    return [Grant(principal, "topic", name, operation) for name in names]


def acl_set(
    topics: Topics, stream_app_id: str, sink_group: str, notify_group: str = NOTIFY_GROUP
) -> list[Grant]:
    """Least-privilege ACLs for the five principals (READ/WRITE imply DESCRIBE).

    The worker creates the topics it writes and, as a Faust app, owns every topic
    whose name starts with its app id (table changelogs, the assignor's leader
    topic) and the consumer group of that id; an app id that is a prefix of the spans or
    budgets topic is refused, since that grant would cover them.
    """
    worker_writes = (
        topics.signals,
        topics.signal_checkpoints,
        topics.usage,
        topics.budget_usage,
        topics.deadletter,
    )
    notify_writes = (topics.notify_state, topics.notify_deadletter)
    for name in (topics.spans, topics.budgets):  # the worker writes the others anyway
        if name.startswith(stream_app_id):
            raise ValueError(
                f"stream app id {stream_app_id!r} is a prefix of topic {name!r}: the worker's "
                "prefixed ACL would let it write that topic; choose another app id"
            )
    return [
        *_topic("app", "WRITE", topics.spans),
        # The exporter reads the topic's max.message.bytes to split exports that would not fit.
        *_topic("app", "DESCRIBE_CONFIGS", topics.spans),
        *_topic("app", "READ", topics.signals, topics.signal_checkpoints, topics.budgets),
        # The worker follows its own signals to write the checkpoints guards start from.
        *_topic("worker", "READ", topics.spans, topics.budgets, topics.usage, topics.signals),
        *_topic("worker", "WRITE", *worker_writes),
        *_topic("worker", "CREATE", *worker_writes),
        Grant("worker", "topic", stream_app_id, "ALL", prefixed=True),
        Grant("worker", "group", stream_app_id, "READ"),
        # The sink also follows price overrides on the budgets topic.
        *_topic("sink", "READ", topics.spans, topics.signals, topics.budgets),
        Grant("sink", "group", sink_group, "READ"),
        # `burnguard notify` reads the verdicts and keeps its own delivery state and dead letters.
        *_topic("notify", "READ", topics.signals, topics.notify_state),
        *_topic("notify", "WRITE", *notify_writes),
        *_topic("notify", "CREATE", *notify_writes),
        Grant("notify", "group", notify_group, "READ"),
        *_topic("admin", "READ", topics.budgets),
        *_topic("admin", "WRITE", topics.budgets),
        Grant("admin", "cluster", "kafka-cluster", "CREATE"),
    ]


def to_kafka_acls(grants: list[Grant]) -> list[Any]:
    """The grants as kafka-python `ACL` objects (host `*`, permission ALLOW)."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    return [
        ACL(
            principal=f"User:{grant.principal}",
            host="*",
            operation=ACLOperation[grant.operation],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(
                ResourceType[grant.resource.upper()],
                grant.name,
                ACLResourcePatternType.PREFIXED if grant.prefixed else ACLResourcePatternType.LITERAL,
            ),
        )
        for grant in grants
    ]


def apply_acls(grants: list[Grant], kafka: KafkaSettings | None = None, **client: Any) -> int:
    """Create the ACLs (existing ones are kept as they are); return how many were sent.

    Needs a principal allowed to ALTER the cluster (a super user). `client` are
    kafka-python arguments used instead of `kafka` (e.g. a broker's own admin
    connection). Raises RuntimeError with the broker's reasons if it refused any.
    """
    from kafka.admin import KafkaAdminClient

    if not client:
        kafka = kafka or KafkaSettings.from_env()
        check_connection(kafka)
    config = client or kafka.kafka_python_config()
    admin = KafkaAdminClient(**config, client_id="burnguard-acls")
    try:
        result = admin.create_acls(to_kafka_acls(grants))
    finally:
        admin.close()
    failed = result.get("failed", [])
    if failed:
        reasons = sorted({getattr(error, "__name__", str(error)) for error in failed})
        raise RuntimeError(f"the broker refused {len(failed)} of {len(grants)} ACLs: {', '.join(reasons)}")
    return len(grants)
