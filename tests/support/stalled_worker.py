"""A stream worker that stalls on purpose: `python -m tests.support.stalled_worker` (from the repo root).

As partitions are assigned, before table recovery ends, it moves aiokafka's
position of every `otlp_spans` partition to the log end: the state the real
stall leaves (see `burnguard.stream.takeover`). The records already there are
not delivered to the agents and nothing is committed, while the worker
reports `Ready` and keeps fetching, unless something undoes it.

- `STALL_NO_REWIND=1` takes out the rewind after recovery, which undoes this
  stall, so that only the liveness watchdog is left to notice it;
- `STALL_UNHEALABLE=1` makes the watchdog's seek do nothing too, as for a
  stall it cannot heal: only the exit is left.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from burnguard.stream.app import create_job, make_worker
from burnguard.stream.liveness import LivenessWatchdog
from burnguard.stream.settings import StreamSettings

logger = logging.getLogger(__name__)


async def heal_nothing(watchdog: LivenessWatchdog, stalled: Mapping[Any, Any]) -> None:
    logger.info("test hook: the seek does nothing")


def skip_to_the_end(app: Any, spans_topic: str) -> Any:
    """An `on_partitions_assigned` receiver that moves the span partitions past their records."""

    async def on_assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        tps = [tp for tp in assigned if tp.topic == spans_topic]
        if not tps:
            return
        ends = await app.consumer.highwaters(*tps)
        await app.consumer.seek_wait(ends)
        logger.info("test hook: skipped to the end of %s", sorted(f"{tp.partition}@{ends[tp]}" for tp in tps))

    return on_assigned


def main() -> None:
    settings = StreamSettings.from_env()
    job = create_job(settings)
    if os.environ.get("STALL_NO_REWIND") == "1":
        job.app.sensors.remove(job.rewind)
    if os.environ.get("STALL_UNHEALABLE") == "1":
        LivenessWatchdog.heal = heal_nothing  # type: ignore[method-assign]
    job.app.on_partitions_assigned.connect(skip_to_the_end(job.app, settings.topics.spans))
    make_worker(job).execute_from_commandline()


if __name__ == "__main__":
    main()
