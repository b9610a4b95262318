"""The dead-letter agent: counts by stage and exception, and a bounded sample, per partition."""
from __future__ import annotations

import asyncio
import logging

from agents.scoring import exit_worker
from app.kafka import intake
from app.pipeline.deadletters import Letter
from domain import dead_letter_stats as stats

log = logging.getLogger(__name__)


def _stored(record, partition: int) -> dict:
    """The partition's statistics as stored, or new ones if there are none or they cannot be read
    (statistics, not events: the letters themselves are still on their topic)."""
    if record is not None and stats.readable(record):
        return record
    if record is not None:
        log.warning("dead-letter statistics of partition %d could not be read; counting anew", partition)
    return stats.new_stats()


def _fold(folded: dict, record) -> dict:
    """One letter counted; a letter whose headers cannot be read at all (anyone can write this topic)
    is not, with a warning: the letter itself stays on its topic, and the stream goes on."""
    try:
        return stats.apply(folded, record.offset, Letter.parse(record.headers), record.value)
    except Exception as exc:
        log.warning("dead letter at %s[%s]@%s not counted: %r", record.topic, record.partition, record.offset, exc)
        return {**folded, "applied": max(folded["applied"], record.offset)}


def register(faust_app, topic, sink: intake.RecordSink, writer, batch_max: int) -> None:
    """Declare the agent that folds the letters of `topic` into one record per partition of it.

    What escapes a batch (a failed write of the statistics) exits the worker, as the scoring agents
    do: Faust would restart the agent with its batch neither acked nor dropped, and the next
    rebalance would wait for that batch for ever."""
    topics = set(topic.topics)
    writer.assignment = lambda: {tp for tp in faust_app.consumer.assignment() if tp.topic in topics}
    writer.on_failure = lambda exc: exit_worker("dead-letter", exc)

    async def count_dead_letters(stream):
        try:
            async for batch in intake.batches(stream, sink, batch_max, writer=writer):
                await writer.before(batch.generation)
                current = writer.read_many({tp.partition: [f"p{tp.partition}"] for tp, _ in batch.spans},
                                           batch.generation)
                rows = {}  # one record per dead-letter partition, kept on that partition of the table
                for tp, records in batch.spans:
                    key = f"p{tp.partition}"
                    folded = rows[key][1] if key in rows else _stored(current[key], tp.partition)
                    for r in records:
                        folded = _fold(folded, r)
                    rows[key] = (tp.partition, folded)
                await writer.add(rows, batch, len(batch.records))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            exit_worker("dead-letter", exc)

    faust_app.agent(topic, name="dead_letters")(count_dead_letters)
