"""Where a bench's stream worker waits: its event loop's blocking selects, its task steps, its run queue.

A diagnostic, not a bench: put this directory first on PYTHONPATH and name an output file, e.g.

    HX_LOOP_PROBE=/tmp/loop.txt PYTHONPATH=bench/loop_probe .venv/bin/python \
        bench/stream_throughput.py --spans 600000 --batch-min 10 --batch-max 20 ...

Python imports `sitecustomize` at start-up; only a bench's worker (`BURNGUARD_STREAM_APP_ID` set
by `pipeline_setup`) is probed. At exit it writes: the main thread's time in blocking selects
(the loop had nothing ready: the worker waited for Kafka or a timer), per second and with what
the waiting tasks awaited (sampled every fifth blocking select); the main thread's CPU time and
its time runnable but not running (`/proc/.../schedstat`: the machine's other processes); the
loop's turns and handles, by task coroutine or callback (one in seven counted, times seven).
The probe's own cost slows the worker: compare its figures with each other, not spans/s.
"""

from __future__ import annotations

import os

if os.environ.get("HX_LOOP_PROBE") and os.environ.get("BURNGUARD_STREAM_APP_ID"):
    import asyncio
    import asyncio.events
    import atexit
    import selectors
    import threading
    import time
    from collections import Counter
    from typing import Any

    _MARKERS = ("_ingest", "_account", "_drain_messages", "_deliver", "flush", "commit", "_fetch", "send")
    _waits: Counter[str] = Counter()
    _idle_by_second: Counter[int] = Counter()
    _handles: Counter[str] = Counter()
    _totals = {"idle": 0.0, "sampled": 0.0, "blocking": 0, "turns": 0, "handles": 0}
    _started = time.perf_counter()
    _select = selectors.EpollSelector.select
    _run = asyncio.events.Handle._run

    def _chain(coro: Any) -> list[Any]:
        """A suspended task's coroutines, outermost first (`Task.get_stack` gives only the outermost)."""
        chain = [coro]
        while hasattr(getattr(chain[-1], "cr_await", None), "cr_frame"):
            chain.append(chain[-1].cr_await)
        return chain

    def _awaited() -> list[str]:
        """What each task of interest awaits: its four innermost coroutines, innermost first."""
        found = []
        for task in asyncio.all_tasks():
            names = [
                f"{getattr(coro, '__qualname__', '?')}:{coro.cr_frame.f_lineno if coro.cr_frame else '-'}"
                for coro in _chain(task.get_coro())
            ]
            if any(marker in name for name in names for marker in _MARKERS):
                found.append(" <- ".join(reversed(names[-4:])))
        return found

    def _probed_select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return _select(self, timeout)
        _totals["turns"] += 1
        if timeout == 0:
            return _select(self, timeout)
        _totals["blocking"] += 1
        awaited = _awaited() if _totals["blocking"] % 5 == 0 else None
        began = time.perf_counter()
        ready = _select(self, timeout)
        waited = time.perf_counter() - began
        _totals["idle"] += waited
        _idle_by_second[int(began - _started)] += waited
        if awaited is not None:
            _totals["sampled"] += waited
            for stack in awaited:
                _waits[stack] += waited
        return ready

    def _probed_run(self: asyncio.events.Handle) -> None:
        _totals["handles"] += 1
        if _totals["handles"] % 7 == 0 and threading.current_thread() is threading.main_thread():
            owner = getattr(self._callback, "__self__", None)
            if isinstance(owner, asyncio.Task):
                chain = _chain(owner.get_coro())
                outer, inner = (getattr(coro, "__qualname__", "?") for coro in (chain[0], chain[-1]))
                name = f"task {outer} @ {inner}"
            else:
                name = getattr(self._callback, "__qualname__", repr(self._callback)[:60])
            _handles[name] += 7
        _run(self)

    def _report() -> None:
        wall = time.perf_counter() - _started
        tid = threading.main_thread().native_id
        with open(f"/proc/self/task/{tid}/schedstat") as stat:
            on_cpu_ns, runnable_ns, _slices = stat.read().split()
        lines = [
            f"wall {wall:.1f}s; main thread in blocking selects {_totals['idle']:.2f}s "
            f"({_totals['idle'] / wall:.1%}), {_totals['blocking']} of {_totals['turns']} loop turns",
            f"main thread on CPU {int(on_cpu_ns) / 1e9:.2f}s, "
            f"runnable waiting for a CPU {int(runnable_ns) / 1e9:.2f}s",
            "blocking selects per second: "
            + " ".join(f"{second}:{idle:.2f}" for second, idle in sorted(_idle_by_second.items())),
            f"handles run: {_totals['handles']}",
            *(f"{count:9d}  {name}" for name, count in _handles.most_common(30)),
            "awaited during blocking selects (sampled):",
            *(f"{idle:8.3f}s  {stack}" for stack, idle in _waits.most_common(20)),
        ]
        with open(os.environ["HX_LOOP_PROBE"], "w") as out:
            out.write("\n".join(lines) + "\n")

    selectors.EpollSelector.select = _probed_select  # type: ignore[method-assign]
    asyncio.events.Handle._run = _probed_run  # type: ignore[method-assign]
    atexit.register(_report)
