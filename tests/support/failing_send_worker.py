"""A stream worker whose stage-1 send fails once: `python -m tests.support.failing_send_worker`.

The `FAIL_SEND_AT`-th micro-batch with usage records (default 3) finds the producer failing
(`KafkaTimeoutError`, as aiokafka raises when its buffer stays full past the request timeout):
nothing of it is handed over. Every other send goes through. With `FAIL_COMBINE_AT=N` instead,
the N-th group of combined rows raises while its rows are made (`GroupRows.rows`), once.
"""

from __future__ import annotations

import logging
import os

from burnguard.stream.app import create_job, make_worker
from burnguard.stream.records import BATCHES, GROUPS, GroupRows
from burnguard.stream.settings import StreamSettings
from kafka.errors import KafkaTimeoutError

logger = logging.getLogger(__name__)


def main() -> None:
    settings = StreamSettings.from_env()
    job = create_job(settings)
    if "FAIL_COMBINE_AT" in os.environ:
        fail_combining_once(int(os.environ["FAIL_COMBINE_AT"]))
    else:
        fail_sending_once(job, int(os.environ.get("FAIL_SEND_AT", "3")))
    make_worker(job).execute_from_commandline()


def fail_sending_once(job: object, fail_at: int) -> None:
    records, send = job.usage_records, job.usage_records.send  # type: ignore[attr-defined]
    sends = [0]
    kinds = (BATCHES.encode(), GROUPS.encode())

    async def failing_once() -> list:
        if any(key in kinds for _, _, key, _, _ in records._pending):
            sends[0] += 1
            if sends[0] == fail_at:
                records._pending = []
                logger.warning("test hook: this micro-batch's send fails")
                raise KafkaTimeoutError("test hook: the producer's buffer stayed full")
        return await send()

    records.send = failing_once  # type: ignore[method-assign]


def fail_combining_once(fail_at: int) -> None:
    rows, groups = GroupRows.rows, [0]

    def failing_once(self: GroupRows) -> list:
        groups[0] += 1
        if groups[0] == fail_at:
            logger.warning("test hook: this group's rows fail")
            raise ValueError("test hook: a group's rows could not be made")
        return rows(self)

    GroupRows.rows = failing_once  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
