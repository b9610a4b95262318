"""The model control topic: which model each pipeline scores with, for every worker, through Kafka.

A promotion is one record on a compacted topic of one partition (MODEL_CONTROL_TOPIC), keyed
`<pipeline>:champion` or `<pipeline>:challenger`, whose value carries the model itself: the
LightGBM model text, gzip-compressed, with its metadata and the versions promoted before it. Every
worker reads the whole topic with a consumer of its own (no group: every worker must see every
promotion, as Flink's broadcast state), so workers on several machines switch without a shared
disk, and a worker that starts later finds the latest promotion of each key there (compaction
keeps it). A challenger's key with a null value (a tombstone) ends its shadow.

Why the bytes travel in the record: a model of these pipelines is a few hundred KB of text and
about 40% of that gzipped, well below a record's 1 MB; nothing else (a shared volume, an object store
with its credentials) has to be reachable from every worker. A model too large for one record is
refused at promotion with its size.

The topic is as untrusted as any input: `parse` never raises; a record that does not parse, whose
model text does not hash to its version, or whose features are not the code's is refused by the
workers with the reason (`/model`, a metric, a log line), and they keep scoring with what they have.
"""
from __future__ import annotations

import base64
import gzip
import time
import zlib
from dataclasses import dataclass

import orjson

from app.models import registry

ROLES = ("champion", "challenger")
HISTORY = 10  # versions promoted before, newest first, kept in each promotion (rollback reads them)
MAX_RECORD_BYTES = 900_000  # below the producer's and the broker's 1 MB default
# A model's text, unpacked: gzip shrinks these models about 2.5x and base64 adds a third, so a
# record holds at most ~1.7 MB of it. The bound stops a forged record from unpacking to gigabytes
# (1 MB of gzip of one repeated byte is a GB) and killing every worker that reads it, at every start.
MAX_MODEL_TEXT_BYTES = 16_000_000


class PromotionError(ValueError):
    """A promotion that cannot be made (too large, nothing to roll back to): the message says why."""


@dataclass(frozen=True)
class Promotion:
    pipeline: str
    role: str
    version: str | None  # None: a challenger's shadow ended
    model_text: str | None
    meta: dict
    history: tuple[str, ...]
    promoted_at: int | None


def key_of(pipeline: str, role: str) -> bytes:
    return f"{pipeline}:{role}".encode()


def encode(pipeline: str, role: str, model_text: str, meta: dict, history: list[str],
           now_ms: int | None = None) -> tuple[bytes, bytes]:
    """(key, value) of a promotion record; PromotionError if it would not fit a record."""
    packed = base64.b64encode(gzip.compress(model_text.encode(), 6)).decode()
    value = orjson.dumps({
        "pipeline": pipeline, "role": role, "version": registry.version_of(model_text),
        "promoted_at": now_ms if now_ms is not None else int(time.time() * 1000),
        "meta": meta, "history": history[:HISTORY], "model_gzip_base64": packed,
    })
    if len(value) > MAX_RECORD_BYTES:
        raise PromotionError(f"the model is {len(value):,} bytes as a promotion record (gzipped), more than "
                             f"{MAX_RECORD_BYTES:,}: a record cannot carry it")
    return key_of(pipeline, role), value


def parse(key: bytes | None, value: bytes | None, pipelines) -> tuple[Promotion | None, str | None]:
    """(promotion, None) or (None, why it is refused); never raises."""
    try:
        pipeline, _, role = (key or b"").decode().partition(":")
    except UnicodeDecodeError:
        return None, "the record's key is not UTF-8"
    if pipeline not in pipelines or role not in ROLES:
        return None, f"the key {key!r:.80} names no pipeline:role of this worker"
    if value is None:
        if role == "challenger":
            return Promotion(pipeline, role, None, None, {}, (), None), None
        return None, "a champion cannot be removed, only replaced"
    if len(value) > MAX_RECORD_BYTES:  # batch compression lets a record past the broker's limit
        return None, f"the record is {len(value):,} bytes, more than {MAX_RECORD_BYTES:,}"
    try:
        body = orjson.loads(value)
        text = _gunzip(base64.b64decode(body["model_gzip_base64"], validate=True)).decode()
        version, meta = body["version"], body.get("meta") or {}
        history = tuple(str(v) for v in body.get("history") or ())[:HISTORY]
        promoted_at = body.get("promoted_at")
        if not isinstance(meta, dict) or not isinstance(version, str):
            raise ValueError("meta must be an object, version a string")
    except Exception as exc:  # any bytes: whatever they raise, the record is refused
        return None, f"the record does not parse: {type(exc).__name__}: {exc}"[:300]
    if registry.version_of(text) != version:
        return None, f"the model text does not hash to its version {version!r:.40}"
    return Promotion(pipeline, role, version, text, meta, history,
                     promoted_at if isinstance(promoted_at, int) else None), None


def _gunzip(packed: bytes) -> bytes:
    unpacking = zlib.decompressobj(wbits=31)  # gzip framing
    text = unpacking.decompress(packed, MAX_MODEL_TEXT_BYTES)
    if unpacking.unconsumed_tail or not unpacking.eof:
        raise ValueError(f"the model unpacks to more than {MAX_MODEL_TEXT_BYTES:,} bytes, or is cut short")
    return text
