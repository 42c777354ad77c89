"""Step caps per session: an agent loop stops at the step its session declared as the last.

The stream-side `tool_calls` budget sees every process, but only after the
spans arrive; a loop that runs away takes many steps in that time. So a
session declares its caps in code and this process counts its steps itself
and refuses the next one at once. Counts live in a bounded LRU keyed by the
session id, so a session that spans many requests in one process keeps them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from burnguard.instrumentation.attribution import attribute
from burnguard.instrumentation.refusals import StepCapExceeded

LLM_CALLS = "llm_calls"
TOOL_CALLS = "tool_calls"
MAX_TRACKED_SESSIONS = 100_000


@dataclass(slots=True)
class _SessionSteps:
    caps: dict[str, int] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)


class StepCounter:
    """Steps taken per session in this process, against the caps each session declared."""

    def __init__(self, max_sessions: int = MAX_TRACKED_SESSIONS) -> None:
        self._sessions: OrderedDict[str, _SessionSteps] = OrderedDict()
        self._max_sessions = max_sessions
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True once any session declared caps: until then no call pays for a look-up."""
        return bool(self._sessions)

    def declare(self, session: str, caps: dict[str, int]) -> None:
        """Set (or change) a session's caps; steps already taken still count."""
        with self._lock:
            steps = self._sessions.get(session) or _SessionSteps()
            steps.caps.update(caps)
            self._remember(session, steps)

    def _remember(self, session: str, steps: _SessionSteps) -> None:
        self._sessions[session] = steps
        self._sessions.move_to_end(session)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)

    def take(self, session: str, kind: str) -> None:
        """Count one step of `kind`, or raise `StepCapExceeded` if the session's cap is reached."""
        if not session or not self._sessions:
            return
        with self._lock:
            steps = self._sessions.get(session)
            if steps is None or kind not in steps.caps:
                return
            self._sessions.move_to_end(session)  # an active session is the last one to forget
            taken = steps.taken.get(kind, 0)
            if taken >= steps.caps[kind]:
                raise StepCapExceeded(session, kind, steps.caps[kind])
            steps.taken[kind] = taken + 1

    def taken(self, session: str, kind: str) -> int:
        with self._lock:
            steps = self._sessions.get(session)
            return steps.taken.get(kind, 0) if steps is not None else 0

    def forget(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


#: The process-wide counter every instrumented call consults.
step_counter = StepCounter()


@contextmanager
def session(
    session_id: str, *, max_llm_calls: int | None = None, max_tool_calls: int | None = None
) -> Iterator[str]:
    """Attribute the block to `session_id` and cap the steps the session may take in this process.

    The call after the `max_llm_calls`-th model call, or the tool call after the
    `max_tool_calls`-th, raises `StepCapExceeded` before it is made. Caps stay
    with the session id, so entering the block again for the next request of
    the same session continues the count.
    """
    declared = ((LLM_CALLS, max_llm_calls), (TOOL_CALLS, max_tool_calls))
    caps = {kind: cap for kind, cap in declared if cap is not None}
    for kind, cap in caps.items():
        if cap < 0:
            raise ValueError(f"{kind} cap must be 0 or more, not {cap}")
    if caps:
        step_counter.declare(session_id, caps)
    with attribute(session=session_id):
        yield session_id
