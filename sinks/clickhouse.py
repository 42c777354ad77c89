"""Connecting to ClickHouse and writing spans and signals to it in batches.

One code path serves both deployments: the embedded chDB engine (the default,
through clickhouse-connect's own `chdb://` DSN) and a ClickHouse server
(`http://user@host:8123/db`, `https://...`). The password of a server is read
from `BURNGUARD_CLICKHOUSE_PASSWORD` only; DSNs are logged with it removed.

chDB constraints (measured with chdb 4.4 / engine 26.9, clickhouse-connect 1.12):

- A chDB directory is owned by one process at a time. The engine takes an
  exclusive `flock` on `<dir>/status` (which holds the owner's PID); a second
  process fails to open it ("Cannot lock file .../status. Another server
  instance in same directory is already running") and clickhouse-connect
  raises `ProgrammingError: ... Error initializing EmbeddedServer`. `connect`
  turns that into `ChdbDirectoryBusy` naming the owner. The lock goes when the
  owner closes every client on the directory or exits (also on SIGKILL: rows
  it had inserted are on disk), and a failed opener may retry later.
- A process hosts one engine, on one path. Any number of clients (from any
  threads) can share that path; each client has its own handle and lock.
  Opening a different path while a client is open raises `ProgrammingError`
  ("EmbeddedServer already initialized with path ..."). Once every client is
  closed, the process may open another path (about 0.1 s; the first open in a
  process loads the engine, about 2.5 s).
- So the sink that writes to a chDB directory is its only user while it runs:
  the demo and the dashboards read it when the sink is stopped, or the
  deployment uses a ClickHouse server, which has no such limit.
- Paths are compared literally by chDB; clickhouse-connect resolves them with
  `realpath` first. Use the three-slash form `chdb:///abs/dir`: in
  `chdb://name/x` the netloc `name` is the location and `x` the database.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from burnguard.contracts.pricing import UNPRICED_CHARGED
from burnguard.contracts.signals import Signal
from burnguard.contracts.span_checks import COUNT_FIELDS
from burnguard.contracts.usage import SpanUsage
from burnguard.sinks.schema import SIGNALS_TABLE, SPANS_TABLE
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ProgrammingError
from clickhouse_connect.driver.insert import InsertContext

log = logging.getLogger(__name__)

DSN_ENV = "BURNGUARD_CLICKHOUSE_DSN"
PASSWORD_ENV = "BURNGUARD_CLICKHOUSE_PASSWORD"
STATE_DIR_ENV = "BURNGUARD_STATE_DIR"
DEFAULT_STATE_DIR = ".burnguard"
DEFAULT_BATCH_SIZE = 10_000
_UINT64_MAX = 2**64 - 1


class ChdbDirectoryBusy(RuntimeError):
    """The chDB directory is open in another process (one process at a time)."""


class KafkaOrigin(NamedTuple):
    """Where a row was read from; (``""``, -1, -1) for rows not read from Kafka."""

    topic: str
    partition: int
    offset: int


NO_ORIGIN = KafkaOrigin("", -1, -1)


def default_dsn() -> str:
    """`BURNGUARD_CLICKHOUSE_DSN`, else the embedded engine under the state directory."""
    configured = os.environ.get(DSN_ENV)
    if configured:
        return configured
    state_dir = Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
    return "chdb://" + str((state_dir / "clickhouse").resolve())


def is_chdb(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def chdb_path(dsn: str) -> Path | None:
    """The directory of a `chdb:///dir` DSN; None for in-memory or the `chdb://name/db` form."""
    parts = urlsplit(dsn)
    if parts.netloc or not parts.path:
        return None
    return Path(parts.path)


def redact_dsn(dsn: str) -> str:
    """The DSN without a password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def connect(dsn: str | None = None, **kwargs: Any) -> Client:
    """A clickhouse-connect client for `dsn` (argument, else environment, else embedded chDB).

    Extra keyword arguments go to `clickhouse_connect.get_client`.
    """
    dsn = dsn or default_dsn()
    kwargs.setdefault("tz_mode", "schema")  # our columns are all DateTime64(_, 'UTC'): return aware datetimes
    if is_chdb(dsn):
        return _connect_chdb(dsn, **kwargs)
    scheme = urlsplit(dsn).scheme
    if scheme in ("http", "https"):
        kwargs.setdefault("interface", scheme)
    password = os.environ.get(PASSWORD_ENV)
    if password:
        kwargs["password"] = password
    log.debug("connecting to ClickHouse at %s", redact_dsn(dsn))
    return clickhouse_connect.get_client(dsn=dsn, **kwargs)


def _connect_chdb(dsn: str, **kwargs: Any) -> Client:
    path = chdb_path(dsn)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return clickhouse_connect.get_client(dsn=dsn, **kwargs)
    except ProgrammingError as exc:
        owner = _lock_owner(path) if path is not None else None
        if owner is not None:
            raise ChdbDirectoryBusy(
                f"chDB directory {path} is open in another process ({owner}); a chDB directory can be "
                f"opened by one process at a time: stop that process or point {DSN_ENV} at a "
                "ClickHouse server"
            ) from exc
        raise


def _lock_owner(path: Path) -> str | None:
    """Who holds the engine's lock on `<path>/status`, or None when nobody does."""
    status = path / "status"
    try:
        with status.open("rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                first_line = handle.readline().decode(errors="replace").strip()
                return first_line or "unknown process"
            fcntl.flock(handle, fcntl.LOCK_UN)
    except FileNotFoundError:
        return None
    return None


# --- rows -> columns -------------------------------------------------------------

#: SpanUsage fields copied into the column of the same name.
SPAN_STR_FIELDS = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "operation",
    "provider",
    "request_model",
    "response_model",
    "service",
    "tenant",
    "user",
    "workflow",
    "feature",
    "session",
    "action",
    "tool_name",
    "agent_name",
    "conversation_id",
    "model_class",
    "downgraded_from",
    "routed_from",
    "route",
    "escalated_from",
    "refused",
    "stakes",
    "error_type",
)
#: Columns filled straight from a SpanUsage field of another name or type.
_SPAN_OTHER_FIELDS = ("fallback", "start_ns", "end_ns", "cost_usd", "status_error", "extra")
_SPAN_FIELDS = (*SPAN_STR_FIELDS, *COUNT_FIELDS, *_SPAN_OTHER_FIELDS)
_SPAN_GETTERS = tuple(attrgetter(name) for name in _SPAN_FIELDS)
#: The counts (`span_checks.COUNT_FIELDS`), clamped into UInt64: a sender's negative or huge value
#: must not make a batch unwritable.
_COUNTS = slice(len(SPAN_STR_FIELDS), len(SPAN_STR_FIELDS) + len(COUNT_FIELDS))
SPAN_COLUMNS: tuple[str, ...] = (
    *SPAN_STR_FIELDS,
    *COUNT_FIELDS,
    "fallback",
    "start_time",
    "end_time",
    "cost_usd",
    "status_error",
    "extra",
    "priced",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)


def _clamp_counts(column: list[int]) -> list[int]:
    """Clamp into UInt64 (rarely needed, so checked with C-speed min/max first)."""
    if not column or (min(column) >= 0 and max(column) <= _UINT64_MAX):
        return column
    return [min(max(value, 0), _UINT64_MAX) for value in column]


def _origin_columns(origins: Sequence[KafkaOrigin] | None, count: int) -> list[list[Any]]:
    if origins is None:
        return [[NO_ORIGIN.topic] * count, [NO_ORIGIN.partition] * count, [NO_ORIGIN.offset] * count]
    if len(origins) != count:
        raise ValueError(f"{len(origins)} origins for {count} rows")
    return [list(column) for column in zip(*origins, strict=True)] if count else [[], [], []]


def span_columns(rows: Sequence[SpanUsage], origins: Sequence[KafkaOrigin] | None = None) -> list[list[Any]]:
    """The rows as columns in `SPAN_COLUMNS` order, for a column-oriented insert.

    One C-level `map(attrgetter)` per column: the writer must keep up with the
    whole span stream in one Python process, and building row tuples to
    transpose them is slower (and wakes the garbage collector).
    """
    columns = [list(map(getter, rows)) for getter in _SPAN_GETTERS]
    columns[_COUNTS] = [_clamp_counts(column) for column in columns[_COUNTS]]
    cost = columns[-3]
    priced = [
        0 if value is None or UNPRICED_CHARGED in row.extra else 1
        for value, row in zip(cost, rows, strict=True)
    ]
    if None in cost or not all(0.0 <= value < math.inf for value in cost if value is not None):
        columns[-3] = [_storable_cost(value) for value in cost]
    return [*columns, priced, *_origin_columns(origins, len(rows))]


def _storable_cost(value: float | None) -> float:
    """0.0 for no cost; decoding rejects a cost that is not finite or negative, this is a last guard
    so that no sum over `cost_usd` can be poisoned."""
    if value is None:
        return 0.0
    if not 0.0 <= value < math.inf:
        log.error("a span cost of %r reached the writer: stored as 0", value)
        return 0.0
    return value


def _micros(value: datetime | None) -> int | None:
    """Epoch microseconds; a naive datetime is taken as UTC (the contract's zone)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


#: Signal fields and how each becomes a column value.
_SIGNAL_FIELDS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("v", int),
    ("scope", str),
    ("key", str),
    ("budget", str),
    ("action", str),
    ("downgrade_to", lambda value: value),
    ("metric", str),
    ("spent", float),
    ("limit", float),
    ("ratio", float),
    ("window_start", _micros),
    ("window_end", _micros),
    ("burn_rate_per_hour", float),
    ("projected_exhaustion", _micros),
    ("issued_at", _micros),
    ("expires_at", _micros),
    ("reason", str),
)
SIGNAL_COLUMNS: tuple[str, ...] = (
    "kafka_key",
    *(name for name, _ in _SIGNAL_FIELDS),
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)


def signal_columns(
    signals: Sequence[Signal], origins: Sequence[KafkaOrigin] | None = None
) -> list[list[Any]]:
    """The signals as columns in `SIGNAL_COLUMNS` order."""
    columns: list[list[Any]] = [[signal.kafka_key for signal in signals]]
    columns += [[convert(getattr(signal, name)) for signal in signals] for name, convert in _SIGNAL_FIELDS]
    return columns + _origin_columns(origins, len(signals))


def _chunks(count: int, size: int) -> Iterable[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _wire_type(type_name: str) -> str:
    """The type the client encodes a column as: LowCardinality(T) travels as T.

    clickhouse-connect builds LowCardinality dictionaries in Python, which
    costs more than the rest of the insert; ClickHouse converts a Native
    `T` column into `LowCardinality(T)` itself (input_format_native_allow_types_conversion).
    """
    prefix = "LowCardinality("
    if type_name.startswith(prefix) and type_name.endswith(")"):
        return type_name[len(prefix) : -1]
    return type_name


class ClickHouseWriter:
    """Column-oriented batch inserts of spans and signals.

    A batch is inserted as one INSERT (one part per partition it touches); a
    failed insert raises and leaves retrying to the caller, which is safe
    because the tables collapse re-inserted rows (see `schema`). The column
    types are read from the table once per writer (insert contexts are reused).
    """

    def __init__(self, client: Client, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.client = client
        self.batch_size = batch_size
        self._contexts: dict[str, InsertContext] = {}

    def insert_spans(self, rows: Sequence[SpanUsage], origins: Sequence[KafkaOrigin] | None = None) -> int:
        """Insert spans in batches of `batch_size`; return how many were written."""
        for part in _chunks(len(rows), self.batch_size):
            part_origins = origins[part] if origins is not None else None
            self._insert(SPANS_TABLE, SPAN_COLUMNS, span_columns(rows[part], part_origins))
        return len(rows)

    def insert_signals(self, signals: Sequence[Signal], origins: Sequence[KafkaOrigin] | None = None) -> int:
        """Insert signals in batches of `batch_size`; return how many were written."""
        for part in _chunks(len(signals), self.batch_size):
            part_origins = origins[part] if origins is not None else None
            self._insert(SIGNALS_TABLE, SIGNAL_COLUMNS, signal_columns(signals[part], part_origins))
        return len(signals)

    def _insert(self, table: str, column_names: Sequence[str], columns: list[list[Any]]) -> None:
        context = self._contexts.get(table) or self._new_context(table, column_names)
        context.data = columns
        self.client.insert(context=context)

    def _new_context(self, table: str, column_names: Sequence[str]) -> InsertContext:
        described = self.client.create_insert_context(table, list(column_names))
        wire_types = [_wire_type(column_type.name) for column_type in described.column_types]
        context = self.client.create_insert_context(
            table, list(column_names), column_type_names=wire_types, column_oriented=True
        )
        self._contexts[table] = context
        return context

    def close(self) -> None:
        self.client.close()
