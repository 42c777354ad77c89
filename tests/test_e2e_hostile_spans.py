"""Hostile spans inside good messages: each is set aside alone, once; nothing else is disturbed.

Real broker, real worker, real sink with chDB. Every message carries valid spans
next to one span with a NaN / infinite / negative cost, negative tokens, tokens
past the ceiling, a value of the wrong type or a 100 kB tenant.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.signals import SCHEMA_PATH
from burnguard.stream.deadletters import KIND_HEADER, REASON_HEADER, SOURCE_HEADER, SPAN_HEADER
from jsonschema import Draft202012Validator
from kafka import KafkaConsumer, KafkaProducer
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budgets_yaml, tenant_cost, tenant_tokens
from tests.fixtures.pipeline import Pipeline, read_to_end

BUDGETS = budgets_yaml(
    tenant_cost(1.0, actions=[{"at": 0.5, "do": "warn"}, {"at": 1.0, "do": "throttle"}]),
    tenant_tokens(1.0e12),
)
GOOD_COST = 0.0625  # exact in binary: sums of it are exact
GOOD_TOKENS = (120, 30)

#: name -> (the attributes that make a span hostile, the rejection kind expected)
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "nan-cost": ({attr.COST_USD: math.nan}, "not_finite"),
    "inf-cost": ({attr.COST_USD: math.inf}, "not_finite"),
    "negative-cost": ({attr.COST_USD: -1e6}, "negative"),
    "negative-tokens": ({attr.GEN_AI_USAGE_INPUT_TOKENS: -5000}, "negative"),
    "tokens-past-ceiling": ({attr.GEN_AI_USAGE_OUTPUT_TOKENS: 2**62}, "over_ceiling"),
    "wrong-type": ({attr.GEN_AI_USAGE_INPUT_TOKENS: "lots"}, "wrong_type"),
    "100kb-tenant": ({attr.TENANT: "x" * 100_000}, "too_long"),
}


def good(tenant: str) -> dict[str, Any]:
    return {
        attr.GEN_AI_OPERATION_NAME: "chat",
        attr.GEN_AI_PROVIDER_NAME: "openai",
        attr.GEN_AI_REQUEST_MODEL: "gpt-4.1",
        attr.GEN_AI_USAGE_INPUT_TOKENS: GOOD_TOKENS[0],
        attr.GEN_AI_USAGE_OUTPUT_TOKENS: GOOD_TOKENS[1],
        attr.COST_USD: GOOD_COST,
        attr.TENANT: tenant,
    }


def message(spans: list[Mapping[str, Any]]) -> bytes:
    """One OTLP request as the SDK encodes it, one span per attribute map, in order."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "hostile-app"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for attributes in spans:
        with tracer.start_as_current_span("chat gpt-4.1") as span:
            span.set_attributes(dict(attributes))
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans()).SerializeToString()


def read_all(pipeline: Pipeline, topic: str, idle_ms: int = 2000) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=pipeline.broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=idle_ms,
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def usage_becomes(pipeline: Pipeline, expected: dict[str, float], timeout_s: float = 60) -> dict[str, float]:
    """The latest budget usage once it equals `expected`, or as it stood when `timeout_s` ran out."""
    deadline, seen = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline and seen != expected:
        seen = latest_usage(pipeline)
        time.sleep(0.5)
    return seen


def latest_usage(pipeline: Pipeline) -> dict[str, float]:
    latest = {}
    for record in read_to_end(pipeline.broker.bootstrap, pipeline.topics.budget_usage):
        usage = json.loads(record.value)
        latest[f"{usage['budget']}:{usage['key']}"] = usage["spent"]
    return latest


@pytest.mark.slow
def test_hostile_spans_are_dead_lettered_once_and_the_valid_ones_count_exactly(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    worker = pipeline.start_worker()
    sink = pipeline.start_sink()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    expected_good = 0
    for number, (hostile, _kind) in enumerate(HOSTILE.values()):
        # the hostile span in the middle of three good ones; the tenant is the hostile span's own
        spans = [good("acme"), good("acme"), {**good("acme"), **hostile}, good("acme")]
        expected_good += 3
        producer.send(pipeline.topics.spans, key=b"acme", value=message(spans), partition=number % 4)
    producer.flush()
    producer.close()

    cost, tokens = expected_good * GOOD_COST, expected_good * sum(GOOD_TOKENS)
    expected = {"tenant-cost:acme": cost, "tenant-tokens:acme": float(tokens)}
    assert usage_becomes(pipeline, expected) == expected, "the budget usage is not exactly the valid spans'"

    dead = read_all(pipeline, pipeline.topics.deadletter, idle_ms=3000)
    kinds = sorted(dict(record.headers)[KIND_HEADER].decode() for record in dead)
    assert kinds == sorted(kind for _, kind in HOSTILE.values()), "each hostile span parked exactly once"
    sources = {(dict(r.headers)[SOURCE_HEADER], dict(r.headers)[SPAN_HEADER]) for r in dead}
    assert len(sources) == len(dead)
    for record in dead:
        headers = dict(record.headers)
        assert headers[SPAN_HEADER] == b"2" and headers[REASON_HEADER]
        parked = ExportTraceServiceRequest.FromString(record.value)
        (resource_spans,) = parked.resource_spans
        resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        assert resource["service.name"] == "hostile-app"
        assert sum(len(scope.spans) for scope in resource_spans.scope_spans) == 1

    validator = Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    signals = [json.loads(r.value) for r in read_all(pipeline, pipeline.topics.signals) if r.value]
    assert signals, "the valid spend should have published a warn"
    for published in signals:
        validator.validate(published)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in published.values())
    assert any(s["key"] == "acme" and s["action"] == "warn" for s in signals)

    stored = stored_once_read(
        pipeline,
        sink,
        "SELECT toString(sum(cost_usd)), count(), toString(sum(input_tokens + output_tokens)),"
        " countIf(cost_usd < 0) FROM genai_spans FINAL",
    )
    total_cost, count, total_tokens, negative = stored
    assert math.isfinite(float(total_cost)) and float(total_cost) == pytest.approx(cost, abs=1e-12)
    assert (count, int(total_tokens), negative) == (expected_good, tokens, 0)
    sink_log = pipeline.log("sink")
    assert '"rejected_spans": 7' in sink_log, "the sink should count the spans it did not write"

    kinds_counted = '{"negative": 2, "not_finite": 2, "over_ceiling": 1, "too_long": 1, "wrong_type": 1}'
    counted = f'"rejected_spans": {kinds_counted}'
    pipeline.wait_for_log("worker", counted, 10, worker)
    worker_log = pipeline.log("worker")
    assert "Traceback" not in worker_log and "crashed" not in worker_log.lower()


#: Fields an attribute entry may carry besides key and value (OTLP 1.10's `key_strindex` = 3, or
#: any a hostile or future encoder adds), one per message: each must change nothing.
EXTRA_FIELDS = [
    b"\x18\x07",
    b"\x20\x01",
    b"\x29" + bytes(8),
    b"\x35" + bytes(4),
    b"\x3a\x01x",
    b"\xf8\xff\xff\xff\x0f\x01",
]


@pytest.mark.slow
def test_spans_whose_attributes_carry_unknown_fields_count_in_the_worker_and_the_sink(
    pipeline: Pipeline,
) -> None:
    """Every attribute of span and resource carries an extra field: protobuf reads the same
    attributes, so the worker must count and the sink must store every span, under its tenant
    and service (before, the view dropped such attributes and the spans went unaccounted)."""
    pipeline.write_budgets(BUDGETS)
    worker = pipeline.start_worker()
    sink = pipeline.start_sink()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")
    for number, extra in enumerate(EXTRA_FIELDS):
        request = ExportTraceServiceRequest.FromString(message([good("acme")] * 2))
        for resource_spans in request.resource_spans:
            entries = [*resource_spans.resource.attributes]
            entries += [
                kv for scope in resource_spans.scope_spans for span in scope.spans for kv in span.attributes
            ]
            for entry in entries:
                entry.MergeFromString(extra)  # an unknown field, written back as it came
        producer.send(
            pipeline.topics.spans, key=b"acme", value=request.SerializeToString(), partition=number % 4
        )
    producer.flush()
    producer.close()

    spans = 2 * len(EXTRA_FIELDS)
    cost, tokens = spans * GOOD_COST, spans * sum(GOOD_TOKENS)
    expected = {"tenant-cost:acme": cost, "tenant-tokens:acme": float(tokens)}
    assert usage_becomes(pipeline, expected) == expected, "every span counts, under its tenant"

    stored = stored_once_read(
        pipeline,
        sink,
        "SELECT count(), toString(sum(cost_usd)), groupUniqArray(tenant), groupUniqArray(service)"
        " FROM genai_spans FINAL",
    )
    count, total_cost, tenants, services = stored
    assert (count, float(total_cost), tenants, services) == (
        spans,
        pytest.approx(cost),
        ["acme"],
        ["hostile-app"],
    )
    assert worker.poll() is None, "the worker still runs"


def stored_once_read(pipeline: Pipeline, sink: subprocess.Popen, select: str) -> tuple:
    """One row of `select` over the sink's ClickHouse, once it has read every span and signal and stopped."""
    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    return pipeline.clickhouse_query(f"client.query({select!r}).result_rows[0]")
