"""A stream worker whose stage-1 send fails once: `python -m tests.support.failing_send_worker`.

The `FAIL_SEND_AT`-th micro-batch with usage records (default 3) finds the producer failing
(`KafkaTimeoutError`, as aiokafka raises when its buffer stays full past the request timeout):
nothing of it is handed over. Every other send goes through.
"""

from __future__ import annotations

import logging
import os

import faust
from burnguard.stream.app import create_job
from burnguard.stream.records import BATCHES
from burnguard.stream.settings import StreamSettings
from kafka.errors import KafkaTimeoutError

logger = logging.getLogger(__name__)


def main() -> None:
    settings = StreamSettings.from_env()
    job = create_job(settings)
    records, send = job.usage_records, job.usage_records.send
    fail_at, sends = int(os.environ.get("FAIL_SEND_AT", "3")), [0]

    async def failing_once() -> list:
        if any(key == BATCHES.encode() for _, _, key, _, _ in records._pending):
            sends[0] += 1
            if sends[0] == fail_at:
                records._pending = []
                logger.warning("test hook: this micro-batch's send fails")
                raise KafkaTimeoutError("test hook: the producer's buffer stayed full")
        return await send()

    records.send = failing_once  # type: ignore[method-assign]
    faust.Worker(job.app, loglevel="info", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
