"""What the web view reads of Faust's consumer and producer beyond their public API."""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


def lag(app, skip_topics: set[str]) -> list[dict]:
    """Per assigned partition of the other topics: highwater minus committed offset (the group's lag).

    Tansu reports high watermarks that trail the real end of a partition; the value is an estimate.
    """
    consumer = app.consumer
    committed = getattr(consumer, "_committed_offset", {})
    read = getattr(consumer, "_read_offset", {})
    out = []
    try:
        assignment = consumer.assignment()
    except Exception:
        return out
    for tp in sorted(assignment):
        if tp.topic in skip_topics or tp.topic.endswith("__assignor-__leader"):
            continue
        try:
            hw = consumer.highwater(tp)
        except Exception:
            hw = None
        pos = committed.get(tp)
        if pos is None and read.get(tp) is not None:
            pos = read[tp] + 1
        behind = None if hw is None else max(0, hw - (pos or 0))
        out.append({"topic": tp.topic, "partition": tp.partition, "highwater": hw, "committed": pos, "lag": behind})
    return out


async def routing_metadata(app, topic: str) -> None:
    """Faust's router hashes a key with the producer's metadata of the changelog topic, which the
    producer only has once it wrote to that topic; without it routing raises TypeError. Fetch it."""
    try:
        producer = app.producer._ensure_producer()
        await asyncio.wait_for(producer.partitions_for(topic), 5.0)
    except Exception:
        log.debug("no metadata for %s yet", topic, exc_info=True)
