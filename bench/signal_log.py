"""CPU per signal of the worker's signal log line, with the logging a worker sets up.

`faust.Worker` (mode's `Worker._setup_logging` -> `mode.utils.logging.setup_logging`, no log
file) logs through a `colorlog.StreamHandler` on stderr, which the deployments and the benches
send to a file, with mode's colorlog formatter, flushing each record. This bench sets up logging the same way,
writing to a file, and times `--lines` signal lines as `BudgetJob._send_signal` wrote them at
INFO before, and the DEBUG call it makes now (at the worker's default level, INFO, the record
is never made). Best of `--repeat`, CPU time (`time.process_time`).

    .venv/bin/python bench/signal_log.py [--lines 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: A signal line of the bench load (`span_load.BUDGETS_YAML`), as `_send_signal` formats it.
ARGS = (
    "tenant:tenant-0007@tenant-daily",
    "throttle",
    "tenant-daily tenant=tenant-0007: cost_usd 2.0312 of 2 (101.6%) in day "
    "2026-12-02T00:00:00+00:00..2026-12-03T00:00:00+00:00",
)


def best_us(log: Callable[..., None], lines: int, repeat: int) -> float:
    fastest = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(lines):
            log("signal %s -> %s (%s)", *ARGS)
        fastest = min(fastest, time.process_time() - started)
    return fastest / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lines", type=int, default=5000, help="signal lines per run (default 5000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts (default 5)")
    args = parser.parse_args()
    from mode.utils.logging import setup_logging

    with tempfile.TemporaryDirectory() as scratch, (Path(scratch) / "worker.log").open("w") as out:
        sys.stderr = out  # mode's handler writes to stderr, which a deployment sends to a file
        try:
            setup_logging(loglevel="info", logfile=sys.stderr)  # as `faust.Worker(loglevel="info")`
            logger = logging.getLogger("burnguard.stream.app")
            formatter = type(logging.getLogger().handlers[0].formatter).__name__
            info_us = best_us(logger.info, args.lines, args.repeat)
            debug_us = best_us(logger.debug, args.lines, args.repeat)
            logging.getLogger().handlers.clear()
        finally:
            sys.stderr = sys.__stderr__
        out.flush()
        written = Path(out.name).stat().st_size
    print(f"formatter {formatter}; {written} bytes written by {args.lines * args.repeat} INFO lines")
    print(f"INFO line per signal {info_us:.1f} us; DEBUG call at level INFO {debug_us:.2f} us")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)")
    figures = f"info_us_per_signal={info_us:.1f} debug_us_per_signal={debug_us:.2f}"
    print(f"RESULT signal_log lines={args.lines} {figures}")


if __name__ == "__main__":
    main()
