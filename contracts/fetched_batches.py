"""kafka-python's consumers reading fetched record batches with aiokafka's C reader.

kafka-python parses record batches in pure Python: ~5 us of the consuming thread's CPU per record,
all of it holding the GIL. Every stream worker reads back each signal it publishes
(`stream/signal_checkpoints.py`), so that parsing competes with the worker's event loop for the
GIL. aiokafka (the stream extra, under Faust) ships a Cython reader of the same format: the records
of a fetch, as kafka-python's own `ConsumerRecord`s, cost ~1 us each with it (BENCHMARKS.md,
helper hFollow).

`use_native_batches(consumer)` gives a consumer's fetcher `NativePartitionRecords`, which reads
a fetch with that reader when it can: every batch in the format every current broker writes
(magic 2), uncompressed, no deserializers, read-uncommitted isolation. Anything else, and the
whole install without aiokafka's extension (a guard in a user's app), stays on kafka-python's own
reader, the reference: both give the same records, positions and counts
(`tests/test_fetched_batches.py`). Where it reads, batches' CRCs are checked with the CPU's CRC32
instruction (`crc_matches`), as the worker's aiokafka consumer checks its fetches (`stream/record_crcs.py`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import crc32c
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords
from kafka.structs import TopicPartition

try:
    from aiokafka.record._crecords.default_records import DefaultRecordBatch as _CBatch
except ImportError:  # no stream extra, or aiokafka built without its extensions
    _CBatch = None

#: a batch's base offset (8 bytes), then its length (4: the bytes after it), leader epoch (4), magic (1)
_LENGTH = struct.Struct(">i")
_LENGTH_AT = 8
_EPOCH_AT = 12
_MAGIC_AT = 16
#: the base offset and the length: a batch is this many bytes longer than its length says
_LOG_OVERHEAD = 12
#: a magic 2 batch's attributes (2 bytes) follow its CRC (4) after the magic byte; the CRC covers
#: the batch from its attributes to its end
_ATTRIBUTES = struct.Struct(">h")
ATTRIBUTES_AT = 21
#: `crc32c`'s `gil_release_mode`: keep the GIL. A 78 kB batch takes ~4 us; let go (its default from
#: 32 KiB, as aiokafka's own loop lets go), a consumer thread then waited ~1.2 ms per batch to take the
#: GIL back from a busy main thread (BENCHMARKS.md, helper hConsume)
_KEEP_GIL = 0
_CODEC_MASK = 0x07
#: a magic 2 batch's header is 61 bytes, 12 of them before the length: the rest of its length is its
#: records. `bytes_read` (kafka-python's fetch metrics, read by nothing here) counts them with their
#: length prefixes, which kafka-python's reader leaves out: the only count of the two that differs
_V2_HEADER_AFTER_LENGTH = 49
#: kafka-python's `IsolationLevel.READ_UNCOMMITTED`
_READ_UNCOMMITTED = 0
#: a `ConsumerRecord` made from its fields' tuple: the same named tuple as calling the class, without
#: the Python frame of its generated `__new__` (~0.3 of the ~1 us a record costs here)
_new_tuple = tuple.__new__


def batch_end(buffer: Any, start: int) -> int:
    """Where the record batch starting at `start` of a fetch's bytes ends (its length field read)."""
    return start + _LOG_OVERHEAD + _LENGTH.unpack_from(buffer, start + _LENGTH_AT)[0]


def crc_matches(buffer: Any, start: int, end: int, crc: int) -> bool:
    """Whether the magic 2 batch at [`start`, `end`) of a fetch's bytes has the CRC-32C `crc` it stores.

    With the `crc32c` package's hardware instruction, ~20 GB/s here where aiokafka's table loop
    (`validate_crc`) reads ~0.74 GB/s: for the worker's consumer that loop was about half its
    thread's CPU (`stream/record_crcs.py`)."""
    return crc32c.crc32c(memoryview(buffer)[start + ATTRIBUTES_AT : end], 0, _KEEP_GIL) == crc


def _native_batches(buffer: Any) -> list[tuple[int, int]] | None:
    """Where each whole batch of a fetch starts and ends, if every one is in the format the C
    reader is used for (magic 2, uncompressed, a whole header); else None. A batch cut off at the
    end of the fetch (by the fetch's size limit) is left out, as kafka-python leaves it."""
    spans = []
    pos, size = 0, len(buffer)
    while size - pos >= _LOG_OVERHEAD:
        end = batch_end(buffer, pos)
        if end > size:
            break
        if end - pos < _LOG_OVERHEAD + _V2_HEADER_AFTER_LENGTH or buffer[pos + _MAGIC_AT] != 2:
            return None
        if _ATTRIBUTES.unpack_from(buffer, pos + ATTRIBUTES_AT)[0] & _CODEC_MASK:
            return None
        spans.append((pos, end))
        pos = end
    return spans


class NativePartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's records of one fetched partition, read with aiokafka's C batch reader where
    `_native_batches` allows (else by kafka-python's own reader: `super()._unpack_records`)."""

    def _unpack_records(
        self, tp: TopicPartition, records: MemoryRecords, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[ConsumerRecord]:
        plain = key_deserializer is None and value_deserializer is None
        buffer = records._buffer  # the fetch's bytes: kafka-python keeps no other handle on them
        spans = _native_batches(buffer) if plain and self.isolation_level == _READ_UNCOMMITTED else None
        if spans is None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        yield from self._native_records(tp, memoryview(buffer), spans)

    def _native_records(
        self, tp: TopicPartition, view: memoryview, spans: list[tuple[int, int]]
    ) -> Iterator[ConsumerRecord]:
        """The reference's loop for magic 2, uncompressed batches and read-uncommitted isolation:
        the same records, `leader_epoch`, `next_fetch_offset` and counts, then `drain`."""
        topic, partition = tp.topic, tp.partition
        batch = None
        for start, end in spans:
            batch = _CBatch(view[start:end])
            if self.check_crcs and not crc_matches(view, start, end, batch.crc):
                at = f"partition {self.topic_partition} at offset {batch.base_offset}"
                raise CorruptRecordError(f"Record batch for {at} failed crc check")
            self.leader_epoch = _LENGTH.unpack_from(view, start + _EPOCH_AT)[0]
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            self.bytes_read += end - start - _LOG_OVERHEAD - _V2_HEADER_AFTER_LENGTH
            timestamp_type, epoch = batch.timestamp_type, self.leader_epoch
            for record in batch:
                key, value, headers = record.key, record.value, record.headers
                self.records_read += 1
                self.next_fetch_offset = record.offset + 1
                yield _new_tuple(
                    ConsumerRecord,
                    (
                        topic,
                        partition,
                        epoch,
                        record.offset,
                        record.timestamp,
                        timestamp_type,
                        key,
                        value,
                        headers,
                        None,
                        -1 if key is None else len(key),
                        -1 if value is None else len(value),
                        _header_size(headers),
                    ),
                )
        if batch is not None:
            self.next_fetch_offset = batch.next_offset
        self.drain()


def _header_size(headers: list[tuple[str, bytes | None]]) -> int:
    """kafka-python's `serialized_header_size`: -1 without headers."""
    if not headers:
        return -1
    return sum(len(key.encode("utf-8")) + (len(value) if value is not None else 0) for key, value in headers)


#: what `use_native_batches` installs: None where aiokafka's extension is missing (tests set it)
native_partition_records: type[Fetcher.PartitionRecords] | None = NativePartitionRecords if _CBatch else None


def use_native_batches(consumer: KafkaConsumer) -> bool:
    """Have `consumer` read its fetches with the C reader where it can; False if it will not (no
    aiokafka extension, or a kafka-python whose fetcher no longer has the hook)."""
    fetcher = getattr(consumer, "_fetcher", None)
    if native_partition_records is None or not hasattr(fetcher, "PartitionRecords"):
        return False
    fetcher.PartitionRecords = native_partition_records
    return True
