"""Dead-letter statistics per dead_letters partition: pure functions over a bounded record."""
from __future__ import annotations

RECENT = 20  # samples kept per partition


def new_stats() -> dict:
    return {"counts": {}, "recent": [], "applied": -1}


def header_map(headers) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in (headers or ())}


def apply(stats: dict, offset: int, headers: dict[str, str], value: bytes | None) -> dict:
    """Fold one dead letter in; a replayed offset (at or below `applied`) changes nothing."""
    if offset <= stats["applied"]:
        return stats
    key = f"{headers.get('errors.stage', '?')}|{headers.get('errors.exception', '?')}"
    counts = {**stats["counts"], key: stats["counts"].get(key, 0) + 1}
    sample = {
        "stage": headers.get("errors.stage"),
        "exception": headers.get("errors.exception"),
        "message": headers.get("errors.message"),
        "topic": headers.get("errors.topic"),
        "partition": headers.get("errors.partition"),
        "offset": headers.get("errors.offset"),
        "attempts": headers.get("errors.attempts"),
        "ts": headers.get("errors.ts"),
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
    recent.sort(key=lambda r: int(r["ts"] or 0), reverse=True)
    by_stage: dict[str, int] = {}
    for k, n in counts.items():
        stage = k.split("|", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + n
    return {"total": sum(counts.values()), "by_stage": by_stage,
            "by_reason": [{"stage": k.split("|", 1)[0], "exception": k.split("|", 1)[1], "count": n}
                          for k, n in sorted(counts.items(), key=lambda kv: -kv[1])],
            "recent": recent[:RECENT]}
