"""Nothing is lost at exit: an app's last spans reach Kafka however it ends, without `shutdown()`.

Each app (tests/apps/exit_app.py) records 10 calls, waits until the test has seen them on
the topic (so the Kafka producer exists, with kafka-python's own exit handler registered
after burnguard's), records 10 more and ends: by returning, by `sys.exit`, or killed by SIGTERM. Set up
with `burnguard.configure()` or zero-code under `opentelemetry-instrument`, every one
of its 20 call spans must be on the real broker's spans topic.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from burnguard.instrumentation.dedupe import BURNGUARD_SCOPE
from kafka import KafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fakes import FakeOpenAI
from tests.fixtures.pipeline import Pipeline

APP = Path(__file__).parent / "apps" / "exit_app.py"
INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"


def burnguard_spans(records: list) -> int:
    """Spans of burnguard's scope in these `otlp_spans` records."""
    found = 0
    for record in records:
        request = ExportTraceServiceRequest.FromString(record.value)
        found += sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
            if scope.scope.name == BURNGUARD_SCOPE
        )
    return found


def burnguard_spans_on_topic(
    pipeline: Pipeline, expected: int, timeout_s: float = 20, seen: list[float] | None = None
) -> int:
    """How many spans of burnguard's scope are on the spans topic (reads until `expected` or timeout).

    `seen` gets the seconds it took until `expected` spans were there.
    """
    consumer = KafkaConsumer(
        pipeline.topics.spans, bootstrap_servers=pipeline.broker.bootstrap, auto_offset_reset="earliest"
    )
    found = 0
    started = time.monotonic()
    try:
        while time.monotonic() < started + timeout_s and found < expected:
            for records in consumer.poll(timeout_ms=100).values():
                found += burnguard_spans(records)
        if seen is not None:
            seen.append(time.monotonic() - started)
        # a little longer: a duplicate would show up as more than `expected`
        for records in consumer.poll(timeout_ms=1000).values():
            found += burnguard_spans(records)
    finally:
        consumer.close()
    return found


def run_app(pipeline: Pipeline, setup: str, end: str, server: FakeOpenAI) -> subprocess.Popen[str]:
    env = {
        **pipeline.env,
        "EXIT_APP_SETUP": setup,
        "EXIT_APP_END": end,
        "OTEL_SERVICE_NAME": "exit-app",
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "PYTHONWARNINGS": "ignore",
    }
    command = [sys.executable, str(APP)]
    if setup == "zero-code":
        command = [str(INSTRUMENT), *command]
    return subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["configure", "zero-code"])
@pytest.mark.parametrize("end", ["return", "sys.exit", "sigterm"])
def test_every_span_reaches_kafka_at_exit(pipeline: Pipeline, setup: str, end: str) -> None:
    with FakeOpenAI() as server:
        app = run_app(pipeline, setup, "wait" if end == "sigterm" else end, server)
        assert app.stdin is not None and app.stdout is not None and app.stderr is not None
        assert app.stdout.readline().strip() == "recorded 10", app.stderr.read()
        seen: list[float] = []
        assert burnguard_spans_on_topic(pipeline, 10, seen=seen) == 10  # one export happened
        # configure()'s default export delay is 100 ms, not the SDK's 5 s (late enforcement)
        assert seen[0] < 4.0
        app.stdin.write("go\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "recorded 20", app.stderr.read()
        if end == "sigterm":
            app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=30)
    assert app.returncode == (-signal.SIGTERM if end == "sigterm" else 0), stderr[-3000:]
    assert "could not" not in stderr and "already closed" not in stderr, stderr[-3000:]
    assert burnguard_spans_on_topic(pipeline, 20) == 20
