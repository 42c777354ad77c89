"""The `burnguard` command: budget validation and the signal tail, against real files and a real broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from burnguard.contracts.signals import Signal
from burnguard.deploy.kafka import KafkaBroker
from kafka import KafkaProducer
from typer.testing import CliRunner

from burnguard.cli import app
from burnguard.cli.demo import DEMO_BUDGETS

runner = CliRunner()


def test_budgets_validate_accepts_the_demo_budgets() -> None:
    result = runner.invoke(app, ["budgets", "validate", str(DEMO_BUDGETS)])
    assert result.exit_code == 0, result.output
    assert "1 budgets valid" in result.output and "tenant-daily" in result.output


def test_budgets_validate_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "budgets:\n  - id: a\n    scope: tenant\n    limit: 0\n  - id: b\n    scope: tenat\n    limit: 5\n"
    )
    result = runner.invoke(app, ["budgets", "validate", str(path)], terminal_width=300)
    assert result.exit_code == 1
    assert f"{path}:4: budgets[0].limit:" in result.output
    assert f"{path}:6: budgets[1].scope" in result.output


def test_budgets_validate_shows_the_routes_and_the_model_each_provider_gets(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "model_classes: {premium: [gpt-4.1, claude-opus-4-1], economy: [gpt-4.1-nano]}\n"
        "providers:\n  openai: {premium: gpt-4.1, economy: gpt-4.1-nano}\n"
        "  anthropic: {premium: claude-opus-4-1}\n"
        "routes:\n  - {id: routine, match: {feature: [extract, classify], stakes: low}, use: economy}\n"
    )
    result = runner.invoke(app, ["budgets", "validate", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "1 routes" in result.output
    row = next(line for line in result.output.splitlines() if "routine" in line)
    assert "feature=extract|classify" in row and "stakes=low" in result.output
    assert "gpt-4.1-nano" in row and "(not routed)" in row  # anthropic has no economy model


def test_budgets_validate_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["budgets", "validate", str(tmp_path / "nope.yaml")], terminal_width=300)
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.slow
def test_signals_tail_prints_published_signals(kafka_broker: KafkaBroker, monkeypatch) -> None:
    topic = "burnguard.signals.cli-test"
    monkeypatch.setenv("BURNGUARD_TOPIC_SIGNALS", topic)
    now = datetime.now(UTC)
    signal = Signal(
        scope="tenant", key="acme", budget="tenant-daily", action="throttle", spent=51.0, limit=50.0,
        ratio=1.02, window_start=now.replace(hour=0), window_end=now + timedelta(hours=1),
        issued_at=now, expires_at=now + timedelta(minutes=2),
    )  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    producer.send(topic, key=signal.kafka_key.encode(), value=signal.to_json()).get(10)
    producer.close()
    result = runner.invoke(
        app,
        [
            "signals",
            "tail",
            "--bootstrap",
            kafka_broker.bootstrap,
            "--max-messages",
            "1",
            "--timeout-s",
            "20",
        ],
        terminal_width=300,
    )
    assert result.exit_code == 0, result.output
    assert "tenant:acme@tenant-daily" in result.output and "throttle" in result.output
    assert "51.0000/50" in result.output


@pytest.mark.slow
def test_signals_tail_skips_a_malformed_signal_with_a_warning(kafka_broker: KafkaBroker, monkeypatch) -> None:
    topic = "burnguard.signals.cli-malformed"
    monkeypatch.setenv("BURNGUARD_TOPIC_SIGNALS", topic)
    now = datetime.now(UTC)
    good = Signal(
        scope="tenant", key="acme", budget="tenant-daily", action="warn", spent=5.0, limit=10.0,
        ratio=0.5, window_start=now.replace(hour=0), window_end=now + timedelta(hours=1),
        issued_at=now, expires_at=now + timedelta(minutes=2),
    )  # fmt: skip
    poisoned = good.to_json().replace(b'"spent":5.0', b'"spent":null')  # what a NaN used to publish
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    for value in (poisoned, b"not json", good.to_json()):
        producer.send(topic, key=good.kafka_key.encode(), value=value).get(10)
    producer.close()
    args = [
        "signals",
        "tail",
        "--bootstrap",
        kafka_broker.bootstrap,
        "--max-messages",
        "1",
        "--timeout-s",
        "20",
    ]
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped a malformed signal") == 2
    assert "tenant:acme@tenant-daily" in result.output and "5.0000/10" in result.output
