"""The dead-letter agent: counts by stage and exception, and a bounded sample, per partition."""
from __future__ import annotations

from app.batching import micro_batches
from app.settings import settings
from app.worker import app, dead_letter_topic, policy
from tables import dead_letter_stats as stats
from tables.store import declare

dead_letter_table = declare(app, "dead_letter_stats", help="dead letters per dead_letters partition")


@app.agent(dead_letter_topic, name="dead_letters")
async def count_dead_letters(stream):
    async for batch in micro_batches(stream, settings.batch_max):
        last = {}
        for event in batch:
            msg = event.message
            key = f"p{msg.partition}"
            current = last[key][1] if key in last else (dead_letter_table.read(key) or stats.new_stats())
            last[key] = (event, stats.apply(current, msg.offset, stats.header_map(msg.headers), msg.value))
        for key, (event, value) in last.items():
            dead_letter_table.write(event, key, value)
        await dead_letter_table.confirm(policy, lambda keys: [dead_letter_table.write(*_arg(last, k)) for k in keys])
        for event in batch:
            event.ack()


def _arg(last: dict, key: str):
    event, value = last[key]
    return event, key, value
