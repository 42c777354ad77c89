"""aiokafka's connections read through `WholeFrameReader`: `StreamReader.readexactly`'s bytes, ends and
errors, with a response's chunks joined once (`stream/frame_reader.py`)."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import aiokafka.conn
import pytest
from burnguard.stream import fetching, frame_reader
from burnguard.stream.frame_reader import WholeFrameReader


class _Transport:
    """Records the reader's pauses and resumes."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


def _frames(rng: random.Random, count: int) -> list[bytes]:
    """Kafka-style frames: a 4-byte size, then that many bytes (some empty, some large)."""
    frames = []
    for _ in range(count):
        size = rng.choice([0, 1, 3, rng.randrange(4, 300), rng.randrange(300, 70_000)])
        frames.append(struct.pack(">i", size) + rng.randbytes(size))
    return frames


def _chunked(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut where a socket might cut it."""
    chunks, at = [], 0
    while at < len(data):
        size = rng.choice([1, 2, 5, rng.randrange(1, 100), rng.randrange(100, 40_000)])
        chunks.append(data[at : at + size])
        at += size
    return chunks


async def _read_frames(reader: asyncio.StreamReader, chunks: list[bytes], count: int) -> list[bytes]:
    """Read `count` frames as aiokafka does while `chunks` arrive, a turn of the loop apart."""

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    frames = []
    for _ in range(count):
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        frames.append(await reader.readexactly(size))
    await feeding
    return frames


@pytest.mark.parametrize("seed", range(20))
def test_frames_read_are_the_stream_readers_whatever_the_chunks(seed: int) -> None:
    rng = random.Random(seed)
    frames = _frames(rng, 30)
    chunks = _chunked(b"".join(frames), rng)

    async def both() -> tuple[list[bytes], list[bytes]]:
        plain = await _read_frames(asyncio.StreamReader(), chunks, len(frames))
        whole = await _read_frames(WholeFrameReader(), chunks, len(frames))
        return plain, whole

    plain, whole = asyncio.run(both())
    assert whole == plain == [frame[4:] for frame in frames]
    assert all(type(frame) is bytes for frame in whole)


def _outcome(make: Callable[[], asyncio.StreamReader], chunks: list[bytes], n: int) -> Any:
    async def read() -> Any:
        reader = make()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        try:
            return await reader.readexactly(n), reader.at_eof()
        except asyncio.IncompleteReadError as exc:
            return type(exc), exc.partial, exc.expected, reader.at_eof()

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("chunks", "n"),
    [([b"abc", b"de"], 5), ([b"abc", b"de"], 7), ([b"abc"], 0), ([], 3), ([b"ab", b"cd"], 3), ([b""], 1)],
)
def test_an_early_end_and_the_end_of_the_stream_are_the_stream_readers(chunks: list[bytes], n: int) -> None:
    assert _outcome(WholeFrameReader, chunks, n) == _outcome(asyncio.StreamReader, chunks, n)


def test_an_error_set_on_the_reader_is_raised_by_the_next_read() -> None:
    async def read() -> None:
        reader = WholeFrameReader()
        reader.feed_data(b"abcd")
        reader.set_exception(ConnectionResetError("gone"))
        await reader.readexactly(2)

    with pytest.raises(ConnectionResetError):
        asyncio.run(read())


def test_a_negative_size_is_refused_as_by_the_stream_reader() -> None:
    async def read() -> bytes:
        return await WholeFrameReader().readexactly(-1)

    with pytest.raises(ValueError):
        asyncio.run(read())


def test_the_transport_is_paused_past_twice_the_limit_and_resumed_once_read_down_to_it() -> None:
    async def run() -> _Transport:
        reader = WholeFrameReader(limit=10)
        transport = _Transport()
        reader.set_transport(transport)  # type: ignore[arg-type]
        reader.feed_data(b"x" * 20)
        assert transport.paused == 0  # at twice the limit, not past it
        reader.feed_data(b"x")
        assert transport.paused == 1
        await reader.readexactly(5)  # 16 left, over the limit
        assert transport.resumed == 0
        await reader.readexactly(6)  # 10 left
        assert transport.resumed == 1
        return transport

    transport = asyncio.run(run())
    assert (transport.paused, transport.resumed) == (1, 1)


def test_another_read_takes_what_is_held_and_reads_as_the_stream_reader_after() -> None:
    async def run() -> list[bytes]:
        reader = WholeFrameReader()
        reader.feed_data(b"head")
        reader.feed_data(b"line one\nline")
        got = [await reader.readexactly(4), await reader.readline()]
        reader.feed_data(b" two\nrest")
        reader.feed_eof()
        return [*got, await reader.readline(), await reader.readexactly(2), await reader.read()]

    assert asyncio.run(run()) == [b"head", b"line one\n", b"line two\n", b"re", b"st"]


def test_only_an_empty_stream_reader_is_adopted() -> None:
    async def run() -> None:
        held = asyncio.StreamReader()
        held.feed_data(b"x")
        with pytest.raises(TypeError):
            WholeFrameReader.adopt(held)
        fresh = asyncio.StreamReader()
        WholeFrameReader.adopt(fresh)
        assert type(fresh) is WholeFrameReader
        fresh.feed_data(b"abc")
        assert await fresh.readexactly(3) == b"abc"

    asyncio.run(run())


def test_the_workers_aiokafka_connections_read_through_it() -> None:
    fetching.read_responses_whole()  # what `fetching.install` runs when the job is made

    async def connect_protocol() -> Any:
        reader = asyncio.StreamReader(limit=aiokafka.conn.READER_LIMIT)
        # what `AIOKafkaConnection.connect` does with the reader it makes
        aiokafka.conn.AIOKafkaProtocol(asyncio.get_running_loop().create_future(), reader, loop=None)
        return reader

    assert type(asyncio.run(connect_protocol())) is WholeFrameReader
    frame_reader.install()  # twice: still one protocol class in between
    assert aiokafka.conn.AIOKafkaProtocol is frame_reader._WholeFrameProtocol


def test_an_aiokafka_without_the_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aiokafka.conn, "AIOKafkaProtocol")
    with pytest.raises(RuntimeError, match="frame_reader"):
        frame_reader.install()


def test_a_large_response_costs_less_cpu_than_the_stream_readers() -> None:
    """The point of it: 20 MiB in 256 kB chunks, read whole (the copies are most of the cost)."""
    chunk = b"x" * (256 << 10)

    async def cpu(make: Callable[[], asyncio.StreamReader]) -> float:
        reader = make()
        began = time.process_time()
        for _ in range(5):
            for _ in range(80):
                reader.feed_data(chunk)
            await reader.readexactly(80 * len(chunk))
        return time.process_time() - began

    async def both() -> tuple[float, float]:
        plain = min([await cpu(lambda: asyncio.StreamReader(limit=16 << 20)) for _ in range(3)])
        whole = min([await cpu(lambda: WholeFrameReader(limit=16 << 20)) for _ in range(3)])
        return plain, whole

    plain, whole = asyncio.run(both())
    assert whole < plain
