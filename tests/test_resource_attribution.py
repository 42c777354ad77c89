"""Attribution from resource attributes (`OTEL_RESOURCE_ATTRIBUTES=burnguard.tenant=...`).

The rule lives once in `contracts.otlp`: a resource's attribution fills what its spans left
empty, the span's own value (in any spelling) wins. The stream and the sink both decode with
it; the pipeline test shows both counting the same spans under the same tenants.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
from burnguard.contracts import attributes as attr
from burnguard.contracts.otlp import decode_usage, resource_attribution
from burnguard.contracts.otlp_view import TraceRequestView
from google.protobuf.json_format import MessageToDict
from kafka import KafkaProducer
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budgets_yaml, tenant_tokens
from tests.fixtures.pipeline import Pipeline

CHAT = {
    attr.GEN_AI_OPERATION_NAME: "chat",
    attr.GEN_AI_PROVIDER_NAME: "openai",
    attr.GEN_AI_REQUEST_MODEL: "gpt-4.1",
}


def request(resource: Mapping[str, Any], *spans: Mapping[str, Any]) -> ExportTraceServiceRequest:
    """Real SDK spans under one resource, encoded as the OTLP exporter sends them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(dict(resource)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for attributes in spans:
        with tracer.start_as_current_span("chat gpt-4.1") as span:
            span.set_attributes({**CHAT, **attributes})
    provider.shutdown()
    return encode_spans(exporter.get_finished_spans())


def payload(resource: Mapping[str, Any], *spans: Mapping[str, Any]) -> bytes:
    return request(resource, *spans).SerializeToString()


@pytest.mark.usefixtures("decode_impl")
def test_every_dimension_comes_from_the_resource_when_the_span_lacks_it() -> None:
    resource = {
        attr.TENANT: "acme",
        attr.WORKFLOW: "triage",
        attr.FEATURE: "summarize",
        attr.ACTION: "click",
        attr.USER_ID: "u-1",
        attr.SESSION_ID: "s-1",
    }
    (usage,) = decode_usage(payload(resource, {}))
    got = {dimension: usage.dimension(dimension) for dimension in attr.ATTRIBUTION_KEYS}
    assert got == {
        "tenant": "acme",
        "workflow": "triage",
        "feature": "summarize",
        "action": "click",
        "user": "u-1",
        "session": "s-1",
    }


@pytest.mark.usefixtures("decode_impl")
def test_the_span_value_wins_over_the_resource() -> None:
    spans = decode_usage(payload({attr.TENANT: "acme", attr.FEATURE: "search"}, {attr.TENANT: "globex"}, {}))
    assert [(u.tenant, u.feature) for u in spans] == [("globex", "search"), ("acme", "search")]


@pytest.mark.usefixtures("decode_impl")
def test_a_deprecated_spelling_on_the_span_wins_over_the_resource() -> None:
    traceloop = attr.TRACELOOP_ASSOCIATION_PREFIX + "tenant_id"
    (usage,) = decode_usage(payload({attr.TENANT: "acme", attr.USER_ID: "res-user"}, {traceloop: "initech"}))
    assert usage.tenant == "initech"
    (usage,) = decode_usage(payload({attr.USER_ID: "res-user"}, {attr.ENDUSER_ID: "span-user"}))
    assert usage.user == "span-user"


@pytest.mark.usefixtures("decode_impl")
@pytest.mark.parametrize(
    ("resource", "user"),
    [
        ({attr.ENDUSER_ID: "legacy"}, "legacy"),
        ({attr.ENDUSER_ID: "legacy", attr.USER_ID: "current"}, "current"),
        ({attr.USER_ID: "", attr.ENDUSER_ID: "legacy"}, "legacy"),
        ({attr.TRACELOOP_ASSOCIATION_PREFIX + "user_id": "tl", attr.ENDUSER_ID: "legacy"}, "tl"),
    ],
    ids=["enduser-alone", "user-id-wins", "empty-user-id-is-filled", "first-listed-foreign-wins"],
)
def test_among_the_resource_spellings_the_span_precedence_applies(resource: dict, user: str) -> None:
    (usage,) = decode_usage(payload(resource, {}))
    assert usage.user == user


@pytest.mark.usefixtures("decode_impl")
def test_each_resource_attributes_its_own_spans_in_one_request() -> None:
    combined = ExportTraceServiceRequest()
    combined.resource_spans.extend(request({attr.TENANT: "acme"}, {}).resource_spans)
    combined.resource_spans.extend(request({}, {}).resource_spans)
    combined.resource_spans.extend(request({attr.TENANT: "globex"}, {}, {attr.TENANT: "own"}).resource_spans)
    tenants = [u.tenant for u in decode_usage(combined.SerializeToString())]
    assert tenants == ["acme", "", "globex", "own"]


@pytest.mark.usefixtures("decode_impl")
def test_otlp_json_reads_the_resource_alike() -> None:
    document = MessageToDict(request({attr.TENANT: "acme", attr.ENDUSER_ID: "u-9"}, {}))
    for span in document["resourceSpans"][0]["scopeSpans"][0]["spans"]:  # OTLP/JSON ids are hex
        span["traceId"], span["spanId"] = (base64.b64decode(span[k]).hex() for k in ("traceId", "spanId"))
    (usage,) = decode_usage(json.dumps(document).encode())
    assert (usage.tenant, usage.user) == ("acme", "u-9")


@pytest.mark.usefixtures("decode_impl")
def test_non_string_resource_values_are_read_as_text_and_others_ignored() -> None:
    view = TraceRequestView.FromString(payload({attr.TENANT: 42, "service.name": "api", "x": "y"}, {}))
    assert resource_attribution(view.resource_spans[0].resource.attributes) == {"tenant": "42"}
    (usage,) = decode_usage(payload({attr.TENANT: 42}, {}))
    assert usage.tenant == "42"


BUDGETS = budgets_yaml(tenant_tokens())


def budget_spent(pipeline: Pipeline) -> dict[str, float]:
    """The latest snapshot of each tenant's day on the budget usage topic."""
    return {usage.key: usage.spent for _, usage in pipeline.usage_snapshots()}


@pytest.mark.slow
def test_stream_and_sink_attribute_by_resource_with_the_span_winning(pipeline: Pipeline) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.start_worker()
    sink = pipeline.start_sink()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    tokens = {attr.GEN_AI_USAGE_INPUT_TOKENS: 100, attr.GEN_AI_USAGE_OUTPUT_TOKENS: 10}
    batches = [
        payload({attr.TENANT: "res-co"}, tokens, tokens),  # 220 tokens to res-co from the resource
        payload({attr.TENANT: "res-co"}, {**tokens, attr.TENANT: "span-co"}),  # 110: the span wins
        payload({attr.ENDUSER_ID: "u-1", attr.TENANT: "res-co"}, {attr.GEN_AI_USAGE_INPUT_TOKENS: 5}),  # 5
    ]
    for message in batches:
        producer.send(pipeline.topics.spans, value=message)
    producer.flush()
    producer.close()
    expected = {"res-co": 225.0, "span-co": 110.0}
    deadline = time.monotonic() + 60
    spent: dict[str, float] = {}
    while spent != expected and time.monotonic() < deadline:
        spent = budget_spent(pipeline)
        time.sleep(0.5)
    assert spent == expected

    topics = [pipeline.topics.spans]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    stored = pipeline.clickhouse_query(
        "[list(r) for r in client.query('SELECT tenant, user, sum(input_tokens + output_tokens), count()"
        " FROM genai_spans FINAL GROUP BY tenant, user ORDER BY tenant, user').result_rows]"
    )
    assert stored == [["res-co", "", 220, 2], ["res-co", "u-1", 5, 1], ["span-co", "", 110, 1]]
