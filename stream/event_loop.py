"""Which asyncio event loop the worker runs on: uvloop by default, asyncio's own by choice.

Faust's agents, timers and aiokafka's clients are callbacks, futures and socket reads on the
loop, and asyncio's loop turns (`_run_once`, its handles, the selector) are Python. uvloop (libuv,
in C) runs the same callbacks without them (end to end within a run's spread: BENCHMARKS.md,
"The worker on uvloop"). The choice is a loop policy, set before the app exists: every loop made
afterwards, the main thread's and Faust's consumer thread's, is of that kind. asyncio's loop
stays the choice where uvloop is not installed (Windows) and for debugging
(`BURNGUARD_EVENT_LOOP=asyncio`).
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)

#: The values `BURNGUARD_EVENT_LOOP` takes.
EVENT_LOOPS = ("uvloop", "asyncio")


def use_event_loop(name: str) -> str:
    """Make `name` (one of `EVENT_LOOPS`: `StreamSettings` checks it) the kind of every event loop
    made from now on; returns the kind in use. Without uvloop installed that is asyncio's, said so.
    """
    if name == "asyncio":
        asyncio.set_event_loop_policy(None)
        return name
    try:
        import uvloop
    except ImportError:
        logger.warning("uvloop is not installed: the worker runs on asyncio's event loop")
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return name


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: what a running loop is (logged once the worker runs)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
