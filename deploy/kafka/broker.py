"""A real single-node Apache Kafka broker (KRaft combined mode) without Docker.

The broker is assembled from Maven Central jars (see ``pom.xml`` beside this file):
Maven resolves a classpath once, which is cached, and the broker runs as
``java -cp <classpath> kafka.Kafka server.properties``. Tests, ``burnguard dev up``
and the end-to-end suite all start Kafka through :class:`KafkaBroker`, so there is
exactly one place that knows how to configure, format, start and stop it.

Only the standard library and kafka-python are imported here: this module is part
of the base install, which must not pull in Faust or aiokafka.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from burnguard.deploy.kafka.security import BrokerSecurity, write_private

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaToolMissing",
    "free_port",
    "kafka_classpath",
    "port_is_free",
]

KAFKA_VERSION = "4.4.0"
"""Pinned default broker version; every client the project uses passes against it."""

POM_PATH = Path(__file__).with_name("pom.xml")
JAVA_INSTALL_HINT = "apt-get install openjdk-17-jre-headless (or any Java 17+ runtime)"
MVN_INSTALL_HINT = "apt-get install maven openjdk-17-jdk-headless"
DEFAULT_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1",)
"""C1-only JIT: the broker is up ~40% sooner on a 2-core machine, which matters
more for tests and ``dev up`` than peak throughput. Pass ``jvm_options=()`` to a
:class:`KafkaBroker` for the JVM defaults (e.g. for benchmarks)."""
_LOG_TAIL_LINES = 60
_STATE_FILE = "broker.json"
_PID_FILE = "broker.pid"


class KafkaToolMissing(RuntimeError):
    """``java`` or ``mvn`` is not installed; the message says what to install."""


# --------------------------------------------------------------------------- tools


def find_tool(name: str, env_var: str, hint: str, explicit: str | None = None) -> str:
    """Locate an executable: explicit argument, then ``$<env_var>``, then ``PATH``.

    The lookup goes through :func:`shutil.which` on the current ``PATH`` so a
    caller (or a test) controls it by setting ``PATH`` or ``BURNGUARD_JAVA`` /
    ``BURNGUARD_MVN``; nothing has to be mocked.
    """
    candidate = explicit or os.environ.get(env_var)
    found = shutil.which(candidate) if candidate else shutil.which(name)
    if found is None and not candidate and name == "java":
        java_home = os.environ.get("JAVA_HOME")
        if java_home:
            found = shutil.which(str(Path(java_home, "bin", "java")))
    if found is None:
        wanted = candidate or name
        raise KafkaToolMissing(
            f"`{wanted}` not found (PATH or ${env_var}); it is needed to run a local "
            f"Kafka broker. Install it, e.g. `{hint}`."
        )
    return found


def find_java(explicit: str | None = None) -> str:
    """Path of the ``java`` executable (Java 17+ is what Kafka 4.x needs)."""
    return find_tool("java", "BURNGUARD_JAVA", JAVA_INSTALL_HINT, explicit)


def find_mvn(explicit: str | None = None) -> str:
    """Path of the ``mvn`` executable, used once per version to resolve the jars."""
    return find_tool("mvn", "BURNGUARD_MVN", MVN_INSTALL_HINT, explicit)


# ----------------------------------------------------------------------- classpath


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Per-version cache directory: ``$BURNGUARD_CACHE_DIR`` or ``~/.cache/burnguard``."""
    base = os.environ.get("BURNGUARD_CACHE_DIR") or Path.home() / ".cache" / "burnguard"
    return Path(base) / "kafka" / version


def _pom_digest() -> str:
    """Hash of pom.xml, so editing the POM (e.g. the Log4j version) invalidates the cache."""
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def _read_cached_classpath(cp_file: Path, digest_file: Path) -> str | None:
    """The cached classpath if it was built from this POM and every jar still exists."""
    try:
        if digest_file.read_text().strip() != _pom_digest():
            return None
        classpath = cp_file.read_text().strip()
    except OSError:
        return None
    jars = classpath.split(os.pathsep)
    if not classpath or not all(Path(jar).is_file() for jar in jars):
        return None  # e.g. ~/.m2 was wiped: resolve again
    return classpath


def _resolve_classpath(version: str, out_file: Path, mvn: str | None) -> None:
    """Run Maven to write the runtime classpath of ``kafka_2.13:<version>`` to a file."""
    cmd = [
        find_mvn(mvn),
        "-q",
        "-B",
        "-f",
        str(POM_PATH),
        f"-Dkafka.version={version}",
        "dependency:build-classpath",
        f"-Dmdep.outputFile={out_file}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_file.is_file():
        output = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
        raise RuntimeError(
            f"Maven could not resolve Kafka {version} jars (exit {proc.returncode}):\n" + "\n".join(output)
        )


def kafka_classpath(version: str = KAFKA_VERSION, mvn: str | None = None) -> str:
    """Classpath (``os.pathsep``-joined jars in ``~/.m2``) for a Kafka broker.

    Maven runs once per version; later calls read ``classpath.txt`` from the cache
    and return at once. A lock file serialises resolution so parallel test workers
    or two ``dev up`` commands do not run Maven side by side on the same output.
    """
    directory = cache_dir(version)
    cp_file, digest_file = directory / "classpath.txt", directory / "pom.sha256"
    cached = _read_cached_classpath(cp_file, digest_file)
    if cached is not None:
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "resolve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_cached_classpath(cp_file, digest_file)  # another process won
        if cached is not None:
            return cached
        tmp_file = directory / f"classpath.{os.getpid()}.tmp"
        try:
            _resolve_classpath(version, tmp_file, mvn)
            os.replace(tmp_file, cp_file)
        finally:
            tmp_file.unlink(missing_ok=True)
        digest_file.write_text(_pom_digest() + "\n")
    classpath = _read_cached_classpath(cp_file, digest_file)
    if classpath is None:
        raise RuntimeError(f"Maven wrote an unusable classpath to {cp_file}")
    return classpath


# ---------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now.

    Binds with ``SO_REUSEADDR`` like the JVM does for server sockets, so closed
    connections lingering in TIME_WAIT do not count as "in use"; a listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _accepts_tcp(port: int, host: str = "127.0.0.1") -> bool:
    """Cheap probe before building a Kafka client (which logs noisily on refusal)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _new_free_port(taken: set[int]) -> int:
    """A free port not in ``taken`` (the broker and controller need distinct ones)."""
    while True:
        port = free_port()
        if port not in taken:
            return port


# ------------------------------------------------------------------------ processes


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its parent's wait() is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return True  # no procfs (macOS): the signal test is all there is
    # Every thread, not just /proc/<pid>/stat: the JVM's main thread can exit (and
    # show as a zombie) while other threads still shut down and hold the ports.
    return any(_task_state(stat) not in ("Z", "X", "") for stat in tasks.glob("*/stat"))


def _task_state(stat: Path) -> str:
    """State letter of a /proc task (the field after ``(comm)``); "" if it vanished."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _is_kafka_process(pid: int) -> bool:
    """Guard against pid reuse: the pid must still be a ``kafka.Kafka`` JVM."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return pid_alive(pid)  # no procfs (macOS): trust the pid
    try:
        return b"kafka.Kafka" in cmdline.read_bytes().split(b"\0") and pid_alive(pid)
    except OSError:
        return False


def new_cluster_id() -> str:
    """A Kafka cluster id made in Python, saving a JVM start for ``random-uuid``.

    Same format as ``org.apache.kafka.common.Uuid.randomUuid()``: 16 random bytes,
    URL-safe base64 without padding, never starting with ``-`` (which the storage
    tool's argument parser would take for an option).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Last lines of a log file, for error messages that explain a failed start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------- broker


class KafkaBroker:
    """One single-node KRaft broker (``broker,controller`` roles) on 127.0.0.1.

    Everything lives in ``data_dir``: ``server.properties``, ``log4j2.properties``,
    the log segments under ``kraft/``, ``broker.log`` and, while it runs,
    ``broker.pid`` + ``broker.json``. Restarting on the same ``data_dir`` keeps
    topics and messages (also on other ports). ``java`` overrides the Java
    executable (else ``$BURNGUARD_JAVA``, ``PATH``, ``$JAVA_HOME/bin``);
    ``jvm_options`` replaces :data:`DEFAULT_JVM_OPTIONS`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        controller_port: int | None = None,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        num_partitions: int = 4,
        java: str | None = None,
        jvm_options: Sequence[str] | None = None,
        security: BrokerSecurity | None = None,
        properties: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port if port is not None else _new_free_port(set())
        self.controller_port = controller_port if controller_port is not None else _new_free_port({self.port})
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")
        self.version = version
        self.heap = heap
        self.num_partitions = num_partitions
        self.java = java
        self.jvm_options = tuple(DEFAULT_JVM_OPTIONS if jvm_options is None else jvm_options)
        self.security = security
        #: Server properties set over the defaults (e.g. a test broker's quicker log cleaner).
        self.properties = dict(properties or {})
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and properties ---------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Broker stdout/stderr and Log4j output (console appender) end up here."""
        return self.data_dir / "broker.log"

    @property
    def log_dirs(self) -> Path:
        """Kafka's ``log.dirs`` (topic data and KRaft metadata, incl. meta.properties)."""
        return self.data_dir / "kraft"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j_path(self) -> Path:
        return self.data_dir / "log4j2.properties"

    def server_properties(self) -> dict[str, str]:
        """The broker config: single node, so every internal topic has RF 1."""
        defaults = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": str(self.num_partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # Not the default 50: fewer partition logs to create and load when the first
            # consumer group or transactional producer appears on a fresh broker.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        return defaults | self._security_properties() | self.properties

    def _security_properties(self) -> dict[str, str]:
        """SASL_SSL listeners and the authorizer when the broker is secured, else nothing."""
        if self.security is None:
            return {}
        return self.security.server_properties(self.data_dir, self.port, self.controller_port)

    def log4j_properties(self) -> dict[str, str]:
        """Log4j2 config: console (redirected to broker.log), INFO for Kafka, WARN else."""
        props = {
            "status": "warn",
            # Kafka stops Log4j itself; Log4j's own JVM hook only logs a warning then.
            "shutdownHook": "disable",
            "appender.console.type": "Console",
            "appender.console.name": "STDOUT",
            "appender.console.layout.type": "PatternLayout",
            "appender.console.layout.pattern": "[%d] %p %m (%c)%n",
            "rootLogger.level": "WARN",
            "rootLogger.appenderRef.stdout.ref": "STDOUT",
        }
        levels = {
            "kafka": "INFO",
            "org.apache.kafka": "INFO",
            # Per-request, per-partition and state-change chatter: warnings only.
            "kafka.request.logger": "WARN",
            "state.change.logger": "WARN",
            "kafka.log.LogCleaner": "WARN",
            "org.apache.kafka.storage.internals.log": "WARN",
            "org.apache.kafka.common.config": "WARN",
        }
        for index, (name, level) in enumerate(levels.items()):
            props[f"logger.l{index}.name"] = name
            props[f"logger.l{index}.level"] = level
        return props

    def _write_configs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _write_properties(self.properties_path, self.server_properties())
        _write_properties(self.log4j_path, self.log4j_properties())

    # -- lifecycle ----------------------------------------------------------------

    def _java_cmd(self, java: str, classpath: str, main: str, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.heap}",
            *self.jvm_options,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            "-cp",
            classpath,
            main,
            *args,
        ]

    def _format_storage(self, java: str, classpath: str) -> None:
        """Format ``log.dirs`` once; a restart finds meta.properties and keeps the data."""
        if (self.log_dirs / "meta.properties").exists():
            return
        args = ["format", "--cluster-id", new_cluster_id(), "--config", str(self.properties_path)]
        args.append("--ignore-formatted")
        argfile = None
        if self.security:  # SCRAM passwords go through a 0600 argfile, never argv
            argfile = self.security.format_argfile(self.data_dir, ["kafka.tools.StorageTool", *args])
            cmd = self._java_cmd(java, classpath, f"@{argfile}")
        else:
            cmd = self._java_cmd(java, classpath, "kafka.tools.StorageTool", *args)
        try:
            with open(self.log_path, "ab") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        finally:
            if argfile is not None:
                argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"kafka.tools.StorageTool format failed (exit {proc.returncode}); "
                f"tail of {self.log_path}:\n{_tail(self.log_path)}"
            )

    def start(self, timeout: float = 90.0, detach: bool = False) -> KafkaBroker:
        """Start the broker and return once a client can fetch metadata from it.

        ``detach=True`` puts the JVM in its own session so it outlives this process
        (``burnguard dev up``); otherwise it is stopped at interpreter exit at the
        latest. Raises :class:`KafkaToolMissing` without java/mvn and RuntimeError
        with the log tail if the broker dies or is not ready within ``timeout``.
        """
        if self.is_running():
            return self
        self._refuse_if_owned_elsewhere()
        java = find_java(self.java)
        classpath = kafka_classpath(self.version)
        if self.security:
            self.security.prepare(self.data_dir, java)
        self._write_configs()
        self._format_storage(java, classpath)
        self._launch(java, classpath, detach)
        try:
            self._wait_ready(timeout)
        except BaseException:
            # Only kill it: waiting for the ports here could hide the real error
            # (e.g. another program holds the port the broker failed to bind).
            self._terminate(timeout=10.0)
            raise
        return self

    def _refuse_if_owned_elsewhere(self) -> None:
        """A second JVM on the same log.dirs would only fail on Kafka's directory lock."""
        other = KafkaBroker.from_state(self.data_dir)
        if other is not None and other.is_running():
            raise RuntimeError(
                f"a Kafka broker (pid {other.pid}, {other.bootstrap}) already runs on "
                f"{self.data_dir}; re-attach with KafkaBroker.from_state() or stop it first"
            )

    def _launch(self, java: str, classpath: str, detach: bool) -> None:
        cmd = self._java_cmd(java, classpath, "kafka.Kafka", str(self.properties_path))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=detach,
            )
        self.pid = self._proc.pid
        (self.data_dir / _PID_FILE).write_text(f"{self.pid}\n")
        state = {
            "port": self.port,
            "controller_port": self.controller_port,
            "pid": self.pid,
            "version": self.version,
            "heap": self.heap,
            "num_partitions": self.num_partitions,
            "detached": detach,
        }
        (self.data_dir / _STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if not detach:
            _stop_at_exit(self)

    def _wait_ready(self, timeout: float) -> None:
        """Poll until a kafka-python metadata round trip lists this broker."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(
                    f"Kafka broker exited during startup; tail of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _accepts_tcp(self.port):
                try:
                    if _metadata_round_trip(self.client_config()):
                        return
                except Exception as exc:  # any client error means "not ready yet"
                    last_error = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"Kafka broker not ready on {self.bootstrap} after {timeout:.0f}s "
            f"(last client error: {last_error!r}); tail of {self.log_path}:\n"
            f"{_tail(self.log_path)}"
        )

    def is_running(self) -> bool:
        """Whether the broker process is alive (not whether it serves clients yet)."""
        if self._proc is not None:
            return self._proc.poll() is None
        # Liveness only: an exiting JVM loses its cmdline before it is gone, so the
        # kafka.Kafka identity check is done once, in from_state().
        return self.pid is not None and pid_alive(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), SIGKILL after ``timeout``, then wait for ports.

        Idempotent. Returns only when the process is gone and both ports could be
        bound again, so a restart on the same ports can follow immediately.
        """
        if self._terminate(timeout):
            self._wait_ports_free(timeout)

    def _terminate(self, timeout: float) -> bool:
        """End the process (if any) and forget it; True if there was one to end."""
        was_running = self.pid is not None and self.is_running()
        if was_running:
            self._signal(signal.SIGTERM)
            if not self._wait_exit(timeout):
                self._signal(signal.SIGKILL)
                self._wait_exit(10.0)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1.0)  # reap, so no zombie keeps the pid
        self._proc = None
        self.pid = None
        _attached.discard(self)
        for name in (_PID_FILE, _STATE_FILE):
            (self.data_dir / name).unlink(missing_ok=True)
        return was_running

    def _signal(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                return True
            time.sleep(0.1)
        return not self.is_running()

    def _wait_ports_free(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = (self.port, self.controller_port)
        while not all(port_is_free(port) for port in ports):
            if time.monotonic() > deadline:
                busy = [port for port in ports if not port_is_free(port)]
                raise RuntimeError(f"ports {busy} still in use after stopping Kafka")
            time.sleep(0.1)

    @classmethod
    def from_state(cls, data_dir: str | Path) -> KafkaBroker | None:
        """Re-attach to a (detached) broker recorded in ``data_dir/broker.json``.

        Returns None when there is no state file or its process is no longer a
        running Kafka broker (stale state), so ``dev down`` has nothing to stop.
        """
        state_file = Path(data_dir) / _STATE_FILE
        try:
            state: dict[str, Any] = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        broker = cls(
            data_dir,
            port=int(state["port"]),
            controller_port=int(state["controller_port"]),
            version=str(state.get("version", KAFKA_VERSION)),
            heap=str(state.get("heap", "512m")),
            num_partitions=int(state.get("num_partitions", 4)),
        )
        broker.pid = int(state["pid"])
        if not _is_kafka_process(broker.pid):
            return None
        return broker

    # -- topics -------------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        compact: bool = False,
        config: dict[str, str] | None = None,
    ) -> None:
        """Create a topic (RF 1) and wait for its leaders; an existing topic is fine."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        topic_config = dict(config or {})
        if compact:
            topic_config["cleanup.policy"] = "compact"
        topic = NewTopic(name, partitions, 1, topic_configs=topic_config)
        admin = KafkaAdminClient(**self.client_config(), client_id="burnguard-admin")
        try:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])
            if hasattr(admin, "wait_for_topics"):  # kafka-python >= 3
                admin.wait_for_topics([name], timeout_ms=30_000)
        finally:
            admin.close()

    def client_config(self) -> dict[str, Any]:
        """kafka-python arguments for an admin connection (the super user on a secure broker)."""
        config: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.security:
            config.update(self.security.client_config(self.data_dir))
        return config

    # -- context manager ----------------------------------------------------------

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"KafkaBroker(bootstrap={self.bootstrap!r}, controller_port={self.controller_port}, "
            f"version={self.version!r}, pid={self.pid}, data_dir='{self.data_dir}')"
        )


def _write_properties(path: Path, props: dict[str, str]) -> None:
    """Owner-only (0600): a secure broker's properties hold its JAAS and keystore passwords."""
    write_private(path, "".join(f"{key}={value}\n" for key, value in props.items()))


def _metadata_round_trip(client_config: dict[str, Any]) -> bool:
    """True when a metadata request answers and lists at least one (unfenced) broker."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**client_config, client_id="burnguard-probe", request_timeout_ms=5000)
    try:
        return bool(admin.describe_cluster().get("brokers"))
    finally:
        admin.close()


_attached: set[KafkaBroker] = set()


def _stop_at_exit(broker: KafkaBroker) -> None:
    """Make sure a non-detached broker does not outlive the Python process."""
    if not _attached:
        atexit.register(_stop_attached)
    _attached.add(broker)


def _stop_attached() -> None:
    atexit.unregister(_stop_attached)
    for broker in list(_attached):
        with contextlib.suppress(Exception):
            broker.stop(timeout=10.0)
