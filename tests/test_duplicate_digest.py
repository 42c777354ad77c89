"""The duplicate digest (`stream/duplicates.py:digest`): the native `blake3_16` against the reference.

The native digest exists to hold the GIL (blake3-py releases it from 2 kB, and on the worker's main
thread each release waits to take the GIL back from Faust's consumer thread); it must give the
reference's bytes for every payload, at the lengths where BLAKE3 and blake3-py change paths
(1 kB chunks, the 2 kB GIL threshold, SIMD widths) and beyond.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from burnguard.stream import duplicates, partitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.decoders import required_native_part

EDGES = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 7800, 16384, 16385, 65537, 300_000]


def native_digest() -> Callable[[bytes], bytes]:
    return required_native_part("blake3_16")


@given(st.binary(max_size=20_000))
@settings(max_examples=300, deadline=None)
def test_the_native_digest_is_the_references_on_random_payloads(payload: bytes) -> None:
    assert native_digest()(payload) == duplicates._blake3_16(payload)


def test_the_native_digest_is_the_references_at_the_lengths_where_paths_change() -> None:
    chance = random.Random(16)
    for length in EDGES:
        payload = chance.randbytes(length)
        assert native_digest()(payload) == duplicates._blake3_16(payload), length
        assert len(native_digest()(payload)) == 16


def test_the_digest_in_use_is_the_native_one_where_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    native = native_digest()
    monkeypatch.delitem(partitioner.native_parts, "blake3_16", raising=False)
    assert duplicates.digest(b"x" * 5000) == native(b"x" * 5000)
    assert partitioner.native_parts["blake3_16"] is native


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    """A thread waiting for the GIL gets it only when its holder releases it (not by a forced switch)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    yield
    sys.setswitchinterval(before)


def another_thread_ran_while_digesting(digest: Callable[[bytes], bytes]) -> bool:
    """Whether a thread woken just before ran while this one did nothing but digest for 50 ms."""
    payload = random.Random(1).randbytes(8000)
    go, ran = threading.Event(), threading.Event()

    def waiter() -> None:
        go.wait()
        ran.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.01)  # the waiter blocks on `go`, the GIL free
    go.set()
    until = time.perf_counter() + 0.05
    while time.perf_counter() < until:
        digest(payload)
    seen = ran.is_set()
    thread.join()
    return seen


@pytest.mark.usefixtures("long_switch_interval")
def test_the_native_digest_holds_the_gil_and_the_reference_does_not() -> None:
    assert not another_thread_ran_while_digesting(native_digest())
    assert another_thread_ran_while_digesting(duplicates._blake3_16)
