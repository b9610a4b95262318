"""Dead-letter statistics per dead_letters partition: pure functions over a bounded record.

A letter is what `app.pipeline.deadletters.Letter.parse` reads off a dead letter's headers (stage, exception,
message, source topic, partition, offset, attempts, ts); any object with those attributes will do.
"""
from __future__ import annotations

RECENT = 20  # samples kept per partition


def new_stats() -> dict:
    return {"counts": {}, "recent": [], "applied": -1}


def readable(stats) -> bool:
    """Whether a stored record is one `apply` and `merge` can read (the changelog it is restored from
    can hold anything anyone wrote to it)."""
    return (isinstance(stats, dict) and type(stats.get("applied")) is int
            and isinstance(stats.get("counts"), dict) and all(type(n) is int for n in stats["counts"].values())
            and all(isinstance(k, str) and "|" in k for k in stats["counts"])
            and isinstance(stats.get("recent"), list) and all(isinstance(r, dict) for r in stats["recent"]))


def apply(stats: dict, offset: int, letter, value: bytes | None) -> dict:
    """Fold one dead letter in; a replayed offset (at or below `applied`) changes nothing."""
    if offset <= stats["applied"]:
        return stats
    stage, exception = (letter.stage or "?")[:64], (letter.exception or "?")[:128]
    key = f"{stage.replace('|', '/')}|{exception}"
    counts = {**stats["counts"], key: stats["counts"].get(key, 0) + 1}
    sample = {
        "stage": letter.stage,
        "exception": letter.exception,
        "message": letter.message,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "attempts": letter.attempts,
        "ts": letter.ts,
        "value": (value or b"")[:200].decode("utf-8", "replace"),
        "dead_letter_offset": offset,
    }
    return {"counts": counts, "recent": ([sample] + stats["recent"])[:RECENT], "applied": offset}


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
