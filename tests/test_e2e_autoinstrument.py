"""Zero-code, end to end: `opentelemetry-instrument python example_app.py` with an unchanged app.

The example app only calls OpenAI and Anthropic (local API servers here). burnguard's pre-instrument hook
and instrumentors, found through entry points, send priced spans to the real broker; the real stream
worker accounts them against a per-service budget and publishes its signal with exactly the spend
the calls cost — once each, although the official OpenAI instrumentation, OpenLLMetry (installed in
the dev environment, so `opentelemetry-instrument` loads them too) and the Anthropic SDK's own
tracing record the same calls. Then, with BURNGUARD_ENFORCE=true, the same unchanged app is refused
before any request reaches the servers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from burnguard.contracts.pricing import PriceBook
from burnguard.contracts.signals import Signal

from tests.fakes import FakeAnthropic, FakeOpenAI
from tests.fixtures.pipeline import Pipeline, read_to_end

APP = Path(__file__).parent / "apps" / "example_app.py"
INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
SERVICE = "example-app"


def expected_spend() -> float:
    prices = PriceBook()
    gpt = prices.price("gpt-4.1", "openai", input_tokens=120, output_tokens=30)
    claude = prices.price("claude-sonnet-4-5", "anthropic", input_tokens=100, output_tokens=25)
    assert gpt and claude
    return 2 * gpt + claude


def service_signals(pipeline: Pipeline) -> list[Signal]:
    signals = [
        Signal.from_json(r.value)
        for r in read_to_end(pipeline.broker.bootstrap, pipeline.topics.signals)
        if r.value
    ]
    return [s for s in signals if s.scope == "service" and s.key == SERVICE]


def run_app(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTRUMENT), sys.executable, str(APP)], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_unchanged_app_is_accounted_then_enforced(pipeline: Pipeline) -> None:
    spend = expected_spend()
    pipeline.write_budgets(f"""
budgets:
  - id: service-daily
    scope: service
    match: {SERVICE}
    window: day
    limit: {spend / 1.25!r}
    actions:
      - {{at: 0.5, do: warn}}
      - {{at: 1.0, do: throttle}}
""")
    # The worker starts while the unenforced app runs (its spans wait on the topic, read from the start).
    with ThreadPoolExecutor(1) as starter, FakeOpenAI() as openai_server, FakeAnthropic() as anthropic_server:
        worker_ready = starter.submit(pipeline.start_worker)
        env = {
            **pipeline.env,
            "OTEL_SERVICE_NAME": SERVICE,
            "OPENAI_BASE_URL": openai_server.base_url,
            "OPENAI_API_KEY": "test",
            "ANTHROPIC_BASE_URL": anthropic_server.base_url,
            "ANTHROPIC_API_KEY": "test",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("BURNGUARD_ENFORCE", None)
        done = run_app(env)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "openai: Hello" in done.stdout and "anthropic: Hello" in done.stdout
        assert openai_server.models == ["gpt-4.1", "gpt-4.1"] and anthropic_server.models == [
            "claude-sonnet-4-5"
        ]
        worker_ready.result()

        deadline = time.monotonic() + 90
        signals: list[Signal] = []
        while time.monotonic() < deadline:
            signals = service_signals(pipeline)
            if any(s.action == "throttle" for s in signals):
                break
            time.sleep(0.5)
        assert signals, pipeline.log("worker")[-3000:]
        last = signals[-1]
        assert last.budget == "service-daily" and last.action == "throttle"
        # once each: a double-counted call would show up as 1.5x or 2x the spend
        assert last.spent == pytest.approx(spend, rel=1e-6)

        refused = run_app({**env, "BURNGUARD_ENFORCE": "true", "BURNGUARD_GUARD_WAIT_S": "10"})
        assert refused.returncode != 0
        assert "BudgetExceeded" in refused.stderr and "service-daily" in refused.stderr
        assert len(openai_server.requests) == 2 and len(anthropic_server.requests) == 1  # nothing new
