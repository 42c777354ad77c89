"""`python -m burnguard.sinks` and `burnguard sink`: run the ClickHouse sink, configured from the environment.

The command line and its wiring only: the options (each with its environment
variable), logging, SIGTERM/SIGINT as a graceful stop, and where the sink's price
overrides come from before the budgets topic has any (`BURNGUARD_BUDGETS_FILE`).
What the sink does is in `consumer.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from burnguard.contracts.env_numbers import env_number
from burnguard.contracts.logs import env_log_level, quiet_library_logs
from burnguard.contracts.topics import KafkaSettings, Topics, check_connection
from burnguard.sinks.consumer import DEFAULT_BATCH_MAX, DEFAULT_FLUSH_INTERVAL_S, DEFAULT_GROUP, run_sink
from kafka.errors import KafkaError

# Named for the package: run with `-m`, this module is `__main__`.
log = logging.getLogger("burnguard.sinks")


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m burnguard.sinks",
        description="Write GenAI spans and budget signals from Kafka to ClickHouse.",
    )
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap (BURNGUARD_KAFKA_BOOTSTRAP)")
    parser.add_argument("--dsn", default=None, help="ClickHouse DSN (BURNGUARD_CLICKHOUSE_DSN)")
    parser.add_argument(
        "--group", default=env.get("BURNGUARD_SINK_GROUP", DEFAULT_GROUP), help="(BURNGUARD_SINK_GROUP)"
    )
    parser.add_argument(
        "--batch-max", type=int, default=env_number("BURNGUARD_SINK_BATCH_MAX", DEFAULT_BATCH_MAX, int)
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=env_number("BURNGUARD_SINK_FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL_S),
        help="seconds a partial batch waits before it is written",
    )
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=None,
        help="Kafka group session timeout: how soon a dead sink's partitions move on",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="kafka-python's INFO chatter too (BURNGUARD_VERBOSE)"
    )
    return parser.parse_args(argv)


def _consumer_options(session_timeout_ms: int | None) -> dict[str, Any]:
    """kafka-python options from the command line; heartbeats at a third of the session timeout."""
    if not session_timeout_ms:
        return {}
    return {
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": max(session_timeout_ms // 3, 100),
    }


def _budgets_file() -> Path | None:
    """The budgets file whose price overrides the sink uses until the budgets topic has any."""
    budgets_file = os.environ.get("BURNGUARD_BUDGETS_FILE")
    return Path(budgets_file) if budgets_file else None


def main(argv: Sequence[str] = ()) -> int:
    """Entry point of `python -m burnguard.sinks` and `burnguard sink`.

    Configured from the environment; `argv` (the module's command line) may
    override it. The default is no arguments, not `sys.argv`, because the
    `burnguard` CLI calls this with its own command line still in `sys.argv`.
    """
    args = _parse_args(argv)
    logging.basicConfig(
        level=env_log_level().upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_library_logs(args.verbose or None)
    stop_event = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s, flushing and stopping", signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    kafka = KafkaSettings.from_env(args.bootstrap)
    try:
        check_connection(kafka)
        run_sink(
            kafka,
            Topics.from_env(),
            args.dsn,
            stop_event,
            batch_max=args.batch_max,
            flush_interval_s=args.flush_interval,
            group_id=args.group,
            consumer_options=_consumer_options(args.session_timeout_ms),
            budgets_file=_budgets_file(),
        )
    except KafkaError as exc:  # e.g. no broker at start: say so in one line, exit for a restart
        log.error("cannot consume from Kafka at %s: %s", kafka.bootstrap, exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
