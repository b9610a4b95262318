"""The scoring agents: micro-batches of raw records through the pipeline's processor.

Per-event errors are handled inside the processor: whatever one record raises makes it a dead
letter. What still escapes is a fault of the process (the broker, the disk) or a bug; Faust would
restart the agent and the batch in flight would be lost, or leave the worker alive doing nothing.
So the worker exits instead: the batch was not acked, and a restart replays it. A record that kills
the process itself is noticed at the next start and set aside after two deaths (app/pipeline/quarantine.py).
"""
from __future__ import annotations

import asyncio
import logging
import os

from app import gc_policy
from app.kafka import intake
from app.pipeline import quarantine

log = logging.getLogger(__name__)


def exit_worker(name: str, exc: BaseException) -> None:
    log.critical("unexpected error in the %s agent; exiting so the batch is replayed", name, exc_info=exc)
    os._exit(70)


def register(faust_app, name: str, topic, sink: intake.RecordSink, processor, batch_max: int, data_dir,
             before_first) -> None:
    """Declare the agent that feeds `topic`'s records (taken from the fetch into `sink`) to `processor`,
    once `await before_first()` returned (the models promoted before the start are loaded)."""
    writer = processor.writer
    writer.on_failure = lambda exc: exit_worker(name, exc)
    topics = set(topic.topics)
    writer.assignment = lambda: {tp for tp in faust_app.consumer.assignment() if tp.topic in topics}
    crashes = quarantine.open_for(data_dir, name)

    async def score(stream):
        try:
            await before_first()
            async for batch in intake.batches(stream, sink, batch_max, writer=writer):
                pieces = crashes.pieces(batch.spans)
                parts = [batch] if len(pieces) == 1 and pieces[0][1] is None else batch.split([p for p, _ in pieces])
                for part, (_, deaths) in zip(parts, pieces):
                    crashes.begin(part.spans)
                    await processor.handle(part, set_aside=deaths if deaths is not None and deaths >= quarantine.DEATHS else None)
                    crashes.end(part.spans)
                gc_policy.between_batches()
        except asyncio.CancelledError:
            crashes.end([])  # a clean stop is no death
            raise
        except Exception as exc:
            exit_worker(name, exc)

    score.__name__ = score.__qualname__ = f"score_{name}"
    faust_app.agent(topic, name=f"score_{name}")(score)
