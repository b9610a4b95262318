"""The dead-letter agent: counts by stage and exception, and a bounded sample, per partition."""
from __future__ import annotations

import logging

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


def register(faust_app, topic, sink: intake.RecordSink, writer, batch_max: int) -> None:
    """Declare the agent that folds the letters of `topic` into one record per partition of it."""
    topics = set(topic.topics)
    writer.assignment = lambda: {tp for tp in faust_app.consumer.assignment() if tp.topic in topics}

    async def count_dead_letters(stream):
        async for batch in intake.batches(stream, sink, batch_max, writer=writer):
            await writer.before(batch.generation)
            current = writer.read_many({tp.partition: [f"p{tp.partition}"] for tp, _ in batch.spans},
                                       batch.generation)
            rows = {}  # one record per dead-letter partition, kept on that partition of the table
            for tp, records in batch.spans:
                key = f"p{tp.partition}"
                folded = rows[key][1] if key in rows else _stored(current[key], tp.partition)
                for r in records:
                    folded = stats.apply(folded, r.offset, Letter.parse(r.headers), r.value)
                rows[key] = (tp.partition, folded)
            await writer.add(rows, batch, len(batch.records))

    faust_app.agent(topic, name="dead_letters")(count_dead_letters)
