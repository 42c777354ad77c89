"""Enforcement with the defaults a user gets, end to end (issue 16).

A zero-code app (`opentelemetry-instrument`, BURNGUARD_ENFORCE=true, no export-delay setting, so
`configure()`'s default) calls `gpt-4.1` four times a second against a local OpenAI server for
about 50 s; the real worker accounts its spans against a $1/day service budget that downgrades to
`standard` at 80% (the usual escalation) and throttles at the limit, refreshing its signal every
5 s. Precision is two-sided: the downgrade rung is not skipped, no call is refused while it still
fits, and past the limit no call gets through (beyond the overshoot bound).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from burnguard.contracts.pricing import PriceBook
from burnguard.instrumentation.runtime import DEFAULT_EXPORT_DELAY_MS
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.factories import LADDER_YAML
from tests.fakes import FakeOpenAI
from tests.fixtures.pipeline import Pipeline

APP = Path(__file__).parent / "apps" / "paced_app.py"
INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
SERVICE = "paced-app"
#: $0.00936 a call on gpt-4.1, $0.001872 on gpt-4.1-mini: 86 calls to the downgrade, ~107 after it.
INPUT_TOKENS, OUTPUT_TOKENS = 2_600, 520
CALLS_PER_SECOND = 4
#: The downgrade rung, as a share of the limit. At 80% rather than half, the app reaches the limit in
#: ~48 s of calls instead of ~80 s, and still crosses both rungs with calls in flight: at least 53
#: calls on the cheaper model before the limit (its last 10% of the limit, past the downgrade bound).
DOWNGRADE_AT = 0.8
#: The export-delay test's app makes this many calls, four seconds apart.
CALLS_APART = 3
LIMIT = 1.0


def call_cost(model: str) -> float:
    cost = PriceBook().price(model, "openai", input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS)
    assert cost
    return cost


def run_paced_app(pipeline: Pipeline, server: FakeOpenAI, calls: int) -> list[str]:
    """Run the app beside a starting worker: it starts up meanwhile (its imports and guard take
    longer than the worker's start) and makes its first call once the worker is ready."""
    gate = pipeline.root / "worker-ready"
    env = {
        **pipeline.env,
        "OTEL_SERVICE_NAME": SERVICE,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "PYTHONWARNINGS": "ignore",
        "BURNGUARD_ENFORCE": "true",
        "BURNGUARD_GUARD_WAIT_S": "10",
        "PACED_INPUT_TOKENS": str(INPUT_TOKENS),
        "PACED_OUTPUT_TOKENS": str(OUTPUT_TOKENS),
        "PACED_START_FILE": str(gate),
    }
    env.pop("OTEL_BSP_SCHEDULE_DELAY", None)  # the default a user gets
    app = subprocess.Popen(
        [str(INSTRUMENT), sys.executable, str(APP), str(calls), str(CALLS_PER_SECOND)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pipeline.start_worker()
        gate.touch()
        stdout, stderr = app.communicate(timeout=calls / CALLS_PER_SECOND + 120)
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()
    assert app.returncode == 0, stderr[-4000:]
    return stdout.splitlines()


@pytest.mark.slow
def test_downgraded_calls_run_up_to_the_limit_and_none_past_it(pipeline: Pipeline) -> None:
    premium, standard = call_cost("gpt-4.1"), call_cost("gpt-4.1-mini")
    pipeline.write_budgets(
        LADDER_YAML
        + f"""
budgets:
  - id: service-daily
    scope: service
    match: {SERVICE}
    window: day
    limit: {LIMIT}
    actions:
      - {{at: {DOWNGRADE_AT}, do: downgrade, to: standard}}
      - {{at: 1.0, do: throttle}}
"""
    )
    with FakeOpenAI() as server:
        lines = run_paced_app(pipeline, server, calls=600)
    models = server.models
    first_refusal = next((i for i, line in enumerate(lines) if line.startswith("refused")), None)
    assert first_refusal is not None, f"never refused after {len(models)} calls"
    assert "service-daily" in lines[first_refusal]
    made = [line.split()[1] for line in lines[:first_refusal]]
    dear = made.count("gpt-4.1")
    spent = dear * premium + (len(made) - dear) * standard
    seen = f"{dear} x gpt-4.1, {len(made) - dear} x gpt-4.1-mini, then {lines[first_refusal:]}"
    # No refusal while a call still fitted (undershoot), and past the limit no more than the overshoot
    # bound (bench/overshoot.py: 1% of the limit or one call per caller): a call whose span had not
    # reached the worker when a refresh was issued is in neither its `spent` nor the guard's own use.
    assert spent >= LIMIT, f"first refused at ${spent:.6f} of ${LIMIT}: {seen}"
    assert spent < LIMIT + max(0.01 * LIMIT, standard), f"first refused at ${spent:.6f}: {seen}"
    assert all(line.startswith("refused") for line in lines[first_refusal:]), seen
    assert models == made  # a refused call never reached the server
    # The downgrade rung was not skipped: gpt-4.1 until past its share of the limit (by what the enforcement
    # latency lets through at 4 calls/s: a 2.5 s latency is 10 calls, $0.09), then gpt-4.1-mini.
    assert made == ["gpt-4.1"] * dear + ["gpt-4.1-mini"] * (len(made) - dear)
    assert DOWNGRADE_AT * LIMIT <= dear * premium < (DOWNGRADE_AT + 0.1) * LIMIT, seen


def start_three_call_app(
    pipeline: Pipeline, server: FakeOpenAI, service: str, delay_env: dict[str, str]
) -> subprocess.Popen[str]:
    """The zero-code app as `service`, making three calls four seconds apart (configure()'s default
    export delay when `delay_env` is empty, else the delay it sets)."""
    env = {
        **pipeline.env,
        "OTEL_SERVICE_NAME": service,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "test",
        "PYTHONWARNINGS": "ignore",
        "BURNGUARD_ENFORCE": "true",
        **delay_env,
    }
    if not delay_env:
        env.pop("OTEL_BSP_SCHEDULE_DELAY", None)
    return subprocess.Popen(
        [str(INSTRUMENT), sys.executable, str(APP), str(CALLS_APART), "0.25"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def exported_spans(pipeline: Pipeline, delay_envs: dict[str, dict[str, str]]) -> dict[str, dict[int, float]]:
    """Run the zero-code app once per service of `delay_envs`, side by side; per service, its
    calls' spans: end (ns) -> when it reached Kafka (the record's LogAppendTime, s)."""
    with FakeOpenAI() as server:
        apps = {
            service: start_three_call_app(pipeline, server, service, env)
            for service, env in delay_envs.items()
        }
        for app in apps.values():
            _, stderr = app.communicate(timeout=120)
            assert app.returncode == 0, stderr[-4000:]
    consumer = KafkaConsumer(
        pipeline.topics.spans, bootstrap_servers=pipeline.broker.bootstrap, auto_offset_reset="earliest"
    )
    # span end (ns) -> record time (s), for burnguard's spans, per service
    arrived: dict[str, dict[int, float]] = {service: {} for service in delay_envs}
    deadline = time.monotonic() + 30
    try:  # every app has exited, so its spans are on the topic: read until all are found
        while any(len(spans) < CALLS_APART for spans in arrived.values()) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    collect_spans(record, arrived)
    finally:
        consumer.close()
    assert all(len(spans) == CALLS_APART for spans in arrived.values()), arrived
    return arrived


def collect_spans(record: ConsumerRecord, arrived: dict[str, dict[int, float]]) -> None:
    """Note the end time of each burnguard span in `record` of a service of `arrived`."""
    for resource_spans in ExportTraceServiceRequest.FromString(record.value).resource_spans:
        names = [a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"]
        if len(names) != 1 or names[0] not in arrived:
            continue
        for scope_spans in resource_spans.scope_spans:
            if scope_spans.scope.name == "burnguard.instrumentation":
                arrived[names[0]].update(
                    (span.end_time_unix_nano, record.timestamp / 1000) for span in scope_spans.spans
                )


@pytest.mark.slow
def test_zero_code_enforcement_exports_an_idle_apps_span_at_once_and_paces_by_the_users_delay(
    pipeline: Pipeline,
) -> None:
    user_delay = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}
    spans = exported_spans(pipeline, {"default-delay": {}, "user-delay": user_delay})
    # Calls 4 s apart find the last export older than configure()'s delay: each goes at once (the
    # SDK's timer made each wait up to the delay, its own default 5 s up to the exit flush).
    for end_ns, arrived_s in spans["default-delay"].items():
        assert arrived_s - end_ns / 1e9 < DEFAULT_EXPORT_DELAY_MS / 1000 + 1.5, spans["default-delay"]
    # The user's delay is the least time between two exports: the first call's span goes at once
    # (the app was idle), the second, 4 s later, waits for the exit flush after the third.
    first, second, third = sorted(spans["user-delay"])
    assert spans["user-delay"][first] - first / 1e9 < 1.5, spans["user-delay"]
    assert spans["user-delay"][second] >= third / 1e9 - 0.001, spans["user-delay"]  # record times are in ms
