"""burnguard joins the app's OpenTelemetry and never replaces it.

The app's backend here is a local OTLP/HTTP receiver. Whether the app set up its own
tracer provider and then called `burnguard.configure()`, or runs zero-code under
`opentelemetry-instrument` with `OTEL_TRACES_EXPORTER=otlp` (with `opentelemetry-distro`
installed, in a throwaway venv, or without it), the receiver gets the app's own spans
and the LLM call's span, and burnguard's copy of the LLM span reaches the real broker.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from burnguard.contracts.topics import KafkaSettings
from burnguard.instrumentation import runtime as runtime_module
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.fakes import FakeOpenAI
from tests.fixtures.pipeline import Pipeline
from tests.test_e2e_exit_delivery import burnguard_spans_on_topic

APP = Path(__file__).parent / "apps" / "otel_app.py"
LLM_SPAN = "chat gpt-4.1"
CONFIGURATORS = (
    "from importlib.metadata import entry_points\n"
    "print(*[e.name for e in entry_points(group='opentelemetry_configurator')])"
)


class OtlpReceiver(ThreadingHTTPServer):
    """The team's tracing backend: an OTLP/HTTP receiver that keeps the names of the spans it gets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHandler)
        self.spans: list[tuple[str, str]] = []  # (scope, span name)
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def names(self) -> set[str]:
        with self.lock:
            return {name for _, name in self.spans}


class _OtlpHandler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                self.server.spans.extend(
                    (scope.scope.name, span.name)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def app_env(
    pipeline: Pipeline, receiver: OtlpReceiver, openai_server: FakeOpenAI, setup: str
) -> dict[str, str]:
    return {
        **pipeline.env,
        "OTEL_APP_SETUP": setup,
        "OTEL_SERVICE_NAME": "otel-app",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OPENAI_BASE_URL": openai_server.base_url,
        "OPENAI_API_KEY": "test",
        "PYTHONWARNINGS": "ignore",
    }


def assert_joined(pipeline: Pipeline, receiver: OtlpReceiver, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-4000:]
    assert "Overriding of current TracerProvider" not in done.stderr, done.stderr[-4000:]
    assert "not loaded" not in done.stderr, done.stderr[-4000:]  # no configurator displaced
    assert {"handle-request", "render-reply", LLM_SPAN} <= receiver.names(), receiver.spans
    assert burnguard_spans_on_topic(pipeline, 1) == 1, done.stderr[-4000:]  # burnguard's copy, once


@pytest.mark.slow
def test_configure_joins_the_apps_own_provider(pipeline: Pipeline, receiver: OtlpReceiver) -> None:
    with FakeOpenAI() as openai_server:
        env = app_env(pipeline, receiver, openai_server, "configure")
        done = subprocess.run([sys.executable, str(APP)], env=env, capture_output=True, text=True, timeout=60)
    assert_joined(pipeline, receiver, done)


@pytest.mark.slow
def test_zero_code_keeps_the_apps_exporter(pipeline: Pipeline, receiver: OtlpReceiver) -> None:
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    with FakeOpenAI() as openai_server:
        env = app_env(pipeline, receiver, openai_server, "zero-code")
        done = subprocess.run(
            [str(instrument), sys.executable, str(APP)], env=env, capture_output=True, text=True, timeout=60
        )
    assert_joined(pipeline, receiver, done)


@pytest.mark.slow
def test_zero_code_beside_opentelemetry_distro(
    pipeline: Pipeline, receiver: OtlpReceiver, tmp_path: Path, installed_venv: Callable[..., Path]
) -> None:
    bin_dir = installed_venv("distro-venv", "opentelemetry-distro", "openai")
    python = bin_dir / "python"
    configurators = subprocess.run(
        [str(python), "-c", CONFIGURATORS], capture_output=True, text=True, check=True
    ).stdout.split()
    assert configurators == ["configurator"]  # the distro's, the one that runs
    with FakeOpenAI() as openai_server:
        env = app_env(pipeline, receiver, openai_server, "zero-code")
        done = subprocess.run(
            [str(bin_dir / "opentelemetry-instrument"), str(python), str(APP)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert_joined(pipeline, receiver, done)


@pytest.mark.slow
def test_configure_takes_a_provider_explicitly(pipeline: Pipeline) -> None:
    """`configure(tracer_provider=...)`: burnguard's processors join it; its own exporter keeps every span."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    settings = runtime_module.Settings(
        kafka=KafkaSettings(bootstrap=pipeline.broker.bootstrap), topics=pipeline.topics
    )
    runtime = runtime_module.configure(settings, tracer_provider=provider, set_global=False)
    try:
        assert runtime.tracer_provider is provider and not runtime.owns_provider
        import burnguard

        with provider.get_tracer("app").start_as_current_span("handle-request"):
            burnguard.record_llm_call("gpt-4.1", "openai", 120, 30)
        report = runtime.shutdown(10)
    finally:
        runtime_module.reset_runtime()
    assert {span.name for span in memory.get_finished_spans()} == {"handle-request", LLM_SPAN}
    assert (report.spans_sent, report.spans_undelivered) == (2, 0)  # burnguard's copy of both
    assert burnguard_spans_on_topic(pipeline, 1) == 1
    with provider.get_tracer("app").start_as_current_span("after"):
        pass
    assert "after" in {span.name for span in memory.get_finished_spans()}  # the app's provider lives on


def test_configure_twice_on_one_provider_joins_once() -> None:
    """An app that calls `configure()` under zero-code (which configured already) exports each span once."""
    app_spans, burnguard_copy = InMemorySpanExporter(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app_spans))
    settings = runtime_module.Settings()
    first = runtime_module.configure(
        settings, tracer_provider=provider, exporter=burnguard_copy, batch=False, set_global=False
    )
    try:
        again = runtime_module.configure(settings, tracer_provider=provider, batch=False, set_global=False)
        assert again is first
        import burnguard

        burnguard.record_llm_call("gpt-4.1", "openai", 120, 30)
        assert [s.name for s in burnguard_copy.get_finished_spans()] == [LLM_SPAN]
        assert [s.name for s in app_spans.get_finished_spans()] == [LLM_SPAN]
    finally:
        first.shutdown(1)
        runtime_module.reset_runtime()
    later = runtime_module.configure(
        settings, tracer_provider=provider, exporter=InMemorySpanExporter(), batch=False, set_global=False
    )
    assert later is not first  # after shutdown, burnguard may join again
    later.shutdown(1)
    runtime_module.reset_runtime()
