"""A stream worker process started before a test needs it: `python -m tests.support.warm_worker`.

Importing the worker's modules (Faust, aiokafka, pydantic, the SDK and contracts) takes seconds of
every worker start; a test suite starts dozens. This process imports them first, then waits on
stdin for one JSON line from the pipeline fixture (`tests/fixtures/pipeline.py`): the module to
run as `__main__` (`burnguard.stream` or a test variant of it), the environment to run it with and
the log file. From there it is that worker, run exactly as `python -m <module>` would: its
settings, topics and logging are read from the environment it is given, after the order. The
fixture hands a process over only when the environment it started with differs from the order's
in `BURNGUARD_*` variables alone, which nothing reads at import. End of input (no order) exits.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import runpy
import sys
import threading

#: Set in the environment of a process that gets its order at once (no warm one could be used).
NEEDED_NOW = "WARM_WORKER_NEEDED_NOW"
#: What a warm process imports before its order; importing it reads no `BURNGUARD_*` variable
#: (`tests/test_warm_worker.py`), so the order's environment decides every setting.
PRELOADED = "burnguard.stream.app"


def preload() -> BaseException | None:
    """Import the worker's modules (the slow part); a failure is raised again into the worker's log."""
    try:
        importlib.import_module(PRELOADED)
    except BaseException as exc:  # stdout and stderr go nowhere before the order
        return exc
    return None


def yielding() -> int | None:
    """Import at the lowest CPU priority: the running test's processes (often timing-bound) go
    first. Only where the priority can be raised back at the order (root), so that the worker runs
    as a fresh one would; returns the priority to go back to, or None when left as it was. Not for
    a process started to be a worker at once (`NEEDED_NOW` in its environment): nothing to yield to."""
    if os.geteuid() != 0 or os.environ.get(NEEDED_NOW):
        return None
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    return priority


def take_order(order: dict) -> None:
    """Become the worker `order` describes: its log as stdout and stderr, its environment, no stdin."""
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(order["env"])


def read_order(priority: int | None, orders: queue.Queue[str]) -> None:
    """Wait for the order on a thread: once it comes, the imports (if still going) go on at the
    priority a fresh worker has, not starved behind the test that is now waiting for them."""
    line = sys.stdin.readline()
    if priority is not None:
        os.setpriority(os.PRIO_PROCESS, threading.main_thread().native_id, priority)
    orders.put(line)


def main() -> None:
    priority = yielding()
    orders: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_order, args=(priority, orders), daemon=True).start()
    failed = preload()
    line = orders.get()
    if not line.strip():
        return  # the session ended before a test needed this worker
    order = json.loads(line)
    take_order(order)
    if failed is not None:
        raise failed
    runpy.run_module(order["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
