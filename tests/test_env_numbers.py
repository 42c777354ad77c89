"""Every numeric BURNGUARD_* variable: a bad value is refused naming the variable, in each component."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from burnguard.contracts.env_numbers import env_number
from burnguard.contracts.span_checks import SpanLimits
from burnguard.instrumentation.runtime import Settings
from burnguard.notify.notifier import NotifySettings
from burnguard.sinks.__main__ import _parse_args
from burnguard.stream.settings import StreamSettings


def _sink_args() -> Any:
    return _parse_args([])


STREAM = [
    "BURNGUARD_STREAM_PARTITIONS",
    "BURNGUARD_SIGNAL_REFRESH_S",
    "BURNGUARD_SIGNAL_TTL_S",
    "BURNGUARD_SNAPSHOT_INTERVAL_S",
    "BURNGUARD_COMMIT_INTERVAL_S",
    "BURNGUARD_SESSION_TIMEOUT_S",
    "BURNGUARD_ALLOWED_LATENESS_S",
    "BURNGUARD_SESSION_IDLE_S",
    "BURNGUARD_EVICT_INTERVAL_S",
    "BURNGUARD_CHANGELOG_SEGMENT_S",
    "BURNGUARD_CHANGELOG_TOMBSTONE_S",
    "BURNGUARD_PRODUCER_LINGER_MS",
    "BURNGUARD_ACCOUNT_BATCH_MS",
    "BURNGUARD_CHANGELOG_FLUSH_MS",
    "BURNGUARD_STALL_TIMEOUT_S",
    "BURNGUARD_STOP_TIMEOUT_S",
    "BURNGUARD_DUPLICATE_WINDOW_S",
    "BURNGUARD_SIGNAL_CHECKPOINT_S",
]
CASES: list[tuple[str, Callable[[], Any]]] = [
    *((name, StreamSettings.from_env) for name in STREAM),
    *(
        (name, SpanLimits.from_env)
        for name in (
            "BURNGUARD_MAX_SPAN_TOKENS",
            "BURNGUARD_MAX_SPAN_COST_USD",
            "BURNGUARD_MAX_KEY_CHARS",
            "BURNGUARD_CLOCK_SKEW_AHEAD_S",
            "BURNGUARD_ALLOWED_LATENESS_S",
        )
    ),
    *(
        (name, NotifySettings.from_env)
        for name in (
            "BURNGUARD_NOTIFY_BACKOFF_S",
            "BURNGUARD_NOTIFY_MAX_BACKOFF_S",
            "BURNGUARD_NOTIFY_SESSION_TIMEOUT_S",
        )
    ),
    ("BURNGUARD_GUARD_WAIT_S", Settings.from_env),
    ("BURNGUARD_SHUTDOWN_TIMEOUT_S", Settings.from_env),
    ("BURNGUARD_SINK_BATCH_MAX", _sink_args),
    ("BURNGUARD_SINK_FLUSH_INTERVAL", _sink_args),
]


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
@pytest.mark.parametrize(("name", "read"), CASES, ids=[f"{name}-{read.__qualname__}" for name, read in CASES])
def test_a_bad_number_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], Any], value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        read()


#: What a good value of a variable needs of another: a TTL of 7 s is renewed every 7/3 s at most.
TAKEN_WITH = {"BURNGUARD_SIGNAL_TTL_S": {"BURNGUARD_SIGNAL_REFRESH_S": "2"}}


@pytest.mark.parametrize(("name", "read"), CASES, ids=[f"{name}-{read.__qualname__}" for name, read in CASES])
def test_a_good_number_is_taken(monkeypatch: pytest.MonkeyPatch, name: str, read: Callable[[], Any]) -> None:
    monkeypatch.setenv(name, "7")
    for other, value in TAKEN_WITH.get(name, {}).items():
        monkeypatch.setenv(other, value)
    read()


def test_a_ttl_the_refresh_cannot_renew_in_time_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under three refresh intervals a restriction whose renewal round is lost would lapse."""
    monkeypatch.setenv("BURNGUARD_SIGNAL_TTL_S", "89")
    with pytest.raises(ValueError, match=r"BURNGUARD_SIGNAL_REFRESH_S \(30 s\) must be at most 1/3 of"):
        StreamSettings.from_env()
    monkeypatch.setenv("BURNGUARD_SIGNAL_TTL_S", "90")
    assert StreamSettings.from_env().renew_within == timedelta(seconds=90)


def test_the_bounds_and_the_default() -> None:
    env = {"A": "0", "B": " ", "C": "12", "D": "1.5"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert env_number("A", 3.0, zero_ok=True) == 0.0
        with pytest.raises(ValueError, match="A must be a finite number above 0"):
            env_number("A", 3.0)
        assert env_number("B", 3.0) == 3.0
        assert env_number("UNSET_FOR_THIS_TEST", 4, int) == 4
        with pytest.raises(ValueError, match="at most 10"):
            env_number("C", 1.0, most=10)
        with pytest.raises(ValueError, match="D must be a whole number"):
            env_number("D", 1, int)


@pytest.mark.parametrize("value", ["ture", "2", "enabled"])
def test_a_bad_switch_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Not read as "off": a typo in `BURNGUARD_COMBINE_MESSAGES` would silently keep the default."""
    monkeypatch.setenv("BURNGUARD_COMBINE_MESSAGES", value)
    with pytest.raises(ValueError, match=f"BURNGUARD_COMBINE_MESSAGES must be true or false.*{value!r}"):
        StreamSettings.from_env()


@pytest.mark.parametrize(
    ("value", "expected"), [("", True), ("yes", True), (" On ", True), ("0", False), ("off", False)]
)
def test_a_switch_reads_its_words(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("BURNGUARD_COMBINE_MESSAGES", value)
    assert StreamSettings.from_env().combine_messages is expected
