"""A down broker never stalls the app: start-up, calls, shutdown and exit stay bounded.

The app (tests/apps/down_broker_app.py) runs with enforcement on. With Kafka unreachable
(nothing listening on the port, or an address that never answers), `configure()` waits less
than 1 s, every guarded call is allowed (fail open) without waiting, and `shutdown()` —
or the flush at exit when the app never calls it — returns within
`BURNGUARD_SHUTDOWN_TIMEOUT_S`, reporting each span it could not deliver.

A wait is measured as the time the app's thread was blocked (its wall time less its CPU time
and its wait for a CPU: the app's `blocked_s`), so a busy machine does not fail the bounds; a
wait on Kafka (`max_block_ms`, 200 ms, at least) exceeds them by far. With a real
broker that goes down while the app runs, the spans it acknowledged count as sent and
the rest as undelivered, within the same bound; SIGTERM with Kafka unreachable ends the app within it too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from burnguard.deploy.kafka import KafkaBroker
from burnguard.deploy.kafka.broker import free_port

APP = Path(__file__).parent / "apps" / "down_broker_app.py"
CALLS = 10
BOUND_S = 2.0
#: Beyond the flush's bound, for the exit: 0.1 s of CPU on an idle machine, 2 s at load 14.
EXIT_TEARDOWN_S = 5.0


def app_env(bootstrap: str, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("BURNGUARD_")}
    return {
        **env,
        "BURNGUARD_KAFKA_BOOTSTRAP": bootstrap,
        "BURNGUARD_ENFORCE": "true",
        "BURNGUARD_SHUTDOWN_TIMEOUT_S": str(BOUND_S),
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def measured(stdout: str) -> dict[str, float]:
    return json.loads(stdout.strip().splitlines()[-1])


def run_to_exit(env: dict[str, str]) -> tuple[dict[str, float], str, float]:
    """Run the app; its measurements, its stderr and the seconds from its last line (its work
    done) to its exit: the exit, not the interpreter's start-up and imports a busy machine slows."""
    app = subprocess.Popen(
        [sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert app.stdout is not None
    line = app.stdout.readline()
    printed = time.monotonic()
    _, stderr = app.communicate(timeout=60)
    exit_s = time.monotonic() - printed
    assert app.returncode == 0, stderr[-3000:]
    return measured(line), stderr, exit_s


@pytest.mark.slow
@pytest.mark.parametrize("shutdown", [True, False], ids=["shutdown", "exit"])
@pytest.mark.parametrize("where", ["refused", "blackhole"])
def test_unreachable_broker_never_stalls_the_app(where: str, shutdown: bool) -> None:
    bootstrap = f"127.0.0.1:{free_port()}" if where == "refused" else "192.0.2.1:9092"  # TEST-NET-1
    env = app_env(bootstrap, DOWN_APP_SHUTDOWN="1" if shutdown else "0")
    result, stderr, exit_s = run_to_exit(env)
    assert result["configure_blocked_s"] < 1.0
    # allowed, decided from memory: no call waits on Kafka
    assert result["median_call_s"] < 0.005 and result["most_blocked_call_s"] < 0.1
    if shutdown:
        assert result["shutdown_s"] <= BOUND_S + 0.5
        assert result["undelivered"] == CALLS and result["sent"] == 0
    assert f"{CALLS} spans could not be delivered to Kafka" in stderr, stderr[-3000:]
    # the exit flush's bound, and the interpreter's teardown (seconds on a busy machine); an exit
    # that waits on Kafka (kafka-python's close() without a timeout) does not end
    assert exit_s <= BOUND_S + EXIT_TEARDOWN_S, f"the app took {exit_s:.1f}s to exit"


@pytest.mark.slow
def test_sigterm_with_the_broker_unreachable_ends_within_the_bound() -> None:
    env = app_env(f"127.0.0.1:{free_port()}", DOWN_APP_SHUTDOWN="0", DOWN_APP_END="wait")
    app = subprocess.Popen(
        [sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert app.stdout is not None and app.stderr is not None
    assert measured(app.stdout.readline())["configure_blocked_s"] < 1.0
    signalled = time.monotonic()
    app.send_signal(signal.SIGTERM)
    _, stderr = app.communicate(timeout=30)
    assert app.returncode == -signal.SIGTERM
    assert time.monotonic() - signalled <= BOUND_S + 1.5
    assert f"{CALLS} spans could not be delivered to Kafka" in stderr, stderr[-3000:]


@pytest.mark.slow
def test_broker_lost_while_running_shutdown_is_bounded(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka").start()
    try:
        broker.create_topic("otlp_spans", partitions=1)
        env = app_env(broker.bootstrap, DOWN_APP_WAIT_FOR_KAFKA="1")
        app = subprocess.Popen(
            [sys.executable, str(APP)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert app.stdin is not None and app.stdout is not None and app.stderr is not None
        assert app.stdout.readline().strip() == "delivered", app.stderr.read()[-3000:]
    finally:
        broker.stop()
    app.stdin.write("go\n")
    app.stdin.flush()
    stdout, stderr = app.communicate(timeout=60)
    assert app.returncode == 0, stderr[-3000:]
    result = measured(stdout)
    assert result["median_call_s"] < 0.005 and result["most_blocked_call_s"] < 0.1
    assert result["shutdown_s"] <= BOUND_S + 0.5
    assert result["sent"] == CALLS and result["undelivered"] == CALLS
