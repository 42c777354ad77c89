"""Hostile bytes for the decoding fuzz tests: a valid payload with a few bytes flipped, inserted,
deleted or cut off, drawn by hypothesis (shrinks towards fewer, smaller edits)."""

from __future__ import annotations

from hypothesis import strategies as st


def mutate(draw: st.DrawFn, payload: bytes, max_edits: int, max_inserted: int) -> bytes:
    """`payload` after 1..`max_edits` random edits, each inserting at most `max_inserted` bytes."""
    edited = bytearray(payload)
    for _ in range(draw(st.integers(min_value=1, max_value=max_edits))):
        if not edited:
            break
        at = draw(st.integers(min_value=0, max_value=len(edited) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            edited[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif action == "insert":
            edited[at:at] = draw(st.binary(min_size=1, max_size=max_inserted))
        elif action == "delete":
            del edited[at]
        else:
            del edited[at:]
    return bytes(edited)
