"""Where a process's CPU goes per thread, and what its main thread waits on, sampled from /proc.

The worker's limit is its main thread (the event loop: stages 1 and 2). Its other threads (the
Kafka clients' IO loops, Faust's consumer thread, the signal checkpoint follower) run Python too,
and every bytecode they run holds the GIL the main thread then waits for. py-spy's on-CPU samples
cannot tell a thread spinning from one just woken (or waiting for a core on a shared machine), so
this reads the kernel's own accounts:

* per thread, user + system CPU (`/proc/<pid>/task/<tid>/stat`), named by `py-spy dump` (Python
  3.11 does not name its OS threads), numbers in the names dropped so alike threads add up;
* the main thread's state, sampled every `state_interval_s`: running (or runnable: waiting for a
  core), asleep in a futex (the GIL: the event loop thread takes no other lock on its hot path),
  asleep in epoll (idle: nothing to do), or elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: `py-spy dump` lines naming a thread: `Thread 1234 (idle): "name"`
_DUMP_THREAD = re.compile(r'^Thread (\d+) \((?:idle|active|gil)[^)]*\): "(.*)"', re.MULTILINE)
#: numbers in thread names (`kafka-io-kafka-python-3.0.12-7`, `Thread-3`, `asyncio_0`)
_NUMBERS = re.compile(r"[-_ ]?\d+(\.\d+)*")
#: wait channels of a thread asleep on a futex (the GIL) or in epoll
_FUTEX = ("futex",)
_EPOLL = ("epoll", "ep_poll")


def _thread_cpu(pid: int, tid: int) -> float | None:
    """User + system CPU seconds of one thread (None: gone)."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def thread_cpu_s(tid: int) -> float:
    """User + system CPU seconds of a thread of this process (0 once gone)."""
    return _thread_cpu(os.getpid(), tid) or 0.0


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def run_queue_wait_s(pid: int) -> float:
    """Seconds the main thread has waited for a core while runnable (`schedstat`'s second field)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def main_thread_state(pid: int) -> str:
    """`running` (on a core or waiting for one), `gil` (futex), `idle` (epoll) or `other`."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "R":
            return "running"
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    if any(mark in wchan for mark in _FUTEX):
        return "gil"
    if any(mark in wchan for mark in _EPOLL):
        return "idle"
    return "other"


def thread_names(pid: int, py_spy: str | None) -> dict[int, str]:
    """Thread id -> its Python name and what it runs (`name (function)`), from `py-spy dump`.

    The function a thread was started with tells apart threads named alike (`Thread-3` is Faust's
    consumer thread, mode's `WorkerThread.run`). Empty without py-spy.
    """
    if py_spy is None:
        return {}
    try:
        dump = subprocess.run(
            [py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True, timeout=20
        ).stdout
    except subprocess.TimeoutExpired:
        return {}
    names = {}
    heads = list(_DUMP_THREAD.finditer(dump))
    for head, after in zip(heads, [*heads[1:], None], strict=False):  # no thread: a failed dump
        frames = dump[head.end() : after.start() if after else len(dump)].split("\n")
        names[int(head.group(1))] = f"{head.group(2)} ({_entry_function(frames)})"
    return names


def _entry_function(frames: list[str]) -> str:
    """The outermost frame of a thread's stack that is not `threading`'s own (its target)."""
    for frame in reversed([line.strip() for line in frames if line.strip()]):
        if "threading.py" not in frame:
            return frame.split(" (")[0]
    return "?"


def kind_of(name: str) -> str:
    """A thread's name without its numbers: alike threads (one per Kafka client, per pool) add up."""
    return _NUMBERS.sub("", name) or name


@dataclass
class ThreadSplit:
    """What `ThreadSampler` saw between `start` and `stop`."""

    elapsed_s: float
    #: thread kind -> CPU seconds (threads the sampler never named: `unnamed`)
    cpu_by_kind: Counter[str]
    #: main thread's sampled states -> samples
    main_states: Counter[str]
    main_tid: int
    #: seconds the main thread was runnable but waited for a core (the machine's other load)
    main_run_queue_s: float = 0.0
    threads_by_kind: Counter[str] = field(default_factory=Counter)
    #: each state sample: (`time.monotonic()`, state), for `states_between`
    main_samples: list[tuple[float, str]] = field(default_factory=list)

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_by_kind.values())

    def lines(self) -> list[str]:
        """The split, a line per kind (most CPU first), then the main thread's states."""
        out = [f"per-thread CPU over {self.elapsed_s:.1f}s (total {self.total_cpu_s:.1f}s):"]
        for kind, cpu in self.cpu_by_kind.most_common():
            share = cpu / max(self.total_cpu_s, 1e-9)
            out.append(
                f"  {cpu:7.2f}s {share:6.1%} ({cpu / self.elapsed_s:5.1%} of a core)  "
                f"{kind} x{self.threads_by_kind[kind]}"
            )
        samples = max(sum(self.main_states.values()), 1)
        states = ", ".join(f"{state} {n / samples:.1%}" for state, n in self.main_states.most_common())
        out.append(f"main thread's state ({samples} samples): {states}")
        out.append(f"main thread waited {self.main_run_queue_s:.1f}s for a core (runnable, not running)")
        return out

    def states_between(self, began: float, ended: float) -> str:
        """The main thread's states sampled from `began` to `ended` (monotonic), as `lines()` prints them.

        A bench's clock also holds its edges (the first fetch after Ready, the commits after the last
        record): split at a moment it knows, the idle of the catch-up itself shows apart from theirs.
        """
        states = Counter(state for at, state in self.main_samples if began <= at < ended)
        samples = max(sum(states.values()), 1)
        shares = ", ".join(f"{state} {n / samples:.1%}" for state, n in states.most_common())
        return f"{ended - began:.1f}s ({sum(states.values())} samples): {shares}"

    def result_fields(self) -> str:
        """`key=value` pairs for a RESULT line: the main thread's and the others' CPU, its GIL wait."""
        main = self.cpu_by_kind.get("MainThread", 0.0)
        samples = max(sum(self.main_states.values()), 1)
        return (
            f"main_thread_cpu_s={main:.1f} other_threads_cpu_s={self.total_cpu_s - main:.1f} "
            f"main_gil_wait={self.main_states['gil'] / samples:.3f} "
            f"main_idle={self.main_states['idle'] / samples:.3f} "
            f"main_run_queue_s={self.main_run_queue_s:.1f}"
        )


class ThreadSampler(threading.Thread):
    """Samples a process's threads' CPU and its main thread's state until `stop()`."""

    def __init__(
        self, pid: int, py_spy: str | None, state_interval_s: float = 0.01, name_every_s: float = 5.0
    ) -> None:
        super().__init__(daemon=True, name="thread-cpu")
        self.pid, self._py_spy = pid, py_spy
        self._state_interval_s, self._name_every_s = state_interval_s, name_every_s
        self._stop_event = threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._states: Counter[str] = Counter()
        self._samples: list[tuple[float, str]] = []
        self._began = self._ended = self._queued = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._queued = run_queue_wait_s(self.pid)
        self._read_cpu(first=True)
        super().start()

    def run(self) -> None:
        next_cpu = next_names = time.monotonic()
        while not self._stop_event.wait(self._state_interval_s):
            state = main_thread_state(self.pid)
            now = time.monotonic()
            self._states[state] += 1
            self._samples.append((now, state))
            if now >= next_cpu:
                self._read_cpu(first=False)
                next_cpu = now + 0.5
            if now >= next_names:
                self._names.update(thread_names(self.pid, self._py_spy))
                next_names = time.monotonic() + self._name_every_s

    def _read_cpu(self, first: bool) -> None:
        for tid in _threads(self.pid):
            cpu = _thread_cpu(self.pid, tid)
            if cpu is None:
                continue
            # a thread born during the run counts from zero
            self._first.setdefault(tid, cpu if first else 0.0)
            self._last[tid] = cpu

    def stop(self) -> ThreadSplit:
        self._stop_event.set()
        self.join()
        self._read_cpu(first=False)
        self._ended = time.monotonic()
        queued = run_queue_wait_s(self.pid) - self._queued
        self._names.update(thread_names(self.pid, self._py_spy))
        cpu_by_kind: Counter[str] = Counter()
        threads_by_kind: Counter[str] = Counter()
        for tid, last in self._last.items():
            kind = "MainThread" if tid == self.pid else kind_of(self._names.get(tid, "unnamed"))
            cpu_by_kind[kind] += last - self._first[tid]
            threads_by_kind[kind] += 1
        elapsed = self._ended - self._began
        return ThreadSplit(
            elapsed, cpu_by_kind, self._states, self.pid, queued, threads_by_kind, self._samples
        )


def find_py_spy(python: str) -> str | None:
    """py-spy next to `python`, or on PATH; None if neither (threads then stay unnamed)."""
    return shutil.which("py-spy", path=str(Path(python).parent)) or shutil.which("py-spy")
