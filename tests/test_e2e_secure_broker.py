"""The locked control plane: SASL_SSL (SCRAM-SHA-512 over TLS) and the KRaft StandardAuthorizer.

One real broker for the module, with a user per component (`app`, `worker`, `sink`,
`admin`) and the ACL set of `contracts.acls`. The whole loop runs over it (app ->
worker -> signal -> guard, and the sink into chDB), each process with only its own
credentials, given through the environment. The app may not forge a signal or raise
a limit, a wrong password ends a start-up with a clear error within seconds, and no
password appears in any log of the run or on any command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from burnguard.contracts.acls import PRINCIPALS, acl_set
from burnguard.contracts.budgets import parse_budget_yaml
from burnguard.contracts.topics import KafkaSettings, Topics, check_connection
from burnguard.deploy.kafka import KafkaBroker
from burnguard.deploy.kafka.security import SUPER_USER, BrokerSecurity
from burnguard.instrumentation import Settings
from burnguard.instrumentation.guard import BudgetGuard
from burnguard.instrumentation.runtime import reset_runtime
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import SaslAuthenticationFailedError, TopicAuthorizationFailedError
from typer.testing import CliRunner

import burnguard
from burnguard.cli import app as cli
from burnguard.cli.devstack import wait_until_consumed
from tests.factories import budget, budgets_yaml
from tests.fixtures.pipeline import Pipeline, _pipeline_on, _stop_all

pytestmark = pytest.mark.slow

BUDGETS = budgets_yaml(
    budget("tenant-daily", 0.05, match="*", window="day", actions=[{"at": 1.0, "do": "throttle"}])
)
INPUT_TOKENS, OUTPUT_TOKENS = 2_000, 500  # gpt-4.1: $0.008 a call


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(
        tmp_path_factory.mktemp("secure-kafka"), security=BrokerSecurity.generate(PRINCIPALS)
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def secure_pipeline(secure_broker: KafkaBroker, tmp_path: Path) -> Iterator[Pipeline]:
    """Topics of this test, with the ACL set applied for them by the broker's super user (the CLI)."""
    pipe = _pipeline_on(secure_broker, tmp_path)
    result = CliRunner().invoke(
        cli, ["kafka", "acls", "--apply"], env={**pipe.env, **env_of(secure_broker, SUPER_USER)}
    )
    assert result.exit_code == 0, result.output
    assert f"applied {len(acl_set(pipe.topics, 'a', 'b'))} ACLs" in result.output
    try:
        yield pipe
    finally:
        _stop_all(pipe)


def security(broker: KafkaBroker) -> BrokerSecurity:
    assert broker.security is not None
    return broker.security


def env_of(broker: KafkaBroker, user: str) -> dict[str, str]:
    """What a component running as `user` gets: credentials in its environment only."""
    return security(broker).client_env(broker.data_dir, user)


def settings_of(broker: KafkaBroker, user: str, monkeypatch: pytest.MonkeyPatch) -> KafkaSettings:
    """Kafka settings as a client reads them: from BURNGUARD_KAFKA_* variables."""
    for name, value in env_of(broker, user).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BURNGUARD_KAFKA_BOOTSTRAP", broker.bootstrap)
    return KafkaSettings.from_env()


def secrets_of(broker: KafkaBroker) -> list[str]:
    keystore = BrokerSecurity.tls_dir(broker.data_dir) / "keystore.password"
    return [*security(broker).users.values(), keystore.read_text().strip()]


def assert_no_secret_on_command_lines(pids: list[int], secrets: list[str]) -> int:
    """Scan /proc/<pid>/cmdline of the processes this test started; return how many were read."""
    read = 0
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        read += 1
        for secret in secrets:
            assert secret not in cmdline, f"a password is on the command line of pid {pid}"
    return read


def assert_no_secret_in_files(paths: list[Path], secrets: list[str]) -> None:
    for path in paths:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a password is in {path}"


def super_consumer(broker: KafkaBroker, topic: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic, **broker.client_config(), auto_offset_reset="earliest", consumer_timeout_ms=3000
    )


def spend(calls: list[str]) -> None:
    """One instrumented call of $0.008; the guard raises BudgetExceeded before it once throttled."""
    with (
        burnguard.attribute(tenant="acme", workflow="secure"),
        burnguard.llm_call("gpt-4.1", "openai") as call,
    ):
        call.set_usage(INPUT_TOKENS, OUTPUT_TOKENS)
    calls.append(call.model)


def started_from_a_checkpoint(kafka: KafkaSettings, topics: Topics) -> BudgetGuard:
    """A guard started once the worker has written a signal checkpoint (it writes one a second here)."""
    deadline = time.monotonic() + 30
    while True:
        guard = BudgetGuard(kafka, topics, parse_budget_yaml(BUDGETS)).start(wait_s=30)
        if guard.stats.checkpoint_partitions or time.monotonic() > deadline:
            return guard
        guard.stop()
        time.sleep(1.0)


def test_whole_loop_over_sasl_ssl_with_acls(
    secure_pipeline: Pipeline, secure_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, broker = secure_pipeline, secure_broker
    secrets = secrets_of(broker)
    budgets_file = pipe.root / "budgets.yaml"
    budgets_file.write_text(BUDGETS)
    started: list[int] = [broker.pid or 0]

    # The admin publishes the budgets (creating the topic) with the real CLI.
    admin = subprocess.Popen(
        [str(Path(sys.executable).with_name("burnguard")), "budgets", "apply", str(budgets_file)],
        env={**pipe.env, **env_of(broker, "admin")},
        stdout=(pipe.root / "admin.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    assert_no_secret_on_command_lines([admin.pid], secrets)
    assert admin.wait(120) == 0, pipe.log("admin")

    worker = pipe.start_worker(timeout=120, env=env_of(broker, "worker"))
    sink = pipe.start_sink(env=env_of(broker, "sink"))
    started += [worker.pid, sink.pid]

    settings = Settings(kafka=settings_of(broker, "app", monkeypatch), topics=pipe.topics, enforce=True)
    runtime = burnguard.configure(settings, budgets=parse_budget_yaml(BUDGETS), set_global=False)
    calls: list[str] = []
    refused = None
    try:
        deadline = time.monotonic() + 90
        while refused is None and time.monotonic() < deadline:
            try:
                spend(calls)
            except burnguard.BudgetExceeded as exc:
                refused = exc
            time.sleep(0.2)
        assert refused is not None, f"never throttled; worker log:\n{pipe.log('worker')[-3000:]}"
        # The broker, worker, sink and this test process (the app) while they all run.
        assert assert_no_secret_on_command_lines([os.getpid(), *started], secrets) == 4
    finally:
        runtime.flush()
        runtime.shutdown()
        reset_runtime()

    assert refused.signal.action == "throttle" and refused.limit == 0.05
    assert runtime.exporter.stats.spans_failed == 0 and runtime.exporter.stats.spans_dropped == 0
    # The worker may follow the signals and write checkpoints; the app may read them (checked once
    # the app has stopped exporting: a guard's TLS start-ups beside it slowed its sends past 0.2 s).
    guard = started_from_a_checkpoint(settings.kafka, pipe.topics)
    try:
        assert guard.stats.checkpoint_partitions > 0, pipe.log("worker")[-3000:]
        assert guard.check(attribution={"tenant": "acme"}).action == "deny"
    finally:
        guard.stop()
    lag = wait_until_consumed(
        broker.bootstrap,
        pipe.env["BURNGUARD_SINK_GROUP"],
        [pipe.topics.spans, pipe.topics.signals],
        client=broker.client_config(),
    )
    assert lag == 0, pipe.log("sink")[-3000:]
    assert pipe.stop(sink) == 0
    stored = pipe.clickhouse_query("queries.span_count(client)")
    assert stored == len(calls) + 1  # every call, and the refused one on record
    assert worker.poll() is None
    pipe.stop(worker)

    logs = [*pipe.root.glob("*.log"), broker.log_path]
    assert {path.name for path in logs} >= {"admin.log", "worker.log", "sink.log", "broker.log"}
    assert_no_secret_in_files(logs, secrets)


def test_app_may_not_write_signals_checkpoints_or_budgets(
    secure_pipeline: Pipeline, secure_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, broker = secure_pipeline, secure_broker
    control = (pipe.topics.signals, pipe.topics.signal_checkpoints, pipe.topics.budgets)
    for topic in control:
        broker.create_topic(topic, compact=True)
    app = settings_of(broker, "app", monkeypatch)
    producer = KafkaProducer(**app.kafka_python_config(), max_block_ms=10_000)
    try:
        producer.send(pipe.topics.spans, b"a span").get(timeout=15)  # what the app may do
        for topic in control:
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send(topic, key=b"acme", value=b'{"action": "ok"}').get(timeout=15)
            assert time.monotonic() - started < 5
    finally:
        producer.close()
    for topic in control:
        consumer = super_consumer(broker, topic)
        try:
            assert [record.value for record in consumer] == [], f"a forged record reached {topic}"
        finally:
            consumer.close()


def test_notify_may_keep_its_state_but_not_write_signals(
    secure_pipeline: Pipeline, secure_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, broker = secure_pipeline, secure_broker
    for topic in (pipe.topics.signals, pipe.topics.notify_state):
        broker.create_topic(topic, compact=True)
    broker.create_topic(pipe.topics.notify_deadletter)
    notify = settings_of(broker, "notify", monkeypatch)
    producer = KafkaProducer(**notify.kafka_python_config(), max_block_ms=10_000)
    try:
        for topic in (pipe.topics.notify_state, pipe.topics.notify_deadletter):  # what notify may do
            producer.send(topic, key=b"burnguard-notify|tenant:acme@daily", value=b"{}").get(timeout=15)
        for topic in (pipe.topics.signals, pipe.topics.budgets, pipe.topics.spans):
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send(topic, key=b"acme", value=b'{"action": "ok"}').get(timeout=15)
    finally:
        producer.close()


def test_wrong_password_fails_fast_with_a_clear_error(
    secure_pipeline: Pipeline, secure_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, broker = secure_pipeline, secure_broker
    wrong = "not-the-sink-password-1234"
    bad_env = {**env_of(broker, "sink"), "BURNGUARD_KAFKA_SASL_PASSWORD": wrong}

    # Each refused client waits out its 10 s check: the sink, the worker, the CLI and this process's
    # own check run side by side.
    sink = pipe.start_sink(env=bad_env)
    worker = pipe._spawn("burnguard.stream", "worker", {**bad_env, "BURNGUARD_KAFKA_SASL_USERNAME": "worker"})
    admin_env = {**pipe.env, **env_of(broker, "admin"), "BURNGUARD_KAFKA_SASL_PASSWORD": wrong}
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("burnguard")), "budgets", "list"],
        env=admin_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert_no_secret_on_command_lines([sink.pid, worker.pid, cli.pid], [wrong, *secrets_of(broker)])

    settings = settings_of(broker, "app", monkeypatch)
    monkeypatch.setenv("BURNGUARD_KAFKA_SASL_PASSWORD", wrong)
    started = time.monotonic()
    with pytest.raises(SaslAuthenticationFailedError, match=r"user 'app' .*wrong password") as failure:
        check_connection(KafkaSettings.from_env(), timeout_s=10)
    assert time.monotonic() - started < 15
    check_connection(settings, timeout_s=10)  # the right password passes the same check
    assert wrong not in str(failure.value)

    assert sink.wait(timeout=60) == 2
    assert worker.wait(timeout=60) != 0
    assert "user 'sink' (SCRAM-SHA-512): wrong password" in pipe.log("sink")
    assert "user 'worker' (SCRAM-SHA-512): wrong password" in pipe.log("worker")
    output, _ = cli.communicate(timeout=60)
    assert cli.returncode == 2, output
    assert "user 'admin' (SCRAM-SHA-512): wrong password" in output and "Traceback" not in output
    assert wrong not in output
    assert_no_secret_in_files([*pipe.root.glob("*.log"), broker.log_path], [wrong, *secrets_of(broker)])


def test_broker_secrets_are_in_owner_only_files(secure_broker: KafkaBroker) -> None:
    data_dir = secure_broker.data_dir
    for path in (secure_broker.properties_path, BrokerSecurity.tls_dir(data_dir) / "keystore.password"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert BrokerSecurity.tls_dir(data_dir).stat().st_mode & 0o077 == 0
    assert not (BrokerSecurity.tls_dir(data_dir) / "format.args").exists()
    properties = secure_broker.properties_path.read_text()
    assert "org.apache.kafka.metadata.authorizer.StandardAuthorizer" in properties
    assert "SASL_SSL://127.0.0.1" in properties and "PLAINTEXT://" not in properties


def test_dev_up_secure_starts_a_locked_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "stack"
    burnguard_cli = str(Path(sys.executable).with_name("burnguard"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("BURNGUARD_")}
    up = subprocess.run(
        [burnguard_cli, "dev", "up", "--secure", "--state-dir", str(state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        stack = json.loads((state_dir / "stack.json").read_text())
        assert stack["secure"] is True
        passwords = [path.read_text().strip() for path in (state_dir / "secrets").glob("*.password")]
        password_count = len(passwords)  # not the list: a failing assert would print the secrets
        assert password_count == len(PRINCIPALS) + 1  # each principal and the broker
        passwords.append((state_dir / "kafka" / "tls" / "keystore.password").read_text().strip())
        broker = KafkaBroker.from_state(state_dir / "kafka")
        assert broker is not None and broker.pid is not None
        pids = [stack["worker_pid"], stack["sink_pid"], broker.pid]
        assert assert_no_secret_on_command_lines(pids, passwords) == 3
        app_env = state_dir / "secrets" / "app.env"
        assert app_env.stat().st_mode & 0o077 == 0
        for line in app_env.read_text().splitlines():
            name, value = line.split("=", 1)
            monkeypatch.setenv(name, value)
        app = KafkaSettings.from_env()
        assert (app.security_protocol, app.sasl_username) == ("SASL_SSL", "app")
        producer = KafkaProducer(**app.kafka_python_config(), max_block_ms=10_000)
        try:
            producer.send("otlp_spans", b"a span").get(timeout=15)
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send("burnguard.signals", key=b"acme", value=b"{}").get(timeout=15)
        finally:
            producer.close()
        logs = [*(state_dir / "logs").glob("*.log"), state_dir / "kafka" / "broker.log"]
        assert_no_secret_in_files(logs, passwords)
        assert "Ready" in (state_dir / "logs" / "worker.log").read_text()
    finally:
        down = subprocess.run(
            [burnguard_cli, "dev", "down", "--state-dir", str(state_dir)],
            env=env,
            capture_output=True,
            timeout=120,
        )
    assert down.returncode == 0


def test_acl_set_gives_each_control_topic_one_writer() -> None:
    topics = Topics()
    grants = acl_set(topics, "burnguard-stream", "burnguard-sink")

    def writers(topic: str) -> set[str]:
        return {
            grant.principal
            for grant in grants
            if grant.resource == "topic"
            and grant.operation in ("WRITE", "ALL")
            and (topic.startswith(grant.name) if grant.prefixed else topic == grant.name)
        }

    assert writers(topics.signals) == writers(topics.signal_checkpoints) == {"worker"}
    assert writers(topics.budgets) == {"admin"}
    assert writers(topics.spans) == {"app"}
    assert writers(topics.notify_state) == writers(topics.notify_deadletter) == {"notify"}
    assert [(g.principal, g.operation) for g in grants if g.resource == "cluster"] == [("admin", "CREATE")]
    with pytest.raises(ValueError, match=r"prefix of topic 'burnguard\.budgets'"):
        acl_set(topics, "burnguard.", "burnguard-sink")
