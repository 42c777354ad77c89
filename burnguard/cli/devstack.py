"""The local stack behind `burnguard dev up|down` and `burnguard demo`.

A real Kafka broker (from Maven Central jars), one stream worker and one
ClickHouse sink, each a background process with its log under the state
folder (`.burnguard/` by default). `stack.json` records what runs so `dev
down` from another shell stops exactly that.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from burnguard.contracts.acls import PRINCIPALS, acl_set, apply_acls
from burnguard.contracts.topics import SPANS_TOPIC_CONFIG, Topics
from burnguard.deploy.kafka import KafkaBroker, pid_alive, port_is_free
from burnguard.deploy.kafka.security import SUPER_USER, BrokerSecurity, write_private

SINK_GROUP = "burnguard-sink"
WORKER_READY = "[^Worker]: Ready"  # what Faust logs once partitions are assigned and tables recovered
DEFAULT_LOCAL_PORT = 9092


@dataclass
class DevStack:
    state_dir: Path
    budgets_file: Path | None = None
    topics: Topics = field(default_factory=Topics.from_env)
    spans_partitions: int = 4
    #: SASL_SSL with the ACL set of contracts/acls.py; credentials in secrets/<user>.env (0600).
    secure: bool = False

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def clickhouse_dsn(self) -> str:
        return f"chdb://{(self.state_dir / 'clickhouse').resolve()}"

    def read_state(self) -> dict:
        if not self.state_file.exists():
            return {}
        return json.loads(self.state_file.read_text())

    def _write_state(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    # --- up ------------------------------------------------------------------------
    def up(self, signal_refresh_s: float = 30.0) -> dict:
        """Start broker, worker and sink (whatever is not running yet); return the state."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        security = self._security() if self.secure else None
        broker = KafkaBroker.from_state(self.state_dir / "kafka")
        if broker is None or not broker.is_running():
            port = DEFAULT_LOCAL_PORT if port_is_free(DEFAULT_LOCAL_PORT) else None
            broker = KafkaBroker(self.state_dir / "kafka", port=port, security=security).start(detach=True)
        elif self.read_state().get("secure", False) != self.secure:
            raise RuntimeError(
                "the running stack's security differs; stop it first with `burnguard dev down`"
            )
        broker.security = security
        broker.create_topic(self.topics.spans, partitions=self.spans_partitions, config=SPANS_TOPIC_CONFIG)
        state = {"bootstrap": broker.bootstrap, "clickhouse_dsn": self.clickhouse_dsn, "secure": self.secure}
        env = self.component_env(broker.bootstrap, signal_refresh_s)
        if security is not None:
            self._lock_down(broker, security)
        previous = self.read_state()
        for name, module in (("worker", "burnguard.stream"), ("sink", "burnguard.sinks")):
            pid = previous.get(f"{name}_pid")
            if not (pid and pid_alive(pid)):
                own = security.client_env(broker.data_dir, name) if security else {}
                pid = self._spawn(module, {**env, **own}, self.log_dir / f"{name}.log")
            state[f"{name}_pid"] = pid
        self._write_state(state)
        self.wait_worker_ready()
        return state

    def _security(self) -> BrokerSecurity:
        """The users' passwords: made once, kept in 0600 files so a restart finds the same ones."""
        users = {}
        for name in (*PRINCIPALS, SUPER_USER):
            path = self.secrets_dir / f"{name}.password"
            if not path.is_file():
                write_private(path, secrets.token_urlsafe(24))
            users[name] = path.read_text().strip()
        return BrokerSecurity(users)

    def _lock_down(self, broker: KafkaBroker, security: BrokerSecurity) -> None:
        """Apply the ACL set as the broker's super user; write each principal's env file."""
        from burnguard.stream.settings import StreamSettings

        app_id = os.environ.get("BURNGUARD_STREAM_APP_ID", StreamSettings.app_id)
        grants = acl_set(self.topics, app_id, os.environ.get("BURNGUARD_SINK_GROUP", SINK_GROUP))
        apply_acls(grants, **broker.client_config())
        for name in PRINCIPALS:
            lines = {
                "BURNGUARD_KAFKA_BOOTSTRAP": broker.bootstrap,
                **security.client_env(broker.data_dir, name),
            }
            write_private(self.secrets_dir / f"{name}.env", "".join(f"{k}={v}\n" for k, v in lines.items()))

    def wait_worker_ready(self, timeout: float = 90.0) -> None:
        """Block until the worker has joined its group and recovered its tables."""
        log = self.log_dir / "worker.log"
        deadline = time.monotonic() + timeout
        while WORKER_READY not in (log.read_text(errors="replace") if log.exists() else ""):
            pid = self.read_state().get("worker_pid")
            if not (pid and pid_alive(pid)):
                raise RuntimeError(f"the stream worker exited; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stream worker was not ready after {timeout:.0f}s; see {log}")
            time.sleep(0.2)

    def component_env(self, bootstrap: str, signal_refresh_s: float = 30.0) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BURNGUARD_KAFKA_BOOTSTRAP=bootstrap,
            BURNGUARD_CLICKHOUSE_DSN=self.clickhouse_dsn,
            BURNGUARD_STATE_DIR=str(self.state_dir.resolve()),
            BURNGUARD_SIGNAL_REFRESH_S=str(signal_refresh_s),
        )
        if self.budgets_file is not None:
            env["BURNGUARD_BUDGETS_FILE"] = str(self.budgets_file.resolve())
        return env

    @staticmethod
    def _spawn(module: str, env: dict[str, str], log_path: Path) -> int:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return process.pid

    # --- down ----------------------------------------------------------------------
    def stop_component(self, name: str, timeout: float = 30.0) -> None:
        state = self.read_state()
        pid = state.pop(f"{name}_pid", None)
        if pid:
            terminate(pid, timeout)
        self._write_state(state)

    def down(self) -> None:
        for name in ("worker", "sink"):
            self.stop_component(name)
        broker = KafkaBroker.from_state(self.state_dir / "kafka")
        if broker is not None:
            broker.stop()
        if self.state_file.exists():
            self.state_file.unlink()

    def status(self) -> dict[str, bool]:
        state = self.read_state()
        broker = KafkaBroker.from_state(self.state_dir / "kafka")
        return {
            "broker": bool(broker and broker.is_running()),
            "worker": bool(state.get("worker_pid") and pid_alive(state["worker_pid"])),
            "sink": bool(state.get("sink_pid") and pid_alive(state["sink_pid"])),
        }


def terminate(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL: components flush on SIGTERM."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def group_lag(bootstrap: str, group: str, topics: list[str], client: dict[str, Any] | None = None) -> int:
    """Messages on `topics` that consumer group `group` has not committed yet.

    `client` replaces the plain connection to `bootstrap` (kafka-python arguments, e.g. SASL).
    """
    config = client or {"bootstrap_servers": bootstrap}
    admin = KafkaAdminClient(**config)
    consumer = KafkaConsumer(**config)
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in consumer.partitions_for_topic(topic) or ()
        ]
        ends = consumer.end_offsets(partitions)
        lag = 0
        for tp, end in ends.items():
            meta = committed.get(tp)
            lag += end - (meta.offset if meta is not None and meta.offset >= 0 else 0)
        return lag
    finally:
        consumer.close()
        admin.close()


def wait_until_consumed(
    bootstrap: str, group: str, topics: list[str], timeout: float = 60.0, client: dict[str, Any] | None = None
) -> int:
    """Wait until `group` has committed everything on `topics`; return the lag left."""
    deadline = time.monotonic() + timeout
    lag = group_lag(bootstrap, group, topics, client)
    while lag and time.monotonic() < deadline:
        time.sleep(0.25)
        lag = group_lag(bootstrap, group, topics, client)
    return lag
