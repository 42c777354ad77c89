"""Following a compacted topic on a real broker: a record the handler cannot take stops nothing
(with either reader of the fetched record batches)."""

from __future__ import annotations

import uuid

from burnguard.contracts.compacted_topics import CompactedTopicFollower
from burnguard.contracts.topics import KafkaSettings
from burnguard.deploy.kafka import KafkaBroker
from kafka import KafkaProducer


def test_a_record_the_handler_raises_on_is_passed_over_and_the_next_ones_still_apply(
    kafka_broker: KafkaBroker, batches_impl: str
) -> None:
    topic = f"follow-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=1, compact=True)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    applied: list[bytes] = []

    def handler(key: bytes | None, value: bytes | None) -> None:
        if value == b"poison":
            raise ValueError("a record this handler cannot take")
        applied.append(value or b"")

    follower = CompactedTopicFollower(KafkaSettings(bootstrap=kafka_broker.bootstrap), topic, handler, "t")
    try:
        for key, value in ((b"a", b"first"), (b"b", b"poison"), (b"c", b"after")):
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
        follower.start(wait_s=30)
        assert follower.ready.is_set()
        assert applied == [b"first", b"after"]
        assert follower.failed_records == 1
        producer.send(topic, key=b"d", value=b"later").get(timeout=30)  # still following
        for _ in range(100):
            if applied[-1] == b"later":
                break
            follower._stop.wait(0.1)
        assert applied[-1] == b"later"
    finally:
        follower.stop()
        producer.close()
