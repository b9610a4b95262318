"""The dead-letter contract, built and parsed here only: header names, size policy (the topic is
DEAD_LETTER_TOPIC, app/topology.py).

A letter keeps the failed record's key and value bytes and its own headers, and puts the error
context in headers: the approach of Kafka Connect and Kafka Streams (KIP-1034), with header names of
this service's own (`errors.*`, not their `__connect.errors.*` / `__streams.errors.*`). Any Kafka tool
can inspect a letter, and the replay can send it again as it was. Two exceptions, both said in headers:
- The input's headers in the namespaces this service writes (`errors.*`, `replay.*`) are not
  copied: anyone can write them, and a forged `errors.topic` would pass for ours.
- A letter larger than DEAD_LETTER_MAX_BYTES would be refused by the broker forever (its
  `message.max.bytes`), so its value (and a huge key, or huge headers) is cut to fit, with the
  original size and a SHA-256 in headers. A letter the broker still refuses is cut to nothing but
  its headers (`shrink`).

Reading is as defensive as any other input: the dead-letter topic is writable by anyone, so header
values may be missing, null, not UTF-8 or nonsense; `Letter.parse` never raises.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

EXCEPTION = "errors.exception"
MESSAGE = "errors.message"
STAGE = "errors.stage"
SOURCE_TOPIC = "errors.topic"
SOURCE_PARTITION = "errors.partition"
SOURCE_OFFSET = "errors.offset"
ATTEMPTS = "errors.attempts"
TIMESTAMP = "errors.ts"
VALUE_SIZE = "errors.value.size"
VALUE_SHA256 = "errors.value.sha256"
KEY_SIZE = "errors.key.size"
KEY_SHA256 = "errors.key.sha256"
TRUNCATED = "errors.truncated"          # "value", "key", "key,value": what was cut
HEADERS_DROPPED = "errors.headers.dropped"  # how many input headers did not fit

# Written by the replay on the records it sends: how often this record was replayed, and the
# coordinates (topic:partition:offset) of the record its lineage started from: the event's identity.
REPLAY_COUNT = "replay.count"
REPLAY_OF = "replay.of"

OWN_PREFIXES = ("errors.", "replay.")
MESSAGE_CHARS = 1000
_LINEAGE = re.compile(r"([^\x00-\x1f:]{1,249}):([0-9]{1,10}):([0-9]{1,19})")  # ASCII digits: str's \\d takes '²' too


def text(raw: bytes | None) -> str | None:
    """A header value as text, whatever its bytes."""
    return None if raw is None else raw.decode("utf-8", "replace")


def header_map(headers) -> dict[str, str | None]:
    """Header name -> text of its last value (ours are written after the input's)."""
    return {str(k): text(v) if isinstance(v, (bytes, bytearray)) else None for k, v in (headers or ())}


def sendable_name(name: str) -> str:
    """aiokafka writes header names as UTF-8: a name read with invalid bytes keeps them as U+FFFD."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _cut(raw: bytes | None, limit: int, name: str, size_h: str, sha_h: str, headers: list, cut: list):
    if raw is None or len(raw) <= limit:
        return raw
    headers += [(size_h, str(len(raw)).encode()), (sha_h, hashlib.sha256(raw).hexdigest().encode())]
    cut.append(name)
    return raw[:max(0, limit)]


def build(*, key: bytes | None, value: bytes | None, input_headers, stage: str, error: BaseException,
          topic: str, partition: int, offset: int, attempts: int, now_ms: int, replay,  # lineage.Replay or None
          max_bytes: int) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of the letter for one failed record, within `max_bytes` in all."""
    ours = [
        (EXCEPTION, type(error).__name__.encode()),
        (MESSAGE, str(error)[:MESSAGE_CHARS].encode("utf-8", "replace")),
        (STAGE, stage.encode()),
        (SOURCE_TOPIC, topic.encode("utf-8", "replace")),
        (SOURCE_PARTITION, str(partition).encode()),
        (SOURCE_OFFSET, str(offset).encode()),
        (ATTEMPTS, str(attempts).encode()),
        (TIMESTAMP, str(now_ms).encode()),
    ]
    if replay is not None:
        ours += [(REPLAY_OF, replay[0].encode()), (REPLAY_COUNT, str(replay[1]).encode())]
    kept = [(sendable_name(k), v) for k, v in (input_headers or ()) if not str(k).startswith(OWN_PREFIXES)]
    budget = max_bytes - 512 - sum(len(k) + len(v) for k, v in ours)  # 512: record framing and our cut headers
    kept_size = sum(len(k.encode()) + len(v or b"") for k, v in kept)
    if kept_size > budget // 4:
        ours.append((HEADERS_DROPPED, str(len(kept)).encode()))
        kept, kept_size = [], 0
    budget -= kept_size
    cut: list[str] = []
    key = _cut(key, budget // 4, "key", KEY_SIZE, KEY_SHA256, ours, cut)
    value = _cut(value, budget - len(key or b""), "value", VALUE_SIZE, VALUE_SHA256, ours, cut)
    if cut:
        ours.append((TRUNCATED, ",".join(cut).encode()))
    return key, value, kept + ours


def shrink(key: bytes | None, value: bytes | None, headers: list) -> tuple[bytes | None, bytes | None, list] | None:
    """The letter without key, value and input headers (sizes and checksums kept); None if it was already."""
    if not key and not value and all(k.startswith(OWN_PREFIXES) for k, _ in headers):
        return None
    ours = [(k, v) for k, v in headers if k.startswith(OWN_PREFIXES) and k != TRUNCATED]
    ours = _cut_all(key, KEY_SIZE, KEY_SHA256, ours) + _cut_all(value, VALUE_SIZE, VALUE_SHA256, [])
    ours.append((TRUNCATED, b"key,value,headers"))
    return None, b"", ours


def _cut_all(raw: bytes | None, size_h: str, sha_h: str, headers: list) -> list:
    if raw and not any(k == size_h for k, _ in headers):
        headers += [(size_h, str(len(raw)).encode()), (sha_h, hashlib.sha256(raw).hexdigest().encode())]
    return headers


def _int(raw: str | None, lo: int, hi: int) -> int | None:
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 19:  # '²'.isdigit(), and int('²') raises
        return None
    n = int(raw)
    return n if lo <= n <= hi else None


def parse_lineage(raw: str | None) -> str | None:
    """A `replay.of` value, if it is one: `topic:partition:offset`."""
    return raw if raw is not None and _LINEAGE.fullmatch(raw) else None


@dataclass(frozen=True)
class Letter:
    """What a dead letter says about itself; `problem` is why it cannot be replayed, else None."""

    stage: str | None
    exception: str | None
    message: str | None
    topic: str | None
    partition: int | None
    offset: int | None
    attempts: str | None
    ts: int | None
    lineage: str | None        # the identity of the event: the coordinates of its first record
    replay_count: int
    truncated: str | None
    problem: str | None

    @classmethod
    def parse(cls, headers) -> "Letter":
        h = header_map(headers)
        topic = h.get(SOURCE_TOPIC)
        partition = _int(h.get(SOURCE_PARTITION), 0, 2**31 - 1)
        offset = _int(h.get(SOURCE_OFFSET), 0, 2**63 - 1)
        lineage = parse_lineage(h.get(REPLAY_OF))
        if lineage is None and topic and partition is not None and offset is not None:
            lineage = f"{topic}:{partition}:{offset}"
        truncated = h.get(TRUNCATED)
        problem = None
        if not topic or partition is None or offset is None:
            problem = "no valid source topic, partition and offset headers"
        elif truncated:
            problem = f"the letter's {truncated} was cut to fit the broker"
        return cls(stage=h.get(STAGE), exception=h.get(EXCEPTION), message=h.get(MESSAGE), topic=topic,
                   partition=partition, offset=offset, attempts=h.get(ATTEMPTS),
                   ts=_int(h.get(TIMESTAMP), 0, 2**63 - 1), lineage=lineage,
                   replay_count=_int(h.get(REPLAY_COUNT), 0, 10**9) or 0, truncated=truncated, problem=problem)
