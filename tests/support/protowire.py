"""The protobuf wire format written by hand: requests as a hostile or future encoder may write
them (unknown fields, repeated fields, wrong wire types), which the generated classes never do."""

from __future__ import annotations


def varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def fixed64(number: int, value: int) -> bytes:
    return varint(number << 3 | 1) + value.to_bytes(8, "little")


def fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + value.to_bytes(4, "little")


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)
