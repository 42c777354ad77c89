"""The Go signal subscriber (examples/signal-subscriber) against the real broker and worker.

The worker turns spans into signals on the compacted topic; the Go service replays that topic,
validates every record against contracts/signal.schema.json and answers "may this
tenant/feature call this model class now?". Its answers must equal the Python BudgetGuard's
decision by signals for the same signals: at start (the replayed state), after a live change,
after a tombstone, and with records that the schema (and the Python model) refuse.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.signals import SCHEMA_PATH, Signal
from burnguard.deploy import gobuild
from burnguard.instrumentation.guard import BudgetGuard
from kafka import KafkaProducer

from burnguard.cli.devstack import terminate
from tests.factories import LADDER_YAML, WARN_DOWNGRADE_THROTTLE, budget, budgets_yaml, make_signal
from tests.fixtures.pipeline import Pipeline
from tests.support.otlp_batches import otlp_batch

BUDGETS = budgets_yaml(
    budget("tenant-tokens", 1000, metric="tokens", actions=WARN_DOWNGRADE_THROTTLE),
    budget("umbrella-features", 100, scope="tenant+feature", match="umbrella/*", metric="tokens"),
    budget("premium-tokens", 100, scope="tenant+model_class", match="*/premium", metric="tokens"),
    head=LADDER_YAML,
)
MODELS = {"gpt-4.1": "premium", "gpt-4.1-mini": "standard"}
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "tomb-co", "nobody")
FEATURES = ("chat", "search")


class GoSubscriber:
    """The built example, started on a free port; its log is read for the address and readiness."""

    def __init__(self, binary: Path, pipeline: Pipeline, log: Path) -> None:
        self.log = log
        command = [
            str(binary),
            "-brokers",
            pipeline.broker.bootstrap,
            "-topic",
            pipeline.topics.signals,
            "-schema",
            str(SCHEMA_PATH),
            "-listen",
            "127.0.0.1:0",
        ]
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self.url = "http://" + self._wait_for(r"listening on http://(\S+)")
        self._wait_for(r"ready: replayed")

    def _wait_for(self, pattern: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while (found := re.search(pattern, self.log.read_text(errors="replace"))) is None:
            assert self.process.poll() is None, f"the subscriber exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        return found.group(1) if found.groups() else found.group(0)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def decide(self, tenant: str, feature: str, model_class: str) -> dict:
        return self.get(f"/decide?tenant={tenant}&feature={feature}&model_class={model_class}")

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process.pid, 10)
        self.process.wait(10)


#: A fresh machine builds the subscriber first (Go modules from the proxy) inside the test's setup.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def subscriber_binary() -> Path:
    return gobuild.build("subscriber")


@pytest.fixture
def guard(pipeline: Pipeline) -> Iterator[BudgetGuard]:
    guard = BudgetGuard(pipeline.kafka, pipeline.topics, parse_budget_yaml(BUDGETS), fail_mode="open")
    yield guard
    guard.stop()


def python_answer(guard: BudgetGuard, tenant: str, feature: str, model: str) -> tuple:
    """The guard's decision by signals, in the Go service's terms."""
    decision = guard.check_signals(model, {"tenant": tenant, "feature": feature})
    if decision.action == "downgrade":
        assert decision.model is not None
        return ("downgrade", MODELS[decision.model], decision.signal.budget)
    return (decision.action, None, decision.signal.budget if decision.action == "deny" else None)


def go_answer(answer: dict) -> tuple:
    budget = answer.get("budget") if answer["action"] != "allow" else None
    assert answer["may_call"] == (answer["action"] == "allow")
    return (answer["action"], answer.get("downgrade_to"), budget)


def compare(subscriber: GoSubscriber, guard: BudgetGuard) -> dict[tuple, tuple]:
    """Both answers for every tenant, feature and model; they must agree. Returns the answers."""
    answers = {}
    for tenant in TENANTS:
        for feature in FEATURES:
            for model, model_class in MODELS.items():
                mine = go_answer(subscriber.decide(tenant, feature, model_class))
                assert mine == python_answer(guard, tenant, feature, model), (tenant, feature, model)
                answers[(tenant, feature, model_class)] = mine
    return answers


def wait_until(check, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def manual_signal(key: str, action: str) -> Signal:
    now = datetime.now(UTC)
    return make_signal(
        action,
        key=key,
        budget="manual",
        spent=2.0,
        limit=1.0,
        issued_at=now,
        ttl=timedelta(hours=1),
        window_start=now - timedelta(hours=1),
        window_end=now + timedelta(hours=1),
    )


@pytest.mark.slow
def test_go_subscriber_answers_as_the_python_guard(
    pipeline: Pipeline, guard: BudgetGuard, subscriber_binary: Path, tmp_path: Path
) -> None:
    pipeline.write_budgets(BUDGETS)
    pipeline.start_worker()
    producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap)
    for tenant, feature, tokens, model in [
        ("acme", "chat", 850, "gpt-4.1-mini"),  # tenant at 0.85: downgrade to standard
        ("globex", "chat", 1200, "gpt-4.1-mini"),  # tenant over: throttle
        ("initech", "chat", 600, "gpt-4.1-mini"),  # tenant at 0.6: warn (allowed)
        ("umbrella", "search", 150, "gpt-4.1-mini"),  # umbrella/search throttled, umbrella/chat not
        ("hooli", "chat", 150, "gpt-4.1"),  # hooli's premium class throttled, standard allowed
    ]:
        producer.send(pipeline.topics.spans, otlp_batch(tenant, [(feature, tokens, 0)], model=model))
    producer.flush()
    for key, action in [
        ("acme", "downgrade"),
        ("globex", "throttle"),
        ("initech", "warn"),
        ("umbrella/search", "throttle"),
        ("hooli/premium", "throttle"),
    ]:
        pipeline.wait_for_signal(
            lambda s, k=key, a=action: (s.key, s.action) == (k, a), f"{key} {action}", 60
        )

    guard.start(wait_s=30)
    subscriber = GoSubscriber(subscriber_binary, pipeline, tmp_path / "subscriber.log")  # replays the topic
    try:
        answers = compare(subscriber, guard)
        assert answers[("acme", "chat", "premium")] == ("downgrade", "standard", "tenant-tokens")
        assert answers[("acme", "chat", "standard")] == ("allow", None, None)  # already on the cheaper class
        assert answers[("globex", "search", "standard")] == ("deny", None, "tenant-tokens")
        assert answers[("initech", "chat", "premium")] == ("allow", None, None)
        assert answers[("umbrella", "search", "premium")] == ("deny", None, "umbrella-features")
        assert answers[("umbrella", "chat", "premium")] == ("allow", None, None)
        assert answers[("hooli", "chat", "premium")] == ("deny", None, "premium-tokens")
        assert answers[("hooli", "chat", "standard")] == ("allow", None, None)

        # Live: initech crosses its limit; both follow the topic to the same answer.
        producer.send(pipeline.topics.spans, otlp_batch("initech", [("chat", 500, 0)], model="gpt-4.1-mini"))
        producer.flush()
        wait_until(
            lambda: subscriber.decide("initech", "chat", "premium")["action"] == "deny", "initech denied"
        )
        wait_until(lambda: python_answer(guard, "initech", "chat", "gpt-4.1")[0] == "deny", "guard denies")

        # Records the schema refuses are rejected alone; a tombstone removes a key's signal.
        bad = manual_signal("acme", "throttle").model_dump(mode="json")
        producer.send(
            pipeline.topics.signals,
            key=b"tenant:acme@bad-action",
            value=json.dumps(bad | {"action": "explode"}).encode(),
        )
        producer.send(
            pipeline.topics.signals,
            key=b"tenant:acme@bad-time",
            value=json.dumps(bad | {"expires_at": "soon"}).encode(),
        )
        producer.send(
            pipeline.topics.signals,
            key=b"tenant:tomb-co@manual",
            value=manual_signal("tomb-co", "throttle").to_json(),
        )
        producer.flush()
        wait_until(lambda: subscriber.get("/stats")["rejected"] == 2, "two rejections")
        wait_until(
            lambda: subscriber.decide("tomb-co", "chat", "standard")["action"] == "deny", "tomb-co denied"
        )
        wait_until(
            lambda: (
                guard.stats.malformed_signals == 2
                and guard.check_signals(None, {"tenant": "tomb-co"}).action == "deny"
            ),
            "guard",
        )
        compare(subscriber, guard)
        log = subscriber.log.read_text()
        assert (
            'rejected signal "tenant:acme@bad-action"' in log
            and 'rejected signal "tenant:acme@bad-time"' in log
        )

        producer.send(pipeline.topics.signals, key=b"tenant:tomb-co@manual", value=None)
        producer.flush()
        wait_until(lambda: subscriber.decide("tomb-co", "chat", "standard")["action"] == "allow", "tombstone")
        wait_until(
            lambda: guard.check_signals(None, {"tenant": "tomb-co"}).action == "allow", "guard tombstone"
        )
        final = compare(subscriber, guard)
        assert final[("initech", "chat", "standard")] == ("deny", None, "tenant-tokens")
    finally:
        subscriber.stop()
        producer.close()

    # A restarted subscriber replays the compacted topic to the same state.
    again = GoSubscriber(subscriber_binary, pipeline, tmp_path / "subscriber-again.log")
    try:
        assert compare(again, guard) == final
    finally:
        again.stop()
