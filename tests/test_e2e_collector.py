"""A real OpenTelemetry Collector between an ordinary app and burnguard, every part real.

The app uses only the OpenTelemetry SDK, the official `opentelemetry-instrumentation-openai-v2`
and the standard OTLP/HTTP exporter against a local OpenAI-compatible server; the Collector is
the distribution built from `deploy/collector` (from the Go module proxy on a fresh machine)
running the shipped GenAI-only example config; then the real broker, Faust worker and
ClickHouse sink. One tenant is attributed through baggage (`BaggageSpanProcessor`), another
through resource attributes (`OTEL_RESOURCE_ATTRIBUTES`), and a third run has both: the span's
value wins. Per-tenant tokens and cost must be exact in the budget usage and in ClickHouse.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from burnguard.contracts import attributes as attr
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.snapshots import BudgetUsage
from burnguard.deploy import gobuild
from burnguard.deploy.kafka import free_port
from kafka import KafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from burnguard.cli.devstack import terminate, wait_until_consumed
from tests.factories import budget, budgets_yaml, tenant_tokens
from tests.fakes.openai_api import FakeOpenAI
from tests.fixtures.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "apps" / "otel_sdk_app.py"
GENAI_CONFIG = REPO / "deploy" / "otel-collector-genai.yaml"
USER_CONFIG = REPO / "deploy" / "otel-collector.yaml"
READY = "Everything is ready"
#: A fresh machine builds the Collector first (minutes) inside the first test's setup.
pytestmark = pytest.mark.timeout(900)

BUDGETS = budgets_yaml(budget("tenant-cost", 1000, window="day"), tenant_tokens())
#: (how the tenant is attributed, environment of the app run, model:input:output calls)
RUNS = [
    ("baggage", {"APP_BAGGAGE_TENANT": "bag-co"}, "gpt-4.1:1000:200,gpt-4.1-mini:300:40,gpt-4.1:50:5"),
    (
        "resource",
        {"OTEL_RESOURCE_ATTRIBUTES": "burnguard.tenant=res-co,burnguard.feature=search"},
        "gpt-4.1:700:70,gpt-4.1:20:2",
    ),
    (
        "span wins",
        {"OTEL_RESOURCE_ATTRIBUTES": "burnguard.tenant=res-co", "APP_BAGGAGE_TENANT": "both-co"},
        "gpt-4.1-mini:100:10",
    ),
]


def expected_totals() -> dict[str, tuple[int, float, int]]:
    """tenant -> (tokens, cost, calls), priced with the project's own price book."""
    tenant_of = {"baggage": "bag-co", "resource": "res-co", "span wins": "both-co"}
    prices = PriceBook()
    totals: dict[str, tuple[int, float, int]] = {}
    for how, _, calls in RUNS:
        tokens, cost, count = totals.get(tenant_of[how], (0, 0.0, 0))
        for call in calls.split(","):
            model, input_tokens, output_tokens = call.split(":")
            price = prices.price(
                model, "openai", input_tokens=int(input_tokens), output_tokens=int(output_tokens)
            )
            assert price is not None and price > 0, model
            tokens, cost, count = tokens + int(input_tokens) + int(output_tokens), cost + price, count + 1
        totals[tenant_of[how]] = (tokens, cost, count)
    return totals


@pytest.fixture(scope="module")
def collector_binary() -> Path:
    """The Collector built from deploy/collector (once per source hash; minutes on a fresh machine)."""
    return gobuild.build("collector")


def write_config(source: Path, pipeline: Pipeline, http_port: int, path: Path) -> Path:
    """The shipped config, pointed at this test's broker, topic and free ports."""
    config = yaml.safe_load(source.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    protocols["grpc"]["endpoint"] = f"127.0.0.1:{free_port()}"
    protocols["http"]["endpoint"] = f"127.0.0.1:{http_port}"
    kafka = config["exporters"]["kafka"]
    kafka["brokers"] = [pipeline.broker.bootstrap]
    kafka["traces"]["topic"] = pipeline.topics.spans
    config["service"]["telemetry"] = {"metrics": {"level": "none"}}  # no fixed :8888 listener
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running_collector(binary: Path, config: Path, log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while READY not in log.read_text(errors="replace"):
            assert process.poll() is None, f"the Collector exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the Collector never got ready:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            terminate(process.pid, 30)
        process.wait(30)


def start_app(
    openai_url: str, otlp_port: int, extra_env: dict[str, str], calls: str
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BURNGUARD_"))}
    env.update(
        OTEL_SERVICE_NAME="plain-otel-app",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
        OPENAI_BASE_URL=openai_url,
        OPENAI_API_KEY="test",
        APP_CALLS=calls,
        **extra_env,
    )
    return subprocess.Popen(
        [sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def latest_usage(pipeline: Pipeline) -> dict[tuple[str, str], BudgetUsage]:
    return {(usage.budget, usage.key): usage for _, usage in pipeline.usage_snapshots()}


def spans_on_topic(pipeline: Pipeline) -> list[tuple[dict, dict]]:
    """(resource attributes, span attributes + name) of every span the Collector wrote to Kafka."""
    consumer = KafkaConsumer(
        pipeline.topics.spans,
        bootstrap_servers=pipeline.broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1500,
    )
    found = []
    try:
        for record in consumer:
            request = ExportTraceServiceRequest.FromString(record.value)
            for resource_spans in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append((resource, {"name": span.name} | {kv.key: kv for kv in span.attributes}))
    finally:
        consumer.close()
    return found


def test_the_user_config_is_valid_for_the_built_collector(collector_binary: Path) -> None:
    for config in (USER_CONFIG, GENAI_CONFIG):
        done = subprocess.run(
            [str(collector_binary), "validate", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (config, done.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("source", [USER_CONFIG, GENAI_CONFIG], ids=["user-config", "genai-only-config"])
def test_plain_otel_app_through_a_real_collector_is_counted_exactly(
    pipeline: Pipeline, collector_binary: Path, tmp_path: Path, source: Path
) -> None:
    pipeline.write_budgets(BUDGETS)
    http_port = free_port()
    config = write_config(source, pipeline, http_port, tmp_path / "collector.yaml")
    # The worker starts while the Collector and the apps do (spans wait on the topic, read from the
    # start); the runs are independent apps (each its own tenant): side by side.
    with (
        ThreadPoolExecutor(1) as starter,
        FakeOpenAI() as openai_server,
        running_collector(collector_binary, config, tmp_path / "collector.log"),
    ):
        worker_ready = starter.submit(pipeline.start_worker)
        sink = pipeline.start_sink()
        apps = [start_app(openai_server.base_url, http_port, env, calls) for _, env, calls in RUNS]
        for app in apps:
            _, stderr = app.communicate(timeout=120)
            assert app.returncode == 0, stderr[-4000:]
        worker_ready.result()
        expected = expected_totals()
        assert len(openai_server.requests) == sum(count for _, _, count in expected.values())

        wanted = {tenant: (float(tokens), cost) for tenant, (tokens, cost, _) in expected.items()}
        seen: dict[str, tuple[float, float]] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            usage = latest_usage(pipeline)
            seen = {
                tenant: (usage[("tenant-tokens", tenant)].spent, usage[("tenant-cost", tenant)].spent)
                for tenant in wanted
                if ("tenant-tokens", tenant) in usage and ("tenant-cost", tenant) in usage
            }
            if seen.keys() == wanted.keys() and all(seen[t][0] == wanted[t][0] for t in wanted):
                break
            time.sleep(0.5)
    assert {key for _, key in latest_usage(pipeline)} == set(wanted), (
        "a span was counted under another tenant"
    )
    for tenant, (tokens, cost) in wanted.items():
        assert seen[tenant][0] == tokens, tenant
        assert seen[tenant][1] == pytest.approx(cost, rel=1e-9), tenant

    # Every model call reached Kafka with its resource; the app's other spans (one `handle-request`
    # per call) too with the user config, none through the GenAI-only filter.
    calls = sum(count for _, _, count in expected.values())
    on_topic = spans_on_topic(pipeline)
    genai = [span for _, span in on_topic if attr.GEN_AI_OPERATION_NAME in span]
    others = [span["name"] for _, span in on_topic if attr.GEN_AI_OPERATION_NAME not in span]
    assert len(genai) == calls
    assert others == ([] if source == GENAI_CONFIG else ["handle-request"] * calls)
    assert (
        sum(1 for resource, span in on_topic if resource.get(attr.TENANT) == "res-co" and span in genai) == 3
    )

    topics = [pipeline.topics.spans, pipeline.topics.signals]
    assert wait_until_consumed(pipeline.broker.bootstrap, pipeline.env["BURNGUARD_SINK_GROUP"], topics) == 0
    assert pipeline.stop(sink) == 0
    stored = pipeline.clickhouse_query(
        "[list(r) for r in client.query('SELECT tenant, sum(input_tokens + output_tokens), sum(cost_usd),"
        " count(), groupUniqArray(feature), groupUniqArray(service) FROM genai_spans FINAL"
        " GROUP BY tenant ORDER BY tenant').result_rows]"
    )
    by_tenant = {row[0]: row[1:] for row in stored}
    assert by_tenant.keys() == expected.keys()
    for tenant, (tokens, cost, count) in expected.items():
        got_tokens, got_cost, got_count, features, services = by_tenant[tenant]
        assert (got_tokens, got_count) == (tokens, count), tenant
        assert got_cost == pytest.approx(cost, rel=1e-9), tenant
        assert services == ["plain-otel-app"]
        assert features == (["search"] if tenant == "res-co" else [""])
