"""aiokafka's connections read each response with one copy of its bytes, not three.

aiokafka reads a response as `readexactly(4)` (its size), then `readexactly(size)` from an
`asyncio.StreamReader`. The reader appends every chunk the socket gives (256 kB) to one bytearray
(a copy, into memory that grows as the response arrives), then copies the response out of it into
`bytes`, and a fetch response of `otlp_spans` is ~20 MiB (four partitions of 5 MiB). A busy
catch-up reads the whole topic so: ~470 MB for 900,000 spans, two copies of it in Faust's consumer
thread, each a C call that holds the GIL while it copies and touches fresh pages, while the main
thread (stages 1 and 2) waits for it (py-spy `--gil`: the reader's copies were over half of the
consumer thread's GIL time; BENCHMARKS.md, "Where the main thread waits").

`WholeFrameReader` keeps the chunks as the socket gave them and joins a response's chunks once, into
the `bytes` aiokafka parses: one copy instead of the bytearray's and the `bytes`' (a fraction of the
CPU for a 20 MiB response: BENCHMARKS.md). The bytes returned, end of stream, errors and
pausing the transport past twice the reader's limit are `StreamReader.readexactly`'s. aiokafka
reads its connections only with `readexactly`; any other read first moves the chunks into the
StreamReader's own buffer and leaves the reader as it was (`_spill`).

aiokafka makes the reader in `AIOKafkaConnection.connect` and hands it to `AIOKafkaProtocol` before
the connection exists: `install` puts a protocol there that turns that reader into this class
(`adopt`), while it holds nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import aiokafka.conn


class WholeFrameReader(asyncio.StreamReader):
    """A `StreamReader` whose `readexactly` joins the socket's chunks once (see the module doc)."""

    _chunks: deque[bytes]
    #: bytes held in `_chunks`
    _size: int
    #: False once a read other than `readexactly` moved the chunks into the base buffer
    _whole: bool

    @classmethod
    def adopt(cls, reader: asyncio.StreamReader) -> None:
        """Make a new, empty `StreamReader` this class (aiokafka creates its own)."""
        if type(reader) is not asyncio.StreamReader or reader._buffer:  # type: ignore[attr-defined]
            raise TypeError("only an empty asyncio.StreamReader can become a WholeFrameReader")
        reader.__class__ = cls
        assert isinstance(reader, cls)
        reader._chunks, reader._size, reader._whole = deque(), 0, True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunks, self._size, self._whole = deque(), 0, True

    def feed_data(self, data: bytes) -> None:
        """Keep the chunk (`StreamReader.feed_data` copies it into its buffer), pausing as it does."""
        if not self._whole:
            super().feed_data(data)
            return
        assert not self._eof, "feed_data after feed_eof"  # type: ignore[attr-defined]
        if not data:
            return
        self._chunks.append(bytes(data))  # the transports hand `bytes`: then not a copy
        self._size += len(data)
        self._wakeup_waiter()  # type: ignore[attr-defined]
        transport = self._transport  # type: ignore[attr-defined]
        if transport is not None and not self._paused and self._size > 2 * self._limit:  # type: ignore[attr-defined]
            try:
                transport.pause_reading()
            except NotImplementedError:  # as the base: buffer everything
                self._transport = None
            else:
                self._paused = True

    async def readexactly(self, n: int) -> bytes:
        """`StreamReader.readexactly`: exactly `n` bytes, `IncompleteReadError` at an early end."""
        if not self._whole:
            return await super().readexactly(n)
        if self._exception is not None:  # type: ignore[attr-defined]
            raise self._exception  # type: ignore[attr-defined]
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        if n == 0:
            return b""
        while self._size < n:
            if self._eof:  # type: ignore[attr-defined]
                raise asyncio.IncompleteReadError(self._take(self._size), n)
            await self._wait_for_data("readexactly")  # type: ignore[attr-defined]
        data = self._take(n)
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return data

    def _take(self, n: int) -> bytes:
        """The first `n` held bytes: a chunk itself, a slice of one, or the chunks joined once."""
        if not n:
            return b""
        chunks = self._chunks
        self._size -= n
        first = chunks[0]
        if len(first) >= n:
            if len(first) == n:
                return chunks.popleft()
            chunks[0] = first[n:]
            return first[:n]
        parts = []
        wanted = n
        while wanted:
            chunk = chunks.popleft()
            if len(chunk) > wanted:
                chunks.appendleft(chunk[wanted:])
                chunk = chunk[:wanted]
            parts.append(chunk)
            wanted -= len(chunk)
        return b"".join(parts)

    def _maybe_resume_transport(self) -> None:
        if self._whole and self._paused and self._size <= self._limit:  # type: ignore[attr-defined]
            self._paused = False
            self._transport.resume_reading()  # type: ignore[attr-defined]
        elif not self._whole:
            super()._maybe_resume_transport()  # type: ignore[misc]

    def at_eof(self) -> bool:
        return super().at_eof() and not self._size

    def _spill(self) -> None:
        """Hand the held chunks to the base buffer, for good: the other reads are the base's."""
        if self._whole:
            self._whole = False
            self._buffer.extend(b"".join(self._chunks))  # type: ignore[attr-defined]
            self._chunks.clear()
            self._size = 0

    async def read(self, n: int = -1) -> bytes:
        self._spill()
        return await super().read(n)

    async def readline(self) -> bytes:
        self._spill()
        return await super().readline()

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self._spill()
        return await super().readuntil(separator)


class _WholeFrameProtocol(aiokafka.conn.AIOKafkaProtocol):
    """aiokafka's connection protocol, turning the reader aiokafka just made into a `WholeFrameReader`."""

    def __init__(
        self, closed_fut: Any, stream_reader: asyncio.StreamReader, *args: Any, **kwargs: Any
    ) -> None:
        if type(stream_reader) is asyncio.StreamReader:
            WholeFrameReader.adopt(stream_reader)
        super().__init__(closed_fut, stream_reader, *args, **kwargs)


def install() -> None:
    """Let every aiokafka connection made from now on in this process read through a `WholeFrameReader`."""
    protocol = getattr(aiokafka.conn, "AIOKafkaProtocol", None)
    if not isinstance(protocol, type) or not issubclass(protocol, asyncio.StreamReaderProtocol):
        raise RuntimeError("aiokafka without conn.AIOKafkaProtocol: update stream/frame_reader.py")
    if not issubclass(protocol, _WholeFrameProtocol):
        aiokafka.conn.AIOKafkaProtocol = _WholeFrameProtocol  # type: ignore[misc]
