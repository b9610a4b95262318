"""The dead-letter agent: counts by stage and exception, and a bounded sample, per partition."""
from __future__ import annotations

from app import intake
from app.deadletters import Letter
from app.settings import settings
from app.worker import app, dead_letter_topic, policy
from tables import dead_letter_stats as stats
from tables.store import declare

dead_letter_table = declare(app, "dead_letter_stats", help="dead letters per dead_letters partition")
sink = intake.sink_for(app, dead_letter_topic, capacity=2 * settings.batch_max,
                       capacity_bytes=settings.intake_max_bytes)


@app.agent(dead_letter_topic, name="dead_letters")
async def count_dead_letters(stream):
    async for batch in intake.batches(stream, sink, settings.batch_max):
        rows = {}  # one record per dead_letters partition, kept on that partition of the table
        for tp, records in batch.spans:
            key = f"p{tp.partition}"
            current = rows[key][2] if key in rows else (
                dead_letter_table.read_many(tp.partition, [key], batch.generation)[0] or stats.new_stats())
            for r in records:
                current = stats.apply(current, r.offset, Letter.parse(r.headers), r.value)
            rows[key] = (tp.partition, key, current)
        await dead_letter_table.put_many(list(rows.values()), batch.generation)
        await dead_letter_table.confirm(policy, lambda keys: dead_letter_table.put_many(
            [rows[k] for k in keys], batch.generation))
        batch.ack()
