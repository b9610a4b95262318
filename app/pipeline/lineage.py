"""Which event a record is, for idempotent state: read from its coordinates and, defensively, headers.

A key's state record remembers, per stream of records, the last one applied, and a replayed record
at or below it changes nothing. Three streams reach a key, each in order:
- records on the input topic itself, already keyed by the state key (`<topic>:<partition>`, the
  record's own offset);
- records that took the repartition hop (`<topic>:<partition>/hop`, the offset of the record the
  producer wrote, carried in `origin.*` headers): a separate stream, because the records of one
  input partition reach the key partly directly and partly through the hop, in another order;
- replays of dead letters: at a new offset, but the same event, so their identity is the
  `replay.of` lineage (the coordinates of the event's first record) with a hash of the value, kept
  in a bounded set per key. The lineage alone is a header anyone can write: a record of another
  value claiming it took the replay's place (the real replay was then a "duplicate"), and every
  event of a producer copying such headers was dropped after the first. A replay record's own
  offset is recorded as for any other record too, so that its redelivery is known without the set
  (a batch of more replays of a key than the set holds was applied again after a crash).

Headers are untrusted. `origin.*` is only read on the repartition topic, which only this service
should write (a forged origin there can still claim an offset ahead; only the topic's ACLs stop
that); anywhere else it is ignored, so a producer cannot make later events pass for replays. On the
repartition topic a malformed origin is a dead letter. A malformed `replay.*` header is ignored: the
record is then an ordinary new event.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import NamedTuple

from app.errors import Poison
from app.pipeline.deadletters import REPLAY_COUNT, REPLAY_OF, parse_lineage

ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET = ORIGIN = ("origin.topic", "origin.partition", "origin.offset")
HOP_SUFFIX = "/hop"
MAX_OFFSET = 2**63 - 1
MAX_PARTITION = 2**31 - 1


def _number(headers: dict, name: str, top: int) -> int:
    raw = headers.get(name)
    if not isinstance(raw, (bytes, bytearray)) or not raw.isdigit() or len(raw) > 19:
        raise Poison("headers", f"header {name} is not a number in 0..{top}: {raw!r:.60}")
    n = int(raw)
    if n > top:
        raise Poison("headers", f"header {name} is not a number in 0..{top}: {raw!r:.60}")
    return n


def origin_of(record, source_topic: str, hop_topic: str) -> tuple[str, int, int]:
    """(topic, partition, offset) of the record the producer wrote; raises `Poison` for a hop
    record whose origin headers are missing or malformed."""
    if record.topic != hop_topic:
        return record.topic, record.partition, record.offset
    headers = dict(record.headers or ())
    topic = headers.get(ORIGIN_TOPIC)
    if topic != source_topic.encode():
        raise Poison("headers", f"header {ORIGIN_TOPIC} is not {source_topic!r}: {topic!r:.60}")
    return source_topic, _number(headers, ORIGIN_PARTITION, MAX_PARTITION), _number(headers, ORIGIN_OFFSET, MAX_OFFSET)


def stream_of(record, hop_topic: str, origin: tuple[str, int, int]) -> str:
    """The stream a record belongs to, in a state record's `applied` map."""
    return _stream(origin[0], origin[1], record.topic == hop_topic)


@lru_cache(maxsize=4096)
def _stream(topic: str, partition: int, hop: bool) -> str:
    return f"{topic}:{partition}{HOP_SUFFIX if hop else ''}"


class Replay(NamedTuple):
    lineage: str   # the coordinates of the event's first record, as the letters say
    count: int     # how often it was replayed
    identity: str  # the lineage and a hash of the value: what a key's record remembers


def replay_of(record, source_topic: str) -> Replay | None:
    """What a replayed record says it is; None for any other (or an unreadable replay header)."""
    if not record.headers:
        return None
    headers = dict(record.headers)
    raw = headers.get(REPLAY_OF)
    if not isinstance(raw, (bytes, bytearray)):
        return None
    lineage = parse_lineage(raw.decode("utf-8", "replace"))
    if lineage is None or not lineage.startswith(source_topic + ":") or lineage.count(":") != 2:
        return None
    count = headers.get(REPLAY_COUNT)
    n = int(count) if isinstance(count, (bytes, bytearray)) and count.isdigit() and len(count) < 10 else 1
    return Replay(lineage, n, identity(lineage, record.value))


def identity(lineage: str, value: bytes | None) -> str:
    """A replayed event's identity: its lineage and a hash of its value (the worker's and the replay
    tool's one definition)."""
    return f"{lineage}#{hashlib.sha256(value or b'').hexdigest()[:16]}"


def origin_headers(origin: tuple[str, int, int]) -> list[tuple[str, bytes]]:
    return [(ORIGIN_TOPIC, origin[0].encode()), (ORIGIN_PARTITION, str(origin[1]).encode()),
            (ORIGIN_OFFSET, str(origin[2]).encode())]
