"""The scoring agents: micro-batches of raw records through the shared processor.

Per-event errors are handled inside the processor: whatever one record raises makes it a dead
letter. What still escapes is a fault of the process (the broker, the disk) or a bug; Faust would
restart the agent and the batch in flight would be lost, or leave the worker alive doing nothing.
So the worker exits instead: the batch was not acked, and a restart replays it. A record that kills
the process itself is noticed at the next start and set aside after two deaths (app/quarantine.py).
"""
from __future__ import annotations

import asyncio
import logging
import os

from app import collector, intake, metrics, quarantine
from app.settings import settings
from app.worker import app, pipelines

log = logging.getLogger(__name__)


def _exit(pipeline, exc: BaseException) -> None:
    log.critical("unexpected error in %s pipeline; exiting so the batch is replayed",
                 pipeline.usecase.name, exc_info=exc)
    os._exit(70)


def _agent_for(pipeline):
    sink = intake.sink_for(app, pipeline.input, capacity=2 * settings.batch_max,
                           capacity_bytes=settings.intake_max_bytes)
    metrics.watch_intake(pipeline.usecase.name, sink)
    processor = pipeline.processor
    processor.on_failure = lambda exc: _exit(pipeline, exc)
    topics = set(pipeline.input.topics)
    processor.assignment = lambda: {tp for tp in app.consumer.assignment() if tp.topic in topics}
    crashes = quarantine.open_for(settings.data_dir, pipeline.usecase.name)

    async def score(stream):
        try:
            async for batch in intake.batches(stream, sink, settings.batch_max, writer=processor):
                pieces = crashes.pieces(batch.spans)
                parts = [batch] if len(pieces) == 1 and pieces[0][1] is None else batch.split([p for p, _ in pieces])
                for part, (_, deaths) in zip(parts, pieces):
                    crashes.begin(part.spans)
                    await processor.handle(part, set_aside=deaths if deaths is not None and deaths >= quarantine.DEATHS else None)
                    crashes.end(part.spans)
                collector.between_batches()
        except asyncio.CancelledError:
            crashes.end([])  # a clean stop is no death
            raise
        except Exception as exc:
            _exit(pipeline, exc)

    score.__name__ = score.__qualname__ = f"score_{pipeline.usecase.name}"
    return app.agent(pipeline.input, name=f"score_{pipeline.usecase.name}")(score)


scoring_agents = {name: _agent_for(p) for name, p in pipelines.items()}
