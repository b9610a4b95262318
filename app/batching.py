"""Adaptive micro-batches from an agent's stream, with no fixed wait.

`stream.take(n, within)` waits up to `within` for a batch to fill, which is pure latency at low
load, and it passes every event through Faust's per-event stream machinery. Here the agent reads
its channel's queue directly: it blocks for the first event, then takes whatever else is already
buffered, up to `max_n`. At low load a batch is one event; under load batches grow by themselves
while the previous one is being processed. Events are acked by the caller (the commit gate).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator


async def micro_batches(stream, max_n: int) -> AsyncIterator[list]:
    channel = stream.channel.__aiter__()  # subscribes with the conductor, as `async for` would
    queue = channel.queue
    while True:
        try:
            batch = [await channel.__anext__()]
        except StopAsyncIteration:  # the worker is stopping
            return
        while len(batch) < max_n:
            try:
                batch.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        yield batch
