"""Adaptive micro-batches from an agent's stream, with no fixed wait.

`stream.take(n, within)` waits up to `within` for a batch to fill, which is pure latency at low
load, and it passes every event through Faust's per-event stream machinery. Here the agent reads
its channel's queue directly: it blocks for the first event, then takes whatever else is already
buffered, up to `max_n`. At low load a batch is one event; under load batches grow by themselves
while the previous one is being processed. Events are acked by the caller (the commit gate).

Rebalancing needs what Faust's stream iterator does per event, done here per batch:
- every event taken is tracked as unacked, so that on a rebalance the consumer waits for the batch
  in flight to finish before partitions (and their table state) move or are recovered;
- nothing is processed while flow is stopped (tables are being recovered), and events of
  partitions no longer assigned here are dropped unacked: their new owner reads them from the
  committed offset. (Faust's own iterator skips *and acks* events of an older consumer generation;
  for a partition that stays here such events are processed instead: state updates are idempotent.)

And one thing Faust does not do: notice a hole. If a fetch is in flight while a rebalance suspends
the flow, Faust's fetcher can drop the records it returns yet count them as read, and its commit
logic steps over a one-record hole at the head. Input topics are neither compacted nor
transactional, so offsets arrive without gaps: an event beyond the next expected offset means
records went missing, and the partition is sought back to fetch them again before anything past
the hole is processed or acked.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

log = logging.getLogger(__name__)


class OffsetGuard:
    """Next expected offset per partition; rewinds the consumer over holes."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.generation = None
        self.expected: dict = {}
        self.rewinding: dict = {}  # partition -> when it was last sought back

    def on_generation(self, generation) -> None:
        if generation != self.generation:
            # after a rebalance Faust has sought every partition to its committed offset
            self.generation = generation
            self.expected = {tp: o for tp, o in self.consumer._committed_offset.items() if o is not None}
            self.rewinding.clear()

    async def admit(self, event) -> bool:
        tp, offset = event.message.tp, event.message.offset
        expected = self.expected.get(tp)
        if expected is not None and offset > expected:
            # Seek again if the last seek did not bring the records back within a second: Faust
            # swallows a seek that fails mid-rebalance, and a partition must never stay stuck.
            now = time.monotonic()
            if now - self.rewinding.get(tp, 0.0) > 1.0:
                self.rewinding[tp] = now
                log.warning("records %s..%s of %s went missing in the consumer; fetching them again",
                            expected, offset - 1, tp)
                try:
                    await self.consumer.seek(tp, expected)
                except Exception as exc:  # not assigned any more: the next owner reads them
                    log.warning("seek of %s to %s failed: %r", tp, expected, exc)
            return False
        if expected is None or offset == expected:
            self.expected[tp] = offset + 1
            self.rewinding.pop(tp, None)
        return True


async def micro_batches(stream, max_n: int) -> AsyncIterator[list]:
    app = stream.app
    consumer = app.consumer
    guard = OffsetGuard(consumer)
    channel = stream.channel.__aiter__()  # subscribes with the conductor, as `async for` would
    queue = channel.queue
    while True:
        try:
            taken = [await channel.__anext__()]
        except StopAsyncIteration:  # the worker is stopping
            return
        while len(taken) < max_n:
            try:
                taken.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        await app.flow_control.acquire()  # returns at once unless a rebalance/recovery is under way
        guard.on_generation(app.consumer_generation_id)
        assigned = consumer.assignment()
        batch = []
        for event in taken:
            if event.message.tp in assigned and await guard.admit(event):
                if not event.message.tracked:
                    event.message.tracked = True
                    consumer.track_message(event.message)
                batch.append(event)
        if batch:
            yield batch
