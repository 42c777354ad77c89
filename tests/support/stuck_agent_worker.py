"""A stream worker whose ingest agent never finishes one micro-batch (`tests.support.stuck_agent_worker`).

The `STUCK_AT`-th micro-batch (default 2) waits forever, its events never acked: the shape of
an agent that holds its events past a stop (stuck on an await, or a crashed actor whose
`take_events` buffer outlived it). Faust's stop waits for those acks with no bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from burnguard.stream.app import create_job, make_worker
from burnguard.stream.settings import StreamSettings

logger = logging.getLogger(__name__)


def main() -> None:
    job = create_job(StreamSettings.from_env())
    ingest, batches, stuck_at = job._ingest_batch, [0], int(os.environ.get("STUCK_AT", "2"))

    async def stuck_once(events: list[Any]) -> None:
        batches[0] += 1
        if batches[0] == stuck_at:
            logger.warning("test hook: this micro-batch never finishes")
            await asyncio.Event().wait()
        await ingest(events)

    job._ingest_batch = stuck_once  # type: ignore[method-assign]
    make_worker(job).execute_from_commandline()


if __name__ == "__main__":
    main()
