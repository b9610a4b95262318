"""Fetched records straight to the agents, a batch at a time, below Faust's per-record machinery.

Faust turns every fetched record into a Message and an Event, routes it through its conductor onto
a channel queue, and tracks, acks and monitors it one by one: once the work itself is batched, that
was most of a worker's CPU per event. Here the topics an agent reads in batches are taken out of
each fetch before that happens: the fetched record lists go into the agent's `RecordSink`, and a
batch is acked as a whole in Faust's own bookkeeping, so Faust's commit logic (the highest
contiguous acked offset, on its interval) and its rebalance protocol (wait until nothing taken is
unacked) work as they do for its own events. Other topics (table changelogs, standbys) keep
Faust's path.

Rebalancing, as Faust's stream iterator handles it per event, here per batch:
- a batch in flight is registered as one unacked message, so a rebalance waits for it to finish
  before partitions (and their table state) move or are recovered;
- the sinks are cleared with Faust's own queues when flow stops and when it resumes (recovery ends
  with every partition sought to its committed offset); nothing is taken while flow is stopped;
  records of partitions no longer assigned here are dropped unacked: their new owner reads them.

And one thing Faust does not do: notice a hole. If a fetch is in flight while a rebalance stops the
flow, its records are dropped while the consumer's position has moved past them. Input topics are
neither compacted nor transactional, so offsets arrive without gaps: a record beyond the next
expected offset means records went missing, and the partition is sought back to fetch them again
before anything past the hole is processed or acked. Records below it were processed already
(fetched again after a seek) and are skipped.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import AsyncIterator

from faust.transport import consumer as faust_consumer
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

log = logging.getLogger(__name__)

_sinks: dict[str, "RecordSink"] = {}  # topic name -> the sink of the agent that reads it


class RecordSink:
    """Fetched record lists of one agent's topics, bounded by a record count.

    A full sink holds up the fetcher (backpressure reaches the broker, not memory).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: deque = deque()  # (topic-partition, records in offset order)
        self.size = 0
        self._filled = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._cleared = asyncio.Event()

    def clear(self) -> None:
        """Called by Faust's flow control when flow stops and when it resumes."""
        self.chunks.clear()
        self.size = 0
        self._filled.clear()
        self._room.set()
        self._cleared.set()

    async def wait(self, timeout: float) -> None:
        """Until records are there, the sink is cleared (a rebalance or a stop) or was cleared since
        records were last taken, or `timeout` seconds passed."""
        if self.chunks or self._cleared.is_set():
            return
        self._filled.clear()
        waits = [asyncio.ensure_future(self._filled.wait()), asyncio.ensure_future(self._cleared.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def put(self, consumer, tp, records: list) -> None:
        while self.size >= self.capacity:
            self._room.clear()
            await self._room.wait()
            if not consumer.flow_active:
                return  # a rebalance: read again from the committed offset once it is over
        self.chunks.append((tp, records))
        self.size += len(records)
        self._filled.set()

    async def take(self, max_n: int) -> list[tuple]:
        """Wait for records, then take what is there, up to `max_n`, as (tp, records) chunks."""
        while not self.chunks:
            self._filled.clear()
            await self._filled.wait()
        self._cleared.clear()
        out, n = [], 0
        while self.chunks and n < max_n:
            tp, records = self.chunks.popleft()
            if len(records) > max_n - n:
                self.chunks.appendleft((tp, records[max_n - n:]))
                records = records[:max_n - n]
            out.append((tp, records))
            n += len(records)
        self.size -= n
        if self.size < self.capacity:
            self._room.set()
        return out


def sink_for(app, topic, capacity: int) -> RecordSink:
    """Route the records of `topic` (a Faust topic, maybe of several names) into a new sink.

    Call it when the agent is declared: a record of an intake topic that reached Faust's path
    would be tracked and never acked, and hold up every commit and rebalance.
    """
    sink = RecordSink(capacity)
    for name in topic.topics:
        _sinks[name] = sink
    app.flow_control.manage_queue(sink)
    return sink


_wait_next_records = faust_consumer.Consumer._wait_next_records


async def _wait_next_records_into_sinks(self, timeout: float):
    records, active = await _wait_next_records(self, timeout)
    if records:
        for tp in [tp for tp in records if tp.topic in _sinks]:
            fetched = records.pop(tp)
            if fetched and self.flow_active and (active is None or tp in active):
                self._read_offset[tp] = fetched[-1].offset  # as Faust's delivery does per record
                await _sinks[tp.topic].put(self, tp, fetched)
    return records, active


def install() -> None:
    """Take the intake topics' records out of each fetch (`Consumer.getmany` delivers the rest)."""
    faust_consumer.Consumer._wait_next_records = _wait_next_records_into_sinks


class Batch:
    """Records admitted for processing, in order per partition. `ack()` once all they produced is acknowledged.

    Until then the batch stands in Faust's set of unacked messages, which a rebalance waits on.
    """

    __slots__ = ("records", "generation", "spans", "consumer", "acked", "refcount", "__weakref__")

    def __init__(self, consumer, generation, spans: list[tuple]) -> None:
        self.consumer = consumer
        self.generation = generation
        self.spans = spans
        self.records = [r for _, records in spans for r in records]
        self.acked = False
        self.refcount = 1  # read by Faust's log line while a rebalance waits
        consumer._unacked_messages.add(self)

    def ack(self) -> None:
        """`Consumer.ack` for every record, in one step."""
        c = self.consumer
        acks_enabled_for = c.app.topics.acks_enabled_for
        with ack_lock:
            if self.acked:
                return
            self.acked = True
            for tp, records in self.spans:
                if not acks_enabled_for(tp.topic):
                    continue
                committed = c._committed_offset[tp]
                index = c._acked_index[tp]
                new = [r.offset for r in records
                       if (committed is None or r.offset >= committed) and r.offset not in index]
                index.update(new)
                c._acked[tp].extend(new)
                c._n_acked += len(new)
            c._unacked_messages.discard(self)
            notify(c._waiting_for_ack)


class OffsetGuard:
    """Next expected offset per partition; skips records seen before, rewinds the consumer over holes."""

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

    async def admit(self, tp, records: list) -> list:
        """The records of `records` (one partition, offset order) to process now."""
        expected = self.expected.get(tp)
        if expected is not None:
            if records[0].offset < expected:
                records = [r for r in records if r.offset >= expected]
                if not records:
                    return records
            if records[0].offset > expected:
                await self._rewind(tp, expected, records[0].offset)
                return []
        if records[-1].offset - records[0].offset + 1 != len(records):  # a hole inside the fetch
            run = 1
            while records[run].offset == records[run - 1].offset + 1:
                run += 1
            await self._rewind(tp, records[run - 1].offset + 1, records[run].offset)
            records = records[:run]
        else:
            self.rewinding.pop(tp, None)
        self.expected[tp] = records[-1].offset + 1
        return records

    async def _rewind(self, tp, expected: int, found: int) -> None:
        # Seek again if the last seek did not bring the records back within a second: Faust
        # swallows a seek that fails mid-rebalance, and a partition must never stay stuck.
        now = time.monotonic()
        if now - self.rewinding.get(tp, 0.0) <= 1.0:
            return
        self.rewinding[tp] = now
        log.warning("records %s..%s of %s went missing in the consumer; fetching them again",
                    expected, found - 1, tp)
        try:
            await self.consumer.seek(tp, expected)
        except Exception as exc:  # not assigned any more: the next owner reads them
            log.warning("seek of %s to %s failed: %r", tp, expected, exc)


async def batches(stream, sink: RecordSink, max_n: int, writer=None) -> AsyncIterator[Batch]:
    """The agent's loop: batches of up to `max_n` records, with no fixed wait.

    It blocks for the first records, then takes whatever else is already fetched: at low load a
    batch is one event; under load batches grow by themselves while the last one is processed.

    `writer` (the processor) writes state behind: whenever the sink is empty and `writer.write_due()`
    says something is unwritten, the loop waits for more records only until the write is due, or
    until a rebalance clears the sink, and then awaits `writer.flush()`. Everything stays in the
    agent's one task: a write never runs beside a batch.
    """
    app = stream.app
    consumer = app.consumer
    inbound = app.monitor.stream_inbound_time  # Faust's stall check reads when a partition last moved
    guard = OffsetGuard(consumer)
    stream.channel.__aiter__()  # subscribes the topics with the conductor, as `async for` would
    while True:
        if writer is not None and not sink.chunks:
            due = writer.write_due()
            if due is not None:
                if due > 0:
                    await sink.wait(due)
                if not sink.chunks:
                    await writer.flush()
        chunks = await sink.take(max_n)
        await app.flow_control.acquire()  # returns at once unless a rebalance/recovery is under way
        generation = app.consumer_generation_id
        guard.on_generation(generation)
        assigned = consumer.assignment()
        spans = []
        for tp, records in chunks:
            if tp in assigned:
                records = await guard.admit(tp, records)
                if records:
                    spans.append((tp, records))
        if spans:
            now = time.monotonic()
            for tp, _ in spans:
                inbound[tp] = now
            yield Batch(consumer, generation, spans)
