"""Dead-letter statistics per dead_letters partition: pure functions over a bounded record.

A letter is what `app.pipeline.deadletters.Letter.parse` reads off a dead letter's headers (stage, exception,
message, source topic, partition, offset, attempts, ts); any object with those attributes will do.
"""
from __future__ import annotations

import orjson

RECENT = 20  # samples kept per partition
REASONS = 64  # distinct stage|exception counted per partition; the rest under OTHER
OTHER = "(other)|(other)"
SAMPLE_TEXT = 240  # bytes kept of each text in a sample, as JSON writes it (a control character takes 6)
COUNT_MAX = 2**62  # a stored count above this was not counted here (and +1 must stay writable)


def new_stats() -> dict:
    return {"counts": {}, "recent": [], "applied": -1}


def readable(stats) -> bool:
    """Whether a stored record is one `apply` and `merge` can read (the changelog it is restored from
    can hold anything anyone wrote to it)."""
    return (isinstance(stats, dict) and type(stats.get("applied")) is int and -1 <= stats["applied"] < 2**63 - 1
            and isinstance(stats.get("counts"), dict) and len(stats["counts"]) <= REASONS + 1
            and all(type(n) is int and 0 <= n < COUNT_MAX for n in stats["counts"].values())
            and all(isinstance(k, str) and "|" in k for k in stats["counts"])
            and isinstance(stats.get("recent"), list) and all(isinstance(r, dict) for r in stats["recent"]))


def apply(stats: dict, offset: int, letter, value: bytes | None) -> dict:
    """Fold one dead letter in; a replayed offset (at or below `applied`) changes nothing."""
    if offset <= stats["applied"]:
        return stats
    stage, exception = _cut((letter.stage or "?").replace("|", "/"), 64), _cut(letter.exception or "?", 128)
    key = f"{stage}|{exception}"
    if key not in stats["counts"] and len(stats["counts"]) >= REASONS:  # anyone can write a letter's headers
        key = OTHER
    counts = {**stats["counts"], key: stats["counts"].get(key, 0) + 1}
    sample = {
        "stage": _text(letter.stage),
        "exception": _text(letter.exception),
        "message": _text(letter.message),
        "topic": _text(letter.topic),
        "partition": letter.partition,
        "offset": letter.offset,
        "attempts": _text(letter.attempts),
        "ts": letter.ts,
        "value": (value or b"")[:200].decode("utf-8", "replace"),
        "dead_letter_offset": offset,
    }
    return {"counts": counts, "recent": ([sample] + stats["recent"])[:RECENT], "applied": offset}


def _text(value: str | None) -> str | None:
    return value if value is None else _cut(value, SAMPLE_TEXT)


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` as JSON writes it (escapes included), so that no letter can
    make the statistics a record larger than the store takes (app/kafka/store.py MAX_RECORD_BYTES)."""
    text = text[:max_bytes]
    while len(orjson.dumps(text)) - 2 > max_bytes:
        text = text[:len(text) * 3 // 4]
    return text


def merge(many: list[dict]) -> dict:
    """Sum of the per-partition stats, for the web view."""
    counts: dict[str, int] = {}
    recent = []
    for s in many:
        for k, n in s["counts"].items():
            counts[k] = counts.get(k, 0) + n
        recent.extend(s["recent"])
    recent.sort(key=lambda r: r["ts"] if type(r.get("ts")) is int else 0, reverse=True)
    by_stage: dict[str, int] = {}
    for k, n in counts.items():
        stage = k.split("|", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + n
    return {"total": sum(counts.values()), "by_stage": by_stage,
            "by_reason": [{"stage": k.split("|", 1)[0], "exception": k.split("|", 1)[1], "count": n}
                          for k, n in sorted(counts.items(), key=lambda kv: -kv[1])],
            "recent": recent[:RECENT]}
