"""Signal checkpoints: a guard starts from these instead of replaying all of `burnguard.signals`.

A checkpoint of one signals partition holds, up to an offset, the latest record of every key
that can still matter to a guard (`can_still_matter`), in offset order. A guard loads it and
reads the partition from that offset on, so its start-up is bounded by the restrictions in
force and the records since the checkpoint, not by the topic's length (until the broker's
cleaner has passed, the topic holds every `ok` ever written). The worker writes them
(`stream/signal_checkpoints.py`) on the compacted `burnguard.signals.checkpoints`; only the
worker may write there (docs/ARCHITECTURE.md §14), as for the signals themselves.

A checkpoint can be large (20,000 restrictions are ~7 MB of JSON), so it is written in parts
under the keys `<signals topic>/<partition>/<part>`, each a JSON header line and the zlib
compressed records. A reader takes, per partition, the newest checkpoint whose parts are all
present; anything else (a part missing, undecodable, or for another offset) and the partition
is replayed from its beginning, as without checkpoints.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from burnguard.contracts.signals import Signal

#: A checkpoint keeps what a guard whose clock is up to this much behind the writer's would hold.
CLOCK_MARGIN = timedelta(minutes=5)
#: A checkpoint with records after it is not used once this old. A live writer replaces it
#: within its interval; one left behind (checkpoints switched off, or failing) would outlive the
#: cleaner, which removes a tombstone after the topic's `delete.retention.ms` (24 h by default):
#: the checkpoint's older record of that key would then be a restriction no replay holds.
MAX_AGE_BEHIND = timedelta(hours=1)
#: Records' bytes per part before compression: well under the producer's 1 MB request limit.
PART_BYTES = 512 * 1024
#: A part holds `PART_BYTES` of records and at most one more (a signal, far below this).
MAX_PART_BODY = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")
Record = tuple[bytes, bytes]


def matters_until(signal: Signal) -> datetime:
    """Until when a guard reading `signal` would hold anything for it (docs/ARCHITECTURE.md §12).

    A restriction is held until its window ends; an `ok` only as a local-accounting baseline,
    until it expires. A superset of what `BudgetGuard` holds (tested), so a checkpoint never
    leaves out what a full replay would have kept.
    """
    return signal.window_end if signal.action != "ok" else min(signal.window_end, signal.expires_at)


def can_still_matter(signal: Signal, at: datetime) -> bool:
    return at < matters_until(signal)


def usable_at(taken_at: str, now: datetime, records_after: bool) -> bool:
    """Whether a checkpoint taken at `taken_at` (writer's clock) holds all a guard at `now` would.

    The writer leaves out what ended `CLOCK_MARGIN` before its clock: a guard whose clock is
    further behind would still hold some of that, so it must replay instead. With records
    after it, the checkpoint must also be recent (`MAX_AGE_BEHIND`).
    """
    try:
        taken = datetime.fromisoformat(taken_at)
    except ValueError:
        return False
    if taken.tzinfo is None or now < taken - CLOCK_MARGIN:
        return False
    return not records_after or now - taken <= MAX_AGE_BEHIND


@dataclass(frozen=True, slots=True)
class CheckpointPart:
    """One part of a checkpoint: what can still matter of `partition` before `next_offset`."""

    topic: str
    partition: int
    next_offset: int
    part: int
    parts: int
    #: One id per checkpoint written: two writers' parts for the same offset split differently.
    checkpoint_id: str
    taken_at: str
    records: tuple[Record, ...]

    @property
    def kafka_key(self) -> bytes:
        return part_key(self.topic, self.partition, self.part)

    def encode(self) -> bytes:
        header = {
            "topic": self.topic,
            "partition": self.partition,
            "next_offset": self.next_offset,
            "part": self.part,
            "parts": self.parts,
            "id": self.checkpoint_id,
            "taken_at": self.taken_at,
        }
        body = b"".join(_LENGTH.pack(len(b)) + b for record in self.records for b in record)
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + zlib.compress(body, 6)

    @classmethod
    def decode(cls, value: bytes) -> CheckpointPart:
        """The part in `value`; ValueError saying what is wrong with it."""
        head, newline, compressed = value.partition(b"\n")
        if not newline:
            raise ValueError("no header line")
        try:
            header = json.loads(head)
            fields = (header["topic"], header["partition"], header["next_offset"], header["part"])
            topic, partition, next_offset, part = fields
            parts, checkpoint_id, taken_at = header["parts"], header["id"], header["taken_at"]
            body = _decompressed(compressed)
        except (ValueError, KeyError, TypeError, RecursionError, zlib.error) as exc:
            raise ValueError(f"unreadable checkpoint part: {exc}") from None
        numbers = (partition, next_offset, part, parts)
        if not all(type(n) is int and n >= 0 for n in numbers) or part >= parts or type(topic) is not str:
            raise ValueError(f"checkpoint part header out of range: {header}")
        records = tuple(_records_of(body))
        return cls(topic, partition, next_offset, part, parts, str(checkpoint_id), str(taken_at), records)


def _decompressed(compressed: bytes) -> bytes:
    """A part's records, refused past `MAX_PART_BODY` (a guard must not run out of memory on one)."""
    inflate = zlib.decompressobj()
    body = inflate.decompress(compressed, MAX_PART_BODY)
    if inflate.unconsumed_tail:
        raise ValueError(f"checkpoint part over {MAX_PART_BODY} bytes")
    if not inflate.eof:
        raise ValueError("checkpoint part truncated")
    return body


def part_key(topic: str, partition: int, part: int) -> bytes:
    return f"{topic}/{partition}/{part}".encode()


def _records_of(body: bytes) -> Iterable[Record]:
    """(key, value) pairs back from their length-prefixed bytes."""
    view, position, fields = memoryview(body), 0, []
    while position < len(body):
        if position + _LENGTH.size > len(body):
            raise ValueError("checkpoint part truncated")
        (length,) = _LENGTH.unpack_from(view, position)
        position += _LENGTH.size
        if position + length > len(body):
            raise ValueError("checkpoint part truncated")
        fields.append(bytes(view[position : position + length]))
        position += length
    if len(fields) % 2:
        raise ValueError("checkpoint part has a key without a value")
    return zip(fields[::2], fields[1::2], strict=True)


def split_checkpoint(
    topic: str, partition: int, next_offset: int, records: list[Record], taken_at: datetime
) -> list[CheckpointPart]:
    """A partition's checkpoint in parts of about `PART_BYTES` each (one, empty, for no records)."""
    chunks: list[list[Record]] = [[]]
    size = 0
    for record in records:
        record_size = len(record[0]) + len(record[1]) + 2 * _LENGTH.size
        if chunks[-1] and size + record_size > PART_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(record)
        size += record_size
    stamp, checkpoint_id = taken_at.isoformat(), uuid.uuid4().hex
    return [
        CheckpointPart(topic, partition, next_offset, n, len(chunks), checkpoint_id, stamp, tuple(chunk))
        for n, chunk in enumerate(chunks)
    ]


def latest_checkpoints(parts: Iterable[CheckpointPart], topic: str) -> dict[int, list[CheckpointPart]]:
    """Per partition of `topic`, the newest checkpoint with every part present, its parts in order."""
    by_checkpoint: dict[tuple[int, int, str], dict[int, CheckpointPart]] = {}
    for part in parts:
        if part.topic == topic:
            checkpoint = (part.partition, part.next_offset, part.checkpoint_id)
            by_checkpoint.setdefault(checkpoint, {})[part.part] = part
    complete: dict[int, list[CheckpointPart]] = {}
    for (partition, _, _), found in sorted(by_checkpoint.items()):
        expected = next(iter(found.values())).parts
        if sorted(found) == list(range(expected)):
            complete[partition] = [found[n] for n in range(expected)]  # a later offset replaces it
    return complete


def decode_parts(values: Mapping[bytes, bytes]) -> tuple[list[CheckpointPart], list[str]]:
    """The parts among a checkpoint topic's values, and why each of the others was not read."""
    parts, problems = [], []
    for key, value in values.items():
        try:
            parts.append(CheckpointPart.decode(value))
        except ValueError as exc:
            problems.append(f"{key!r}: {exc}")
    return parts, problems
