"""A stream worker whose stage 1 falls behind its fetches: `python -m tests.support.small_queue_worker`.

Stage 1's channel queue holds `QUEUE_MESSAGES` events instead of Faust's `stream_buffer_maxsize`
(4,096), so every fetch of a backlog fills it past Faust's pressure mark (`QUEUE_MESSAGES / 1.25`):
the consumer stops handing that partition's records over (`Consumer.on_buffer_full`, a pause)
until stage 1 has taken the queue down to `QUEUE_MESSAGES * 0.4` (`on_buffer_drop`, the resume).
The mark is crossed within one fetch's delivery (`fetching._Consumer._deliver` lets the loop run
every `YIELD_EVERY_MESSAGES`, more than the mark), so it does not depend on timing.

Each pause and resume is logged as it happens, with whether the partition then is out of, or
back in, the consumer's active partitions: what a test observes instead of assuming it. The
hook calls Faust's own method first and only reads the consumer's sets after it.
"""

from __future__ import annotations

import logging
from typing import Any

from burnguard.stream.app import create_job, make_worker
from burnguard.stream.fetching import YIELD_EVERY_MESSAGES, _Consumer
from burnguard.stream.settings import StreamSettings

logger = logging.getLogger(__name__)

#: Stage 1's queue size: its pressure mark (32) is crossed before `_deliver` lets stage 1 run.
QUEUE_MESSAGES = 40
assert QUEUE_MESSAGES < YIELD_EVERY_MESSAGES
PAUSED = "test hook: paused"
RESUMED = "test hook: resumed"


def _active(consumer: Any, tp: Any) -> bool:
    """Whether `tp` is among the partitions whose records the consumer hands over (None: all are)."""
    active = consumer._active_partitions
    return active is None or tp in active


def log_pauses_and_resumes() -> None:
    """Wrap the consumer's pressure callbacks to log each change of a partition's buffered state."""
    on_buffer_full, on_buffer_drop = _Consumer.on_buffer_full, _Consumer.on_buffer_drop

    def full(self: Any, tp: Any) -> None:
        already = tp in self._buffered_partitions
        on_buffer_full(self, tp)
        if not already and tp in self._buffered_partitions:
            logger.info("%s %s:%d active=%s", PAUSED, tp.topic, tp.partition, _active(self, tp))

    def drop(self: Any, tp: Any) -> None:
        buffered = tp in self._buffered_partitions
        on_buffer_drop(self, tp)
        if buffered and tp not in self._buffered_partitions:
            logger.info("%s %s:%d active=%s", RESUMED, tp.topic, tp.partition, _active(self, tp))

    _Consumer.on_buffer_full = full  # type: ignore[method-assign]
    _Consumer.on_buffer_drop = drop  # type: ignore[method-assign]


def main() -> None:
    settings = StreamSettings.from_env()
    job = create_job(settings)
    job.spans_topic.maxsize = QUEUE_MESSAGES  # stage 1's agent channel is cloned from it at start
    log_pauses_and_resumes()
    make_worker(job).execute_from_commandline()


if __name__ == "__main__":
    main()
