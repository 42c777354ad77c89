"""`burnguard notify` against the real broker and local HTTP receivers.

The notifier runs as its own process (`burnguard notify`) on the session's
Kafka broker; the signals are written to a real signal topic; the webhook and
Slack receivers are HTTP servers in this process that answer as each test
scripts them and record what they got. Signatures are checked with the
receiver's secret by the `standardwebhooks` library, as a receiver would.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from burnguard.contracts.budgets import BudgetFileError, parse_budget_yaml
from burnguard.contracts.signals import Signal
from burnguard.notify.messages import event_id, slack_text
from kafka import KafkaConsumer, KafkaProducer
from standardwebhooks import Webhook
from typer.testing import CliRunner

from burnguard.cli import app
from tests.factories import make_signal
from tests.fixtures.pipeline import Pipeline

SECRET = "whsec_" + base64.b64encode(b"burnguard-test-secret-0123456789").decode()
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers each path from its script (then 200)."""

    daemon_threads = True

    def __init__(self, port: int = 0, script: dict[str, list[int]] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.script = {path: deque(statuses) for path, statuses in (script or {}).items()}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def got(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(headers, body) for p, headers, body in self.requests if p == path]

    def wait_for(self, path: str, count: int, timeout_s: float = 30.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.got(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.got(path))} of {count} requests"
            time.sleep(0.05)
        return self.got(path)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            self.server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            script = self.server.script.get(self.path)
            status = script.popleft() if script else 200
        self.send_response(status)
        reply = b"ok" if status < 400 else b"no_service"
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def _signal(key: str, action: str, minute: int, budget: str = "daily") -> Signal:
    at = T0 + timedelta(minutes=minute)
    spent = {"ok": 10.0, "warn": 36.0, "downgrade": 43.0, "throttle": 51.5}[action]
    return make_signal(
        action,
        key=key,
        budget=budget,
        downgrade_to="standard" if action == "downgrade" else None,
        spent=spent,
        burn_rate_per_hour=6.0,
        projected_exhaustion=at + timedelta(hours=1) if action != "throttle" else at,
        issued_at=at,
        ttl=timedelta(minutes=1),
        reason=f"budget {budget} (tenant={key}): cost_usd {spent} of 50 -> {action}",
    )


class Notify:
    """One test's notifier processes and their shared log."""

    def __init__(self, pipeline: Pipeline, budgets: str, **env: str) -> None:
        self.pipeline = pipeline
        self.budgets = pipeline.root / "notify.yaml"
        self.budgets.write_text(budgets)
        self.env = {
            **pipeline.env,
            "BURNGUARD_NOTIFY_BACKOFF_S": "0.2",
            "BURNGUARD_NOTIFY_MAX_BACKOFF_S": "1",
            "HOOK_SECRET": SECRET,
            **env,
        }
        self.group = "notify-" + pipeline.topics.signals.rsplit(".", 1)[-1]
        pipeline.broker.create_topic(pipeline.topics.signals, partitions=2, compact=True)
        self.producer = KafkaProducer(bootstrap_servers=pipeline.broker.bootstrap, acks="all")

    def start(self, group: str | None = None) -> subprocess.Popen:
        before = len(self.log())
        log = (self.pipeline.root / "notify.log").open("ab")
        args = ["notify", "--budgets", str(self.budgets), "--group", group or self.group]
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "burnguard"), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.pipeline.processes.append(process)
        self.pipeline.wait_for_log("notify", "partitions [0, 1]", 60, process, after=before)
        return process

    def log(self) -> str:
        return self.pipeline.log("notify")

    def publish(self, *signals: Signal) -> None:
        for item in signals:
            self.producer.send(
                self.pipeline.topics.signals, key=item.kafka_key.encode(), value=item.to_json()
            )
        self.producer.flush()

    def stop(self, process: subprocess.Popen) -> int:
        return self.pipeline.stop(process)


def _verified(headers: dict[str, str], body: bytes) -> dict:
    """What a receiver does: verify the signature with its secret (raises if it does not match)."""
    return Webhook(SECRET).verify(body, headers)


HOOK_AND_SLACK = """
notify:
  destinations:
    - {{id: hook, type: webhook, url: "{url}/hook", secret_env: HOOK_SECRET}}
    - {{id: oncall, type: slack, url_env: SLACK_URL}}
  routes:
    - {{to: hook}}
    - {{to: oncall, actions: [throttle, ok], scope: tenant, budget: "dai*"}}
"""


@pytest.mark.slow
def test_changes_are_signed_retried_and_delivered_once_refreshes_are_not(pipeline: Pipeline) -> None:
    receiver = Receiver(script={"/hook": [500]})
    notify = Notify(pipeline, HOOK_AND_SLACK.format(url=receiver.url), SLACK_URL=f"{receiver.url}/slack")
    process = notify.start()
    actions = ["ok", "warn", "warn", "downgrade", "downgrade", "throttle", "throttle", "ok"]
    notify.publish(*[_signal("acme", action, minute) for minute, action in enumerate(actions)])
    notify.publish(_signal("globex", "ok", 0), _signal("globex", "ok", 1))  # never a change

    hook = receiver.wait_for("/hook", 5)  # the 500, its retry, then downgrade, throttle, ok
    slack = receiver.wait_for("/slack", 2)
    time.sleep(2)  # nothing more may come: refreshes and the initial ok are not changes
    assert len(receiver.got("/hook")) == 5 and len(receiver.got("/slack")) == 2
    assert notify.stop(process) == 0

    payloads = [_verified(headers, body) for headers, body in hook]
    ids = [headers["webhook-id"] for headers, _ in hook]
    assert ids[0] == ids[1], "a retry must carry the same webhook-id"
    assert len(set(ids)) == 4
    assert ids[1] == event_id(_signal("acme", "warn", 1))
    assert [p["data"]["action"] for p in payloads] == ["warn", "warn", "downgrade", "throttle", "ok"]
    assert [p["data"]["previous_action"] for p in payloads[1:]] == ["ok", "warn", "downgrade", "throttle"]
    assert {p["type"] for p in payloads} == {"burnguard.budget.state_changed"}
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()).verify(
            hook[0][1], hook[0][0]
        )

    texts = [json.loads(body)["text"] for _, body in slack]
    assert "*throttle* (was downgrade)" in texts[0] and "`daily`" in texts[0] and "`acme`" in texts[0]
    assert "spent $51.50 of $50.00 (103%)" in texts[0]
    assert "*ok* (was throttle)" in texts[1]
    assert all("webhook-signature" not in headers for headers, _ in slack)

    log = notify.log()
    assert "hook answered 500" in log and "retry 1 of " + ids[0] in log
    assert SECRET not in log and "/slack" not in log, "secrets (the Slack URL) must not be logged"


@pytest.mark.slow
def test_a_4xx_is_dead_lettered_with_status_and_reason_and_later_events_go_on(pipeline: Pipeline) -> None:
    receiver = Receiver(script={"/gone": [410] * 10})
    budgets = f"""
notify:
  destinations:
    - {{id: hook, type: webhook, url: "{receiver.url}/hook", secret_env: HOOK_SECRET}}
    - {{id: gone, type: webhook, url: "{receiver.url}/gone", secret_env: HOOK_SECRET}}
  routes:
    - {{to: gone, actions: [throttle]}}
    - {{to: hook}}
"""
    notify = Notify(pipeline, budgets)
    process = notify.start()
    notify.publish(_signal("acme", "warn", 0))
    topic = pipeline.topics.signals
    notify.producer.send(topic, key=b"tenant:acme@daily", value=b'{"not": "a signal"}')  # parked, not fatal
    notify.producer.send(topic, key=b"tenant:initech@daily", value=None)  # a removed budget: nothing to say
    notify.publish(*[_signal("acme", a, m) for m, a in enumerate(["throttle", "ok"], start=1)])

    hook = receiver.wait_for("/hook", 3)
    assert [_verified(h, b)["data"]["action"] for h, b in hook] == ["warn", "throttle", "ok"]
    consumer = KafkaConsumer(
        notify.env["BURNGUARD_TOPIC_NOTIFY_DEADLETTER"],
        bootstrap_servers=pipeline.broker.bootstrap,
        auto_offset_reset="earliest",
    )
    dead: list = []
    deadline = time.monotonic() + 20
    while len(dead) < 2 and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            dead.extend(batch)
    consumer.close()
    time.sleep(1)
    assert len(receiver.got("/gone")) == 1, "a 4xx must not be retried"
    assert len(dead) == 2
    garbage, dead = (
        [r for r in dead if r.value == b'{"not": "a signal"}'],
        [r for r in dead if r.value != b'{"not": "a signal"}'],
    )
    assert len(garbage) == 1 and "not a signal" in dict(garbage[0].headers)["burnguard.error"].decode()
    headers = {name: value.decode() for name, value in dead[0].headers}
    assert headers["burnguard.http_status"] == "410" and headers["burnguard.destination"] == "gone"
    assert "gone answered 410 Gone: no_service" in headers["burnguard.error"]
    assert headers["webhook-id"] == hook[1][0]["webhook-id"] == event_id(_signal("acme", "throttle", 1))
    assert json.loads(dead[0].value)["data"]["action"] == "throttle"
    assert dead[0].key == b"tenant:acme@daily"
    assert notify.stop(process) == 0


@pytest.mark.slow
def test_a_restart_sends_no_new_event_for_what_was_delivered(pipeline: Pipeline) -> None:
    """Killed between a delivery and its state write, the notifier sends that change again with the
    same `webhook-id` (the module's contract); a receiver drops it by id, as Standard Webhooks asks.
    No change is announced under a new id, and none is lost."""
    receiver = Receiver()
    notify = Notify(
        pipeline,
        HOOK_AND_SLACK.format(url=receiver.url),
        SLACK_URL=f"{receiver.url}/slack",
        # the killed notifier's partitions move on after 6 s (the broker's least), not kafka-python's 45 s
        BURNGUARD_NOTIFY_SESSION_TIMEOUT_S="6",
    )
    first = notify.start()
    notify.publish(_signal("acme", "warn", 1), _signal("acme", "downgrade", 2), _signal("initech", "warn", 3))
    receiver.wait_for("/hook", 3)
    first.send_signal(signal.SIGKILL)  # no goodbye: at most the change it was finishing is sent again
    first.wait(10)
    notify.publish(
        _signal("acme", "downgrade", 4), _signal("acme", "throttle", 5), _signal("initech", "warn", 6)
    )

    second = notify.start()
    receiver.wait_for("/hook", 4)
    time.sleep(2)
    by_id: dict[str, set[tuple[str, str]]] = {}
    for headers, body in receiver.got("/hook"):
        data = _verified(headers, body)["data"]
        by_id.setdefault(headers["webhook-id"], set()).add((data["key"], data["action"]))
    assert all(len(changes) == 1 for changes in by_id.values()), "a resend must be the same change"
    assert sorted(change for changes in by_id.values() for change in changes) == sorted(
        [("acme", "warn"), ("acme", "downgrade"), ("initech", "warn"), ("acme", "throttle")]
    )
    assert len(receiver.got("/slack")) == 1  # the throttle

    # a new group starts from the states that exist: none of them is news, the next change is
    notify.stop(second)
    before = len(receiver.got("/hook"))
    third = notify.start(group=notify.group + "-new")
    notify.publish(_signal("initech", "throttle", 7))
    receiver.wait_for("/hook", before + 1)
    time.sleep(2)
    assert len(receiver.got("/hook")) == before + 1
    assert _verified(*receiver.got("/hook")[-1])["data"]["key"] == "initech"
    assert notify.stop(third) == 0


@pytest.mark.slow
def test_a_destination_that_is_down_is_retried_until_it_is_up(pipeline: Pipeline) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    budgets = f"""
notify:
  destinations:
    - {{id: hook, type: webhook, url: "http://127.0.0.1:{port}/hook", secret_env: HOOK_SECRET}}
  routes:
    - {{to: hook}}
"""
    notify = Notify(pipeline, budgets)
    process = notify.start()
    notify.publish(_signal("acme", "warn", 1), _signal("acme", "throttle", 2))
    deadline = time.monotonic() + 20
    while notify.log().count("hook unreachable") < 2:
        assert time.monotonic() < deadline, notify.log()[-2000:]
        time.sleep(0.1)
    receiver = Receiver(port=port)
    hook = receiver.wait_for("/hook", 2)
    time.sleep(1.5)
    assert [_verified(h, b)["data"]["action"] for h, b in receiver.got("/hook")] == ["warn", "throttle"]
    assert len(hook) == 2
    assert notify.stop(process) == 0


# --- configuration and messages, without a broker ---------------------------------------


def test_notify_config_errors_name_file_line_and_field() -> None:
    text = """notify:
  destinations:
    - {id: hook, type: webhook, url: "http://x/hook", secret_env: HOOK_SECRET}
    - {id: oncall, type: slack, url_env: SLACK_URL}
  routes:
    - {to: oncall}
    - {to: [hook, pager], actions: [throttle]}
"""
    with pytest.raises(BudgetFileError) as error:
        parse_budget_yaml(text, "b.yaml")
    assert error.value.problems == [
        "b.yaml:7: notify.routes[1].to: no destination 'pager' (known: hook, oncall)"
    ]
    bad_slack = text.replace("url_env: SLACK_URL", 'url: "https://hooks.slack.com/services/T/B/x"')
    with pytest.raises(BudgetFileError, match=r"b.yaml:4: notify.destinations\[1\]: .*credential"):
        parse_budget_yaml(bad_slack, "b.yaml")
    with pytest.raises(BudgetFileError, match=r"b.yaml:3: notify.destinations\[0\]: .*secret_env"):
        parse_budget_yaml(text.replace(", secret_env: HOOK_SECRET", ""), "b.yaml")


def test_missing_secret_is_one_line_naming_the_variable_not_a_value(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(
        "notify:\n  destinations:\n    - {id: hook, type: webhook, url: 'http://127.0.0.1:9/x', "
        "secret_env: NOTIFY_TEST_SECRET}\n  routes:\n    - {to: hook}\n"
    )
    monkeypatch.delenv("NOTIFY_TEST_SECRET", raising=False)
    result = CliRunner().invoke(app, ["notify", "--budgets", str(path)], terminal_width=300)
    assert result.exit_code == 1
    assert "destination hook: environment variable NOTIFY_TEST_SECRET is not set" in result.output
    monkeypatch.setenv("NOTIFY_TEST_SECRET", "not base64 at all!")
    result = CliRunner().invoke(app, ["notify", "--budgets", str(path)], terminal_width=300)
    assert result.exit_code == 1 and "NOTIFY_TEST_SECRET is not a whsec_" in result.output
    assert "not base64 at all" not in result.output


def test_event_id_is_stable_and_slack_text_is_readable() -> None:
    throttle = _signal("acme", "throttle", 5)
    assert event_id(throttle) == event_id(Signal.from_json(throttle.to_json()))
    assert event_id(throttle) != event_id(_signal("acme", "throttle", 6))
    text = slack_text(_signal("acme", "downgrade", 3), "warn")
    assert text.startswith(":arrow_down: *downgrade* (was warn): budget `daily` for tenant `acme`")
    assert "spent $43.00 of $50.00 (86%), calls go to class `standard`" in text
    assert "limit projected at 2026-12-01 10:03 UTC (burn $6.00/h)" in text
    assert text.endswith("> budget daily (tenant=acme): cost_usd 43.0 of 50 -> downgrade")
