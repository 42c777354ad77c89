"""`stream/record_crcs.py`: fetched record batches checked with the hardware CRC-32C hand over what
aiokafka's own check hands over, and fail where and as it fails."""

from __future__ import annotations

import random
from typing import Any

import aiokafka.consumer.fetcher as fetcher_module
import pytest
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition
from burnguard.contracts import fetched_batches
from burnguard.stream import record_crcs
from burnguard.stream.record_crcs import FetchedRecords, HardwareCrcPartitionRecords

TP = TopicPartition("otlp_spans", 3)
#: aiokafka's `PartitionRecords` as it is, whatever `install` did to the module's name
AIOKAFKA_PARTITION_RECORDS = HardwareCrcPartitionRecords.__mro__[1]


def v2_batch(rng: random.Random, base_offset: int, records: int, codec: int = 0) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    for delta in range(records):
        value = rng.randbytes(rng.randrange(0, 3000))
        key = rng.choice([None, b"", rng.randbytes(8)])
        headers = [("h", rng.randbytes(3))] if rng.random() < 0.3 else []
        builder.append(delta, timestamp=1_700_000_000_000 + delta, key=key, value=value, headers=headers)
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")  # the broker's offsets; outside the CRC
    return bytes(data)


def legacy_batch(rng: random.Random, offset: int) -> bytes:
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 30)
    builder.append(0, timestamp=1_700_000_000_000, key=b"k", value=rng.randbytes(200))
    data = bytearray(builder.build())
    data[0:8] = offset.to_bytes(8, "big")
    return bytes(data)


def fetched(rng: random.Random, batches: int, codec: int = 0) -> tuple[bytes, list[int]]:
    """A partition's fetched bytes: `batches` v2 batches, maybe a cut batch at the end (as a fetch
    cut at its size); and where each whole batch starts."""
    parts, starts, offset, position = [], [], 100, 0
    for _ in range(batches):
        count = rng.randrange(1, 6)
        batch = v2_batch(rng, offset, count, codec)
        parts.append(batch)
        starts.append(position)
        position += len(batch)
        offset += count
    if rng.random() < 0.5:
        tail = v2_batch(rng, offset, 2)
        parts.append(tail[: rng.randrange(1, len(tail))])
    return b"".join(parts), starts


def drain(records: Any) -> tuple[list[tuple[Any, ...]], str | None, int]:
    """What a `PartitionRecords` hands over: its records, the error it ends with, its next offset."""
    out: list[tuple[Any, ...]] = []
    error = None
    try:
        for record in records:
            out.append((record.offset, record.timestamp, record.key, record.value, tuple(record.headers)))
    except CorruptRecordException as exc:
        error = str(exc)
    return out, error, records.next_fetch_offset


def both(data: bytes, check_crcs: bool = True) -> tuple[Any, Any]:
    args = (None, 100, None, None, check_crcs, fetcher_module.READ_UNCOMMITTED)
    theirs = AIOKAFKA_PARTITION_RECORDS(TP, MemoryRecords(data), *args)
    ours = HardwareCrcPartitionRecords(TP, FetchedRecords(data), *args)
    return drain(theirs), drain(ours)


@pytest.mark.parametrize("seed", range(40))
def test_valid_fetches_hand_over_what_aiokafka_does(seed: int) -> None:
    rng = random.Random(seed)
    data, _starts = fetched(rng, rng.randrange(0, 8), codec=rng.choice([0, 0, 1]))
    theirs, ours = both(data)
    assert ours == theirs
    assert ours[1] is None


@pytest.mark.parametrize("seed", range(40))
def test_a_corrupt_batch_fails_where_and_as_aiokafka_fails(seed: int) -> None:
    rng = random.Random(1000 + seed)
    data, starts = fetched(rng, rng.randrange(1, 8))
    bad = rng.randrange(len(starts))
    end = (
        starts[bad + 1]
        if bad + 1 < len(starts)
        else starts[bad] + 12 + int.from_bytes(data[starts[bad] + 8 : starts[bad] + 12], "big")
    )
    # a byte the CRC covers (attributes to the end) or the stored CRC itself
    position = rng.choice(
        [rng.randrange(starts[bad] + 21, end), rng.randrange(starts[bad] + 17, starts[bad] + 21)]
    )
    corrupt = bytearray(data)
    corrupt[position] ^= 1 << rng.randrange(8)
    theirs, ours = both(bytes(corrupt))
    assert theirs[1] == f"[Error 2] CorruptRecordException: Invalid CRC - {TP}"
    assert ours == theirs


def test_without_check_crcs_nothing_is_checked() -> None:
    rng = random.Random(7)
    data, starts = fetched(rng, 3)
    corrupt = bytearray(data)
    corrupt[starts[1] + 17] ^= 0xFF  # the stored CRC
    theirs, ours = both(bytes(corrupt), check_crcs=False)
    assert ours == theirs
    assert ours[1] is None


def test_a_legacy_batch_is_checked_by_aiokafka() -> None:
    rng = random.Random(8)
    good = legacy_batch(rng, 100)
    theirs, ours = both(good)
    assert ours == theirs and len(ours[0]) == 1 and ours[1] is None
    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    theirs, ours = both(bytes(corrupt))
    assert theirs[1] == f"[Error 2] CorruptRecordException: Invalid CRC - {TP}"
    assert ours == theirs


def test_v2_batches_are_checked_with_crc32c(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the module: the checksum of a v2 batch is the `crc32c` package's."""
    calls: list[int] = []
    real = fetched_batches.crc32c.crc32c

    def counted(data: Any, value: int = 0, gil_release_mode: int = -1) -> int:
        calls.append(gil_release_mode)
        return real(data, value, gil_release_mode)

    monkeypatch.setattr(fetched_batches.crc32c, "crc32c", counted)
    rng = random.Random(9)
    data, starts = fetched(rng, 4)
    _theirs, ours = both(data)
    assert ours[1] is None
    assert calls == [0] * len(starts)  # the GIL kept: a short call, no switch to take it back
    records = HardwareCrcPartitionRecords(
        TP, FetchedRecords(data), None, 100, None, None, True, fetcher_module.READ_UNCOMMITTED
    )
    assert records._check_crcs is False  # aiokafka's own loop not run as well


def test_install_puts_both_in_aiokafka_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher_module, "MemoryRecords", MemoryRecords)
    monkeypatch.setattr(fetcher_module, "PartitionRecords", AIOKAFKA_PARTITION_RECORDS)
    record_crcs.install()
    record_crcs.install()
    assert fetcher_module.MemoryRecords is FetchedRecords
    assert fetcher_module.PartitionRecords is HardwareCrcPartitionRecords
    assert FetchedRecords(b"").has_next() is False


def test_the_worker_transport_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from burnguard.stream import fetching

    monkeypatch.setattr(fetcher_module, "MemoryRecords", MemoryRecords)
    monkeypatch.setattr(fetcher_module, "PartitionRecords", AIOKAFKA_PARTITION_RECORDS)

    class App:
        _transport = None

        class conf:
            broker_consumer = ("kafka://localhost:9092",)

    monkeypatch.setattr(fetching, "FetchWaitTransport", lambda *args, **kwargs: None)
    fetching.install(App(), fetch_max_wait_ms=20)
    assert fetcher_module.PartitionRecords is HardwareCrcPartitionRecords
