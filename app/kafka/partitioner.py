"""Kafka's default partitioner: the murmur2 hash of a record's key, as every Kafka client computes it.

A key's partition decides which worker holds its state, so the worker checks every keyed input
record against it and routes its outputs and repartitioned records by it, exactly as Java's
`Utils.murmur2` and aiokafka's `murmur2` do. With a million users most keys of a batch are new to
the worker's cache of routes (`app.pipeline.processor`), so they are hashed a batch at a time.
"""
from __future__ import annotations

import random
import struct

import numpy as np

_M, _MASK = 0x5BD1E995, 0xFFFFFFFF
_WORDS = [struct.Struct(f"<{n}I").unpack_from for n in range(65)]  # keys up to 256 bytes
# Keys of one length in words are hashed together from this many: below it numpy's cost per call
# (about 1 us, a dozen calls per word) is more than hashing them one by one (1.8 us a key).
TOGETHER_MIN = 16


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java's `Utils.murmur2`), as aiokafka's `murmur2` computes it, unsigned.

    aiokafka's reads the key byte by byte (3.0 us for an 8-byte key); this one reads its 32-bit
    words with one unpack (1.5 us)."""
    length = len(data)
    h = 0x9747B28C ^ length
    n = length >> 2
    words = _WORDS[n] if n < len(_WORDS) else struct.Struct(f"<{n}I").unpack_from
    for k in words(data):
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ (((k ^ (k >> 24)) * _M) & _MASK)
    if length & 3:
        h = ((h ^ int.from_bytes(data[n << 2:], "little")) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def key_hash(key: bytes) -> int:
    """The default partitioner's hash of a key (murmur2, positive): its partition is this modulo
    the topic's partitions."""
    return murmur2(key) & 0x7FFFFFFF


def key_hashes(keys: list[bytes]) -> list[int]:
    """`key_hash` of each key. Keys of the same length in 32-bit words are hashed together, a word
    of all of them per numpy operation: a batch of a million users' keys in about a quarter of the
    time. However long or varied the keys, no key costs more than its own words."""
    out = [0] * len(keys)
    by_words: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_words.setdefault(len(key) >> 2, []).append(i)
    m = np.uint32(_M)
    for n, at in by_words.items():
        if len(at) < TOGETHER_MIN:
            for i in at:
                out[i] = key_hash(keys[i])
            continue
        group = [keys[i] for i in at]
        size = 4 * (n + 1)  # the key's words and its tail, zero-padded to one more word
        words = np.frombuffer(b"".join([k.ljust(size, b"\0") for k in group]), dtype="<u4").reshape(len(group), n + 1)
        lengths = np.fromiter(map(len, group), dtype=np.uint32, count=len(group))
        h = lengths ^ np.uint32(0x9747B28C)
        for w in range(n):  # uint32 arithmetic wraps as the masks above do
            k = words[:, w] * m
            k ^= k >> np.uint32(24)
            h = (h * m) ^ (k * m)
        h = np.where(lengths & np.uint32(3), (h ^ words[:, n]) * m, h)
        h ^= h >> np.uint32(13)
        h *= m
        h ^= h >> np.uint32(15)
        h &= np.uint32(0x7FFFFFFF)
        for i, v in zip(at, h.tolist()):
            out[i] = v
    return out


def default_partition(key: bytes | None, partitions: list[int], hashed: int | None = None) -> int:
    """aiokafka's DefaultPartitioner (Kafka's): by the key's hash (`hashed`, if known already); no
    key, any partition."""
    if key is None:
        return random.choice(partitions)
    return partitions[(key_hash(key) if hashed is None else hashed) % len(partitions)]
