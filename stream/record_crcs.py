"""aiokafka's fetched record batches checked with the `crc32c` package's hardware CRC-32C.

aiokafka checks each v2 record batch's CRC-32C (`check_crcs`, on by default and in Faust) with its
own table-driven C loop, ~0.74 GB/s on this machine: a catch-up of 900,000 realistic spans reads
~470 MB of `otlp_spans`, about half of Faust's consumer thread's CPU on a core, on a two-core
machine where the main thread (stages 1 and 2) waits ~1 s per run for a core (BENCHMARKS.md, "The
consumer thread's CRC checks, and the switch interval"). The `crc32c` package (already a dependency:
kafka-python's checks use it) computes the same checksum with the CPU's CRC32 instruction where it
has one, ~20 GB/s (`contracts/fetched_batches.py:crc_matches`, which the kafka-python consumers'
C reader checks with too).

The check stays where aiokafka makes it and says what it says: `PartitionRecords` takes each batch
in turn and raises `CorruptRecordException("Invalid CRC - <tp>")` at the first batch whose stored
CRC is not the one computed over its bytes from the attributes field to its end, after handing over
the batches before it. A fetcher whose `check_crcs` is off checks nothing, as before. A batch this
module cannot place in the fetched bytes (not v2, or a length that does not fit) is checked by
aiokafka's own `validate_crc`.
"""

from __future__ import annotations

from typing import Any

import aiokafka.consumer.fetcher as fetcher_module
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.memory_records import MemoryRecords
from burnguard.contracts.fetched_batches import ATTRIBUTES_AT, batch_end, crc_matches


class FetchedRecords:
    """aiokafka's `MemoryRecords` over a partition's fetched bytes, which it keeps to check batches.

    Until `check_crcs_of` is called it only hands over what `MemoryRecords` does.
    """

    __slots__ = ("_data", "_position", "_records", "_tp")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._records = MemoryRecords(data)
        #: where the next batch starts in `_data`
        self._position = 0
        #: the partition named in a failed check; None: no check
        self._tp: Any = None

    def check_crcs_of(self, tp: Any) -> None:
        """Check every batch handed over from now on, naming `tp` when one fails."""
        self._tp = tp

    def has_next(self) -> bool:
        return self._records.has_next()

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def next_batch(self) -> Any:
        """`MemoryRecords.next_batch`, the batch's CRC checked when asked (the module doc)."""
        batch = self._records.next_batch()
        if self._tp is None or batch is None:
            return batch
        start = self._position
        data = self._data
        end = self._position = batch_end(data, start)
        if isinstance(batch, DefaultRecordBatch) and start + ATTRIBUTES_AT <= end <= len(data):
            valid = crc_matches(data, start, end, batch.crc)
        else:
            valid = batch.validate_crc()
        if not valid:
            raise CorruptRecordException(f"Invalid CRC - {self._tp}")
        return batch


class HardwareCrcPartitionRecords(fetcher_module.PartitionRecords):
    """aiokafka's `PartitionRecords`, leaving the CRC check to `FetchedRecords` when it can."""

    def __init__(
        self,
        tp: Any,
        records: Any,
        aborted_transactions: Any,
        fetch_offset: int,
        key_deserializer: Any,
        value_deserializer: Any,
        check_crcs: bool,
        isolation_level: Any,
    ) -> None:
        if check_crcs and isinstance(records, FetchedRecords):
            records.check_crcs_of(tp)
            check_crcs = False
        super().__init__(
            tp,
            records,
            aborted_transactions,
            fetch_offset,
            key_deserializer,
            value_deserializer,
            check_crcs,
            isolation_level,
        )


def install() -> None:
    """Make every aiokafka fetcher of this process check CRCs through this module (idempotent)."""
    for name in ("MemoryRecords", "PartitionRecords"):
        if not isinstance(getattr(fetcher_module, name, None), type):  # the check would stay aiokafka's
            raise RuntimeError(f"aiokafka.consumer.fetcher without {name}: update stream/record_crcs.py")
    if fetcher_module.MemoryRecords is not FetchedRecords:
        fetcher_module.MemoryRecords = FetchedRecords  # type: ignore[misc,assignment]
    if fetcher_module.PartitionRecords is not HardwareCrcPartitionRecords:
        fetcher_module.PartitionRecords = HardwareCrcPartitionRecords  # type: ignore[misc]
