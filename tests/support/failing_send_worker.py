"""A stream worker whose stage-1 send fails once: `python -m tests.support.failing_send_worker`.

The `FAIL_SEND_AT`-th micro-batch with usage records (default 3) finds the producer failing
(`KafkaTimeoutError`, as aiokafka raises when its buffer stays full past the request timeout):
nothing of it is handed over. Every other send goes through. With `FAIL_COMBINE_AT=N` instead,
the N-th group of combined rows raises while its rows are made (`BudgetJob._close_group`), once. With
`REFUSE_AT=N`, the N-th micro-batch with usage records has its first one padded with a header of
`REFUSED_PAD` bytes, once: the test made the usage topic's `max.message.bytes` smaller, so the
real broker refuses it after the hand-over (only its delivery future says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from burnguard.stream.app import BudgetJob, create_job, make_worker
from burnguard.stream.records import BATCHES, GROUPS
from burnguard.stream.settings import StreamSettings
from kafka.errors import KafkaTimeoutError

logger = logging.getLogger(__name__)
USAGE_KINDS = (BATCHES.encode(), GROUPS.encode())


def main() -> None:
    settings = StreamSettings.from_env()
    job = create_job(settings)
    if "FAIL_COMBINE_AT" in os.environ:
        fail_combining_once(int(os.environ["FAIL_COMBINE_AT"]))
    elif "REFUSE_AT" in os.environ:
        refused_once(job, int(os.environ["REFUSE_AT"]), int(os.environ["REFUSED_PAD"]))
    else:
        fail_sending_once(job, int(os.environ.get("FAIL_SEND_AT", "3")))
    make_worker(job).execute_from_commandline()


def fail_sending_once(job: object, fail_at: int) -> None:
    def fail(records: object) -> None:
        records._pending = []  # type: ignore[attr-defined]
        logger.warning("test hook: this micro-batch's send fails")
        raise KafkaTimeoutError("test hook: the producer's buffer stayed full")

    at_the_nth_usage_send(job, fail_at, fail)


def refused_once(job: object, refuse_at: int, pad: int) -> None:
    def pad_the_first_usage_record(records: object) -> None:
        pending = records._pending  # type: ignore[attr-defined]
        index = next(i for i, (_, _, key, _, _) in enumerate(pending) if key in USAGE_KINDS)
        topic, partition, key, value, headers = pending[index]
        pending[index] = (topic, partition, key, value, [*(headers or []), ("test-pad", b"x" * pad)])
        logger.warning("test hook: this micro-batch's records are refused")

    at_the_nth_usage_send(job, refuse_at, pad_the_first_usage_record)


def at_the_nth_usage_send(job: object, nth: int, action: Callable[[object], None]) -> None:
    """Run `action` on the pending records of the `nth` send with usage records, then send them."""
    records, send = job.usage_records, job.usage_records.send  # type: ignore[attr-defined]
    sends = [0]

    async def send_with_the_hook() -> list:
        if any(key in USAGE_KINDS for _, _, key, _, _ in records._pending):
            sends[0] += 1
            if sends[0] == nth:
                action(records)
        return await send()

    records.send = send_with_the_hook  # type: ignore[method-assign]


def fail_combining_once(fail_at: int) -> None:
    """At the job's closing of a group, so the hook holds for either kind of group (the native
    `Groups` or `GroupRows`, `records.new_group_rows`); a hook on `GroupRows.rows` never fired once
    the groups were native."""
    close, groups = BudgetJob._close_group, [0]

    def failing_once(self: BudgetJob, partition: int, group: Any, batch: Any) -> None:
        groups[0] += 1
        if groups[0] == fail_at:
            logger.warning("test hook: this group's rows fail")
            raise ValueError("test hook: a group's rows could not be made")
        close(self, partition, group, batch)

    BudgetJob._close_group = failing_once  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
