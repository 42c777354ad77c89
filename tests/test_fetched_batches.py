"""aiokafka's C reader of fetched record batches gives kafka-python's consumers what kafka-python's own
reader gives (`contracts/fetched_batches.py`): the same records, positions and counts, and the same
refusals; a fetch it is not used for is read by the reference."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from burnguard.contracts.compacted_topics import _consumer
from burnguard.contracts.fetched_batches import NativePartitionRecords, _native_batches
from burnguard.contracts.topics import KafkaSettings
from burnguard.deploy.kafka import KafkaBroker
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords, MemoryRecordsBuilder
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition

from tests.fixtures.decoders import required_native_batches as required_native

TP = TopicPartition("burnguard.signals", 3)
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]
_ATTRIBUTES_AT, _CRC_AT, _EPOCH_AT, _LAST_DELTA_AT = 21, 17, 12, 23
_CONTROL, _LOG_APPEND_TIME = 0x20, 0x08


def a_batch(records: Sequence[Record], offset: int, compression: int = 0, magic: int = 2) -> bytes:
    builder = MemoryRecordsBuilder(
        magic=magic, compression_type=compression, batch_size=1 << 20, offset=offset
    )
    for n, (key, value, headers) in enumerate(records):
        builder.append(timestamp=1_700_000_000_000 + n, key=key, value=value, headers=headers)
    builder.close()
    return bytes(builder.buffer())


def with_attributes(batch: bytes, flags: int, epoch: int = 0, more_offsets: int = 0) -> bytes:
    """`batch` with attribute `flags` set, leader epoch `epoch` and its last offset `more_offsets`
    past its last record's (compacted away), its CRC made right again."""
    data = bytearray(batch)
    (attributes,) = struct.unpack_from(">h", data, _ATTRIBUTES_AT)
    struct.pack_into(">h", data, _ATTRIBUTES_AT, attributes | flags)
    struct.pack_into(">i", data, _EPOCH_AT, epoch)
    (last_delta,) = struct.unpack_from(">i", data, _LAST_DELTA_AT)
    struct.pack_into(">i", data, _LAST_DELTA_AT, last_delta + more_offsets)
    struct.pack_into(">I", data, _CRC_AT, calc_crc32c(bytes(data[_ATTRIBUTES_AT:])))
    return bytes(data)


def read(
    reader: type[Fetcher.PartitionRecords], fetch: bytes, fetch_offset: int = 0, take: int | None = None
) -> tuple[list[ConsumerRecord], tuple[int, int, int], int]:
    """The records `reader` hands out for one fetch (`take` at a time), then its position, epoch and
    records read, and how many times it drained."""
    drained: list[object] = []
    part = reader(fetch_offset, TP, MemoryRecords(fetch), None, None, True, 0, None, None, drained.append)
    records: list[ConsumerRecord] = []
    while part and (taken := part.take(take)):
        records += taken
    return records, (part.next_fetch_offset, part.leader_epoch, part.records_read), len(drained)


def signals(count: int, first: int = 0) -> list[Record]:
    return [
        (f"tenant+user:t/u-{n % 7}@daily".encode(), b'{"v":1,"n":%d}' % n if n % 5 else None, [])
        for n in range(first, first + count)
    ]


def both(fetch: bytes, fetch_offset: int = 0, take: int | None = None) -> list[ConsumerRecord]:
    """Reads `fetch` with both readers; asserts they agree; returns the records."""
    reference = read(Fetcher.PartitionRecords, fetch, fetch_offset, take)
    assert read(required_native(), fetch, fetch_offset, take) == reference
    return reference[0]


def test_batches_of_signals_tombstones_and_headers_read_the_same() -> None:
    headers: list[Record] = [(b"k", b"v", [("trace", b"abc"), ("empty", None)]), (None, b"no key", [])]
    fetch = (
        a_batch(signals(40), 0) + a_batch(headers, 40) + with_attributes(a_batch(signals(3, 42), 42), 0, 7)
    )
    assert _native_batches(fetch) is not None
    records = both(fetch)
    assert [r.offset for r in records] == list(range(45))
    assert all(type(r) is ConsumerRecord for r in records)
    assert records[40].headers == [("trace", b"abc"), ("empty", None)] and records[41].key is None
    assert records[-1].leader_epoch == 7


@pytest.mark.parametrize("fetch_offset", [0, 1, 17, 39, 40, 55])
@pytest.mark.parametrize("take", [None, 1, 7])
def test_a_fetch_from_inside_a_batch_and_taken_in_pieces_reads_the_same(
    fetch_offset: int, take: int | None
) -> None:
    records = both(a_batch(signals(20), 0) + a_batch(signals(30, 20), 20), fetch_offset, take)
    assert [r.offset for r in records] == list(range(fetch_offset, 50))


def test_a_batch_cut_off_at_the_end_of_a_fetch_is_left_for_the_next() -> None:
    whole, cut = a_batch(signals(5), 0), a_batch(signals(5, 5), 5)
    for keep in (0, 5, 12, 30, len(cut) - 1):
        assert [r.offset for r in both(whole + cut[:keep])] == list(range(5))
        assert _native_batches(whole + cut[:keep]) == [(0, len(whole))]


def test_control_batches_log_append_times_and_an_empty_fetch_read_the_same() -> None:
    control = with_attributes(a_batch([(b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00", [])], 3), _CONTROL)
    appended = with_attributes(a_batch(signals(3, 4), 4), _LOG_APPEND_TIME)
    records = both(a_batch(signals(3), 0) + control + appended)
    assert [r.offset for r in records] == [0, 1, 2, 4, 5, 6]
    assert {r.timestamp_type for r in records[3:]} == {1}
    assert both(b"") == [] and both(control) == []


def test_a_fetch_ending_in_a_compacted_batch_goes_on_after_its_last_offset() -> None:
    fetch = a_batch(signals(3), 0) + with_attributes(a_batch(signals(2, 3), 3), 0, more_offsets=4)
    reference = read(Fetcher.PartitionRecords, fetch)
    assert reference[1][0] == 9
    assert read(required_native(), fetch) == reference


def test_compressed_and_old_format_batches_are_left_to_the_reference() -> None:
    plain, gzip, old = (
        a_batch(signals(4), 0),
        a_batch(signals(4, 4), 4, compression=1),
        a_batch(signals(4), 0, magic=1),
    )
    for fetch, count in ((gzip, 4), (plain + gzip, 8), (old, 4)):
        assert _native_batches(fetch) is None
        assert len(both(fetch)) == count


def test_a_batch_failing_its_crc_is_refused_by_both() -> None:
    fetch = bytearray(a_batch(signals(3), 0))
    fetch[-1] ^= 0xFF
    for reader in (Fetcher.PartitionRecords, required_native()):
        with pytest.raises(CorruptRecordError, match="failed crc check"):
            read(reader, bytes(fetch))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.none() | st.binary(max_size=40),
                st.none() | st.binary(max_size=300),
                st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=2),
            ),
            min_size=1,
            max_size=12,
        ),
        max_size=5,
    ),
    st.integers(0, 30),
    st.none() | st.integers(1, 9),
)
def test_any_fetch_of_whole_batches_reads_the_same(
    batches: list[list[Record]], fetch_offset: int, take: int | None
) -> None:
    fetch, offset = b"", 0
    for records in batches:
        fetch += a_batch(records, offset)
        offset += len(records)
    both(fetch, fetch_offset, take)


def test_a_followers_consumer_reads_with_the_c_reader_where_it_is_installed(
    kafka_broker: KafkaBroker,
) -> None:
    required_native()
    consumer = _consumer(KafkaSettings(bootstrap=kafka_broker.bootstrap), "burnguard-test-batches")
    try:
        assert consumer._fetcher.PartitionRecords is NativePartitionRecords
    finally:
        consumer.close()
