"""Which usage partition a budget key's records go to: Kafka's default partitioner, fast.

Stage 1 sends batch, tick and removal records to the partition that holds a key's state, so
it picks the partition itself (a batch holds many keys); the choice must be the one aiokafka's
default partitioner makes for the key, which is what `tests/test_accounting.py` checks.

The hash is the native module's (`contracts/native`, `murmur2`) when it is built and in use
(`BURNGUARD_NATIVE`, as for decoding), chosen at the first hash; `_murmur2` here is the
reference, and the tests compare both on random keys.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from burnguard.contracts.otlp import native_in_use

_MURMUR_M = 0x5BD1E995
_U32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 key hash: the native one when in use, else the reference `_murmur2`.

    The worker hashes every new budget key (stage 1) and every new snapshot key: ~4 us each in
    Python, most of a first snapshot's cost (BENCHMARKS.md).
    """
    return _hash()(data)


def _hash() -> Callable[[bytes], int]:
    """The murmur2 in use, chosen once: read at the first hash, not at import (`native_part`)."""
    return native_part("murmur2") or _murmur2


def native_module() -> object | None:
    """The native module (contracts/native), None when it is not built."""
    try:
        from burnguard.contracts import _otlp_native  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _otlp_native


def native_module_in_use() -> object | None:
    """The native module where the worker uses native code, else None: the decoder's choice
    (`otlp.native_in_use`: built, and `BURNGUARD_NATIVE` not off), so the hash, the sums, the
    groups and the combined row are native or not together. Each caller asks at its first use,
    not at import, and keeps the answer."""
    return native_module() if native_in_use() is not None else None


#: The native parts `native_part` chose (or made), by name: None where none is in use. The tests
#: set them per implementation.
native_parts: dict[str, Any] = {}


def native_part(name: str, make: Callable[[Any], Any] | None = None) -> Any:
    """The native module's `name` (or what `make` makes of it), chosen once at its first use, not at
    import: None where the native module is not in use (`native_module_in_use`) or lacks it."""
    part = native_parts.get(name, native_parts)  # the dict itself: not chosen yet
    if part is native_parts:
        part = getattr(native_module_in_use(), name, None)
        if part is not None and make is not None:
            part = make(part)
        native_parts[name] = part
    return part


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 key hash, equal to aiokafka's but ~4x faster (whole words via `struct`): the
    reference of the native `murmur2` (aiokafka's byte-by-byte version was ~3% of the worker's time).
    """
    length = len(data)
    whole = length - length % 4
    h = 0x9747B28C ^ length
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * _MURMUR_M) & _U32
        k ^= k >> 24
        h = ((h * _MURMUR_M) & _U32) ^ ((k * _MURMUR_M) & _U32)
    tail = data[whole:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * _MURMUR_M) & _U32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _U32
    return h ^ (h >> 15)


def producer_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's `DefaultPartitioner` with `murmur2` here: the worker's producer's partitioner
    (Faust's `producer_partitioner`), so a signal or a dead letter sent with a key costs no
    byte-by-byte hash (aiokafka's, ~20 us per signal key). A record without a key: aiokafka's
    own (a random available partition)."""
    if key is None:
        return _RANDOM(key, all_partitions, available)
    return all_partitions[(_hash()(key) & 0x7FFFFFFF) % len(all_partitions)]


_RANDOM = DefaultPartitioner()


def key_partition(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner picks for `key` among `partitions`."""
    return (_hash()(key) & 0x7FFFFFFF) % partitions


@lru_cache(maxsize=1 << 15)  # the busy keys (tenants, features); a cache of every key would cost ~20 MB
def usage_partition(partition_key: str, partitions: int) -> int:
    """The usage partition of a `budget|key` (or `guard|session`): aiokafka's default choice.

    Batch records hold many keys, so the partition is chosen here rather than
    by the producer from a record key; every record about a key (batches,
    ticks, removals) goes through this, so its state stays on one partition.
    """
    return key_partition(partition_key.encode(), partitions)
