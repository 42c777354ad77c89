"""SASL_SSL (SCRAM-SHA-512 over TLS) and the KRaft StandardAuthorizer for the local broker.

:class:`BrokerSecurity` turns a :class:`~burnguard.deploy.kafka.broker.KafkaBroker` into a
locked one: clients authenticate with SCRAM-SHA-512 over TLS, the controller listener
with PLAIN over TLS (KRaft cannot use SCRAM there), and every request is checked by the
``StandardAuthorizer`` against ACLs; only the broker's own principal is a super user.

Secrets never appear on a command line: the certificate is made with the JDK's
``keytool`` reading its store password from a file, the SCRAM credentials are added at
format time through a Java ``@argfile``, and the broker reads its JAAS configuration from
``server.properties``; all of these files are created with mode 0600 under ``data_dir``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SCRAM_MECHANISM", "SUPER_USER", "BrokerSecurity", "write_private"]

SCRAM_MECHANISM = "SCRAM-SHA-512"
SUPER_USER = "broker"
"""The broker's own principal: inter-broker and controller traffic, and the only super user."""
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
_CERT_DAYS = 30


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from creation on, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _jaas(module: str, username: str, password: str, **extra: str) -> str:
    options = {"username": username, "password": password, **extra}
    rendered = " ".join(f'{key}="{value}"' for key, value in options.items())
    return f"org.apache.kafka.common.security.{module} required {rendered};"


def _check_secret(name: str, value: str) -> None:
    """Refuse characters that would break the JAAS, properties or ``--add-scram`` syntax."""
    if not value or any(ch in value for ch in '"\\,[]= \n\r\t'):
        raise ValueError(f"the password of Kafka user {name!r} is empty or has characters not allowed here")


@dataclass(frozen=True)
class BrokerSecurity:
    """Users (SCRAM credentials made at format time) and TLS material of one secure broker.

    ``users`` maps principal names to passwords; :data:`SUPER_USER` is added with a
    random password if missing. Passwords are kept out of ``repr``.
    """

    users: Mapping[str, str] = field(repr=False)

    def __post_init__(self) -> None:
        users = dict(self.users)
        users.setdefault(SUPER_USER, secrets.token_urlsafe(24))
        for name, password in users.items():
            _check_secret(name, password)
        object.__setattr__(self, "users", users)

    @classmethod
    def generate(cls, names: Iterable[str]) -> BrokerSecurity:
        """Fresh random passwords for ``names`` (and the broker)."""
        return cls({name: secrets.token_urlsafe(24) for name in names})

    # -- files ------------------------------------------------------------------------

    @staticmethod
    def tls_dir(data_dir: Path) -> Path:
        return data_dir / "tls"

    @classmethod
    def ca_file(cls, data_dir: Path) -> Path:
        """PEM certificate clients trust (``BURNGUARD_KAFKA_SSL_CAFILE``); the broker's self-signed one."""
        return cls.tls_dir(data_dir) / "ca.pem"

    @classmethod
    def _keystore(cls, data_dir: Path) -> Path:
        return cls.tls_dir(data_dir) / "broker.p12"

    @classmethod
    def _store_password_file(cls, data_dir: Path) -> Path:
        return cls.tls_dir(data_dir) / "keystore.password"

    def prepare(self, data_dir: Path, java: str) -> None:
        """Make the broker's key pair and certificate (for 127.0.0.1 and localhost) once."""
        if self._keystore(data_dir).is_file() and self.ca_file(data_dir).is_file():
            return
        tls = self.tls_dir(data_dir)
        tls.mkdir(parents=True, exist_ok=True, mode=0o700)
        password_file = self._store_password_file(data_dir)
        write_private(password_file, secrets.token_urlsafe(24))
        keytool = _keytool(java)
        store = ["-keystore", str(self._keystore(data_dir)), "-storetype", "PKCS12"]
        store += ["-storepass:file", str(password_file), "-alias", SUPER_USER]
        key = ["-keyalg", "RSA", "-keysize", "2048", "-dname", "CN=localhost", "-validity", str(_CERT_DAYS)]
        _run([keytool, "-genkeypair", *key, "-ext", "SAN=ip:127.0.0.1,dns:localhost", *store])
        _run([keytool, "-exportcert", "-rfc", "-file", str(self.ca_file(data_dir)), *store])

    def format_argfile(self, data_dir: Path, command: list[str]) -> Path:
        """A 0600 ``@argfile``: ``command`` (main class and its arguments) plus one ``--add-scram`` per user.

        The java launcher expands an argfile only before the main class, so the
        main class goes in too; delete the file once the storage tool has run.
        """
        scram = [
            f"{SCRAM_MECHANISM}=[name={name},password={password}]" for name, password in self.users.items()
        ]
        args = [*command, *(item for entry in scram for item in ("--add-scram", entry))]
        if any('"' in arg or "\\" in arg for arg in args):
            raise ValueError("an argument of the storage tool has a quote or backslash")
        path = self.tls_dir(data_dir) / "format.args"
        write_private(path, "".join(f'"{arg}"\n' for arg in args))
        return path

    # -- configuration ----------------------------------------------------------------

    def server_properties(self, data_dir: Path, port: int, controller_port: int) -> dict[str, str]:
        """Overrides of the plaintext broker config (the file holding them is 0600)."""
        broker_password = self.users[SUPER_USER]
        store_password = self._store_password_file(data_dir).read_text().strip()
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "CONTROLLER:SASL_SSL,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _jaas(
                "scram.ScramLoginModule", SUPER_USER, broker_password
            ),
            # SCRAM credentials live in the metadata log, which the controller listener
            # must serve before it is read: KRaft controllers authenticate with PLAIN.
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": _jaas(
                "plain.PlainLoginModule",
                SUPER_USER,
                broker_password,
                **{f"user_{SUPER_USER}": broker_password},
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self._keystore(data_dir)),
            "ssl.keystore.password": store_password,
            "ssl.key.password": store_password,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file(data_dir)),
            "authorizer.class.name": AUTHORIZER,
            "super.users": f"User:{SUPER_USER}",
            "allow.everyone.if.no.acl.found": "false",
            # Close a refused connection at once: with the default 100 ms delay kafka-python
            # mostly reports a bare disconnect instead of the authentication error.
            "connection.failed.authentication.delay.ms": "0",
        }

    def client_config(self, data_dir: Path, user: str = SUPER_USER) -> dict[str, Any]:
        """kafka-python keyword arguments to connect as ``user`` (the broker's super user by default)."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_plain_username": user,
            "sasl_plain_password": self.users[user],
            "ssl_cafile": str(self.ca_file(data_dir)),
        }

    def client_env(self, data_dir: Path, user: str) -> dict[str, str]:
        """The ``BURNGUARD_KAFKA_*`` variables a component running as ``user`` needs."""
        return {
            "BURNGUARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "BURNGUARD_KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
            "BURNGUARD_KAFKA_SASL_USERNAME": user,
            "BURNGUARD_KAFKA_SASL_PASSWORD": self.users[user],
            "BURNGUARD_KAFKA_SSL_CAFILE": str(self.ca_file(data_dir)),
        }


def _keytool(java: str) -> str:
    """``keytool`` of the same JDK/JRE as ``java`` (else from PATH)."""
    beside = Path(java).resolve().with_name("keytool")
    found = str(beside) if beside.is_file() else shutil.which("keytool")
    if found is None:
        raise RuntimeError("`keytool` (part of every Java runtime) not found beside java or on PATH")
    return found


def _run(cmd: list[str]) -> None:
    """Run a JDK tool whose arguments hold no secret; its output explains a failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}): {output}")
