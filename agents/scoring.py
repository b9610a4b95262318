"""The scoring agents: micro-batches of raw records through the shared processor.

Per-event errors are handled inside the processor. Anything that still escapes is a bug; Faust would
restart the agent and the batch in flight would be lost, or leave the worker alive doing nothing.
So the worker exits instead: the batch was not acked, and a restart replays it.
"""
from __future__ import annotations

import logging
import os

from app import collector, intake
from app.settings import settings
from app.worker import app, pipelines

log = logging.getLogger(__name__)


def _exit(pipeline, exc: BaseException) -> None:
    log.critical("unexpected error in %s pipeline; exiting so the batch is replayed",
                 pipeline.usecase.name, exc_info=exc)
    os._exit(70)


def _agent_for(pipeline):
    sink = intake.sink_for(app, pipeline.input, capacity=2 * settings.batch_max)
    processor = pipeline.processor
    processor.on_failure = lambda exc: _exit(pipeline, exc)

    async def score(stream):
        try:
            async for batch in intake.batches(stream, sink, settings.batch_max, writer=processor):
                await processor.handle(batch)
                collector.between_batches()
        except Exception as exc:
            _exit(pipeline, exc)

    score.__name__ = score.__qualname__ = f"score_{pipeline.usecase.name}"
    return app.agent(pipeline.input, name=f"score_{pipeline.usecase.name}")(score)


scoring_agents = {name: _agent_for(p) for name, p in pipelines.items()}
