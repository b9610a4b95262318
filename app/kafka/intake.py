"""Fetched records straight to the agents, a batch at a time, below Faust's per-record machinery.

Faust turns every fetched record into a Message and an Event, routes it through its conductor onto
a channel queue, and tracks, acks and monitors it one by one: once the work itself is batched, that
was most of a worker's CPU per event. Here the topics an agent reads in batches are taken out of
each fetch before that happens: the fetched record lists go into the agent's `RecordSink`, and a
batch is acked as a whole in Faust's own bookkeeping, so Faust's commit logic (the highest
contiguous acked offset, on its interval) and its rebalance protocol (wait until nothing taken is
unacked) work as they do for its own events. Other topics (the table changelogs Faust's recovery
reads) keep Faust's path.

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

from app.kafka.probes import LogProbe

log = logging.getLogger(__name__)

# A seek back that did not bring the records within this long is made again (a seek lands in
# milliseconds; Faust swallows one made mid-rebalance). A failover waited a whole second for it.
RESEEK_S = 0.25

# The longest the fetch loop waits before it looks at which partitions are active again. Faust
# waits up to a second: asleep when it finds every partition paused, as at the end of a recovery,
# or for records of the partitions that were active when the wait began. The partitions resumed
# meanwhile waited for it: the last second of a failover.
POLL_S = 0.05

_sinks: dict[str, "RecordSink"] = {}  # topic name -> the sink of the agent that reads it


def _bytes_of(records: list) -> int:
    return sum(len(r.value or b"") + len(r.key or b"") for r in records)


class RecordSink:
    """Fetched record lists of one agent's topics, bounded by a record count and by their bytes.

    A full sink holds up the fetcher (backpressure reaches the broker, not memory): a burst of large
    records is held back as a burst of many small ones is. A single fetch larger than the byte bound
    is still taken when the sink is empty, or nothing would ever move.
    """

    def __init__(self, capacity: int, capacity_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.chunks: deque = deque()  # (topic-partition, records in offset order, their bytes)
        self.size = 0
        self.bytes = 0
        # Records the consumer delivered that never reached the agent, per partition: (first, last)
        # offset. The consumer's position is past them, so unless they are fetched again nothing
        # brings them back, least of all on a partition where nothing more arrives.
        self.dropped: dict = {}
        self._filled = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._cleared = asyncio.Event()

    def clear(self) -> None:
        """Called by Faust's flow control when flow stops and when it resumes.

        Faust seeks the partitions it keeps to their committed offsets before it resumes, but a fetch
        answered before that seek can still be put here after it, and then be cleared: the drop is
        noted, and the agent fetches those records again (`OffsetGuard.refetch`)."""
        for tp, records, _ in self.chunks:
            self.drop(tp, records)
        self.chunks.clear()
        self.size = self.bytes = 0
        self._room.set()
        self._cleared.set()

    def drop(self, tp, records: list) -> None:
        """Note fetched records of `tp` that will not be handed to the agent."""
        first, last = self.dropped.get(tp, (records[0].offset, records[-1].offset))
        self.dropped[tp] = (min(first, records[0].offset), max(last, records[-1].offset))
        self._filled.set()  # wakes the agent, so that it fetches them again

    def take_dropped(self) -> dict:
        dropped, self.dropped = self.dropped, {}
        return dropped

    async def wait(self, timeout: float) -> None:
        """Until records are there, the sink is cleared (a rebalance or a stop) or was cleared since
        records were last taken, or `timeout` seconds passed."""
        if self.chunks or self.dropped or self._cleared.is_set():
            return
        self._filled.clear()
        waits = [asyncio.ensure_future(self._filled.wait()), asyncio.ensure_future(self._cleared.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def full(self) -> bool:
        return self.size >= self.capacity or self.bytes >= self.capacity_bytes

    async def put(self, consumer, tp, records: list) -> None:
        while self.full():
            self._room.clear()
            await self._room.wait()
            if not consumer.flow_active:  # a rebalance
                self.drop(tp, records)
                return
        size = _bytes_of(records)
        self.chunks.append((tp, records, size))
        self.size += len(records)
        self.bytes += size
        self._filled.set()

    async def take(self, max_n: int, timeout: float | None = None) -> list[tuple]:
        """Wait for records, then take what is there, up to `max_n`, as (tp, records) chunks.

        Returns early, maybe with nothing, when records were dropped (`take_dropped`) or after
        `timeout` seconds."""
        if not self.chunks and not self.dropped:
            self._filled.clear()
            try:
                await asyncio.wait_for(self._filled.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if not self.chunks:
            return []
        self._cleared.clear()
        out, n = [], 0
        while self.chunks and n < max_n:
            tp, records, size = self.chunks.popleft()
            if len(records) > max_n - n:
                rest = records[max_n - n:]
                rest_size = _bytes_of(rest)
                self.chunks.appendleft((tp, rest, rest_size))
                records, size = records[:max_n - n], size - rest_size
            out.append((tp, records))
            n += len(records)
            self.bytes -= size
        self.size -= n
        if not self.full():
            self._room.set()
        return out


def sink_for(app, topic, capacity: int, capacity_bytes: int = 64 << 20) -> RecordSink:
    """Route the records of `topic` (a Faust topic, maybe of several names) into a new sink.

    Call it when the agent is declared: a record of an intake topic that reached Faust's path
    would be tracked and never acked, and hold up every commit and rebalance.
    """
    sink = RecordSink(capacity, capacity_bytes)
    for name in topic.topics:
        _sinks[name] = sink
    app.flow_control.manage_queue(sink)
    return sink


async def _wait_next_records_into_sinks(self, timeout: float):
    """Faust's `Consumer._wait_next_records`, waiting at most POLL_S, with the intake topics'
    records put into their sinks."""
    if not self.flow_active:
        await self.wait(self.can_resume_flow)
    # Faust's own set, which it updates in place: a partition paused while the fetch is under way
    # is seen below
    active = None if self.app.client_only else self._get_active_partitions()
    if active is not None and not active:
        await self.sleep(POLL_S)
        return {}, active
    records = await self._getmany(active_partitions=active, timeout=min(timeout, POLL_S))
    if records:
        for tp in [tp for tp in records if tp.topic in _sinks]:
            fetched = records.pop(tp)
            if not fetched:
                continue
            if self.flow_active and (active is None or tp in active):
                self._read_offset[tp] = fetched[-1].offset  # as Faust's delivery does per record
                await _sinks[tp.topic].put(self, tp, fetched)
            else:  # a rebalance, or a partition paused for its recovery: fetched again later
                _sinks[tp.topic].drop(tp, fetched)
    return records, active


def install() -> None:
    """Take the intake topics' records out of each fetch (`Consumer.getmany` delivers the rest), and
    look at the active partitions again every POLL_S."""
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

    def split(self, pieces: list[list[tuple]]) -> list["Batch"]:
        """This batch as several, each of some of its spans, to be handled and acked one by one."""
        parts = [Batch(self.consumer, self.generation, spans) for spans in pieces]
        with ack_lock:
            self.acked = True
            self.consumer._unacked_messages.discard(self)
        return parts

    def ack(self, owned=None) -> None:
        """`Consumer.ack` for every record, in one step; with `owned(tp)`, only for the partitions it
        owns: the records of the others are let go unacked (this worker lost them, their new owner
        commits them, and an ack here could commit an older offset over its own)."""
        c = self.consumer
        acks_enabled_for = c.app.topics.acks_enabled_for
        with ack_lock:
            if self.acked:
                return
            self.acked = True
            for tp, records in self.spans:
                if not acks_enabled_for(tp.topic) or owned is not None and not owned(tp):
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
    """Next expected offset per partition; skips records seen before, fetches again what went missing.

    Gaps in offsets are normal in Kafka: transaction control markers (a transactional producer's
    partitions always have them; aiokafka skips them), compaction, and a log start that retention
    moved past the committed offset. Such a gap is not a hole: before rewinding, the guard asks the
    log itself (`LogProbe`) where its next record is. Where the log has none before the record that
    came, the gap is real: the partition moves on, and the gap is entered in Faust's books, whose
    commit otherwise stops at the first offset it never saw acked. Where the log has records there,
    they went missing in the consumer and are fetched again. For a partition whose committed offset
    Faust does not know (never committed, or not in Faust's books yet), the group's committed offset
    is asked of the broker, and where there is none the partition is expected from the start of its
    log: a hole at its very start is noticed too (Faust would commit past it). Unless the consumer
    starts such a partition at its end (AUTO_OFFSET_RESET=latest): then whatever comes first is the start.

    A hole shows only when a later record arrives; records the intake dropped at the end of what a
    partition has (`RecordSink.drop`) have none after them. So the guard keeps, per partition, the
    last offset known to exist beyond what it admitted (`missing`), and `refetch` seeks back, every
    RESEEK_S, until the records up to it have been admitted.
    """

    def __init__(self, consumer, probe: LogProbe | None = None, reset: str = "earliest") -> None:
        self.consumer = consumer
        self.probe = probe
        self.reset = reset  # where the consumer starts a partition the group never committed
        self.generation = None
        self.expected: dict = {}
        self.unknown: set = set()  # assigned, with no committed offset in Faust's books
        self.missing: dict = {}  # partition -> last offset known to exist that was not admitted yet
        self.sought: dict = {}  # partition -> (when it was last sought back, the offset it was sought to)

    def on_generation(self, generation, assigned=()) -> None:
        if generation != self.generation:
            # after a rebalance Faust has sought every partition to its committed offset
            self.generation = generation
            self.expected = {tp: o for tp, o in self.consumer._committed_offset.items() if o is not None}
            self.unknown = {tp for tp in assigned if tp not in self.expected}
            self.missing.clear()
            self.sought.clear()

    def dropped(self, tp, first: int, last: int) -> None:
        """Records `first`..`last` of `tp` were delivered by the consumer but never admitted."""
        if self.reset == "latest" and tp in self.unknown and tp not in self.expected:
            self.expected[tp] = first  # the consumer started here: the partition's start, for the guard
        self.missing[tp] = max(self.missing.get(tp, -1), last)

    def pending(self) -> bool:
        return bool(self.missing)

    async def refetch(self, assigned) -> None:
        """Seek back every assigned partition whose missing records have not come again, unless
        it moved on since it was last sought back (they are on their way)."""
        for tp, last in list(self.missing.items()):
            if tp not in assigned:
                del self.missing[tp]
                continue
            if tp in self.unknown and self.probe is not None and not await self._learn(tp):
                continue
            expected = self.expected.get(tp)
            if expected is None or expected > last:
                del self.missing[tp]
                continue
            sought = self.sought.get(tp)
            if sought is not None and sought[1] != expected:
                self.sought[tp] = (time.monotonic(), expected)
                continue
            await self._rewind(tp, expected, last + 1)

    async def _learn(self, tp) -> bool:
        try:
            start = await self.probe.committed(tp)
            if start is None:
                if self.reset == "latest":  # started at the log's end: what comes first is the start
                    self.unknown.discard(tp)  # (or what `dropped` saw first)
                    return True
                start = await self.probe.first_offset(tp, 0)
        except Exception as exc:
            log.warning("could not read where %s starts: %r", tp, exc)
            return False
        if start is None:
            return False
        self.unknown.discard(tp)
        self.expected[tp] = start
        return True

    async def admit(self, tp, records: list) -> list:
        """The records of `records` (one partition, offset order) to process now."""
        if tp in self.unknown and self.probe is not None and not await self._learn(tp):
            # nothing to check them against: not admitted, fetched again once the broker answers
            self.missing[tp] = max(self.missing.get(tp, -1), records[-1].offset)
            await self._rewind(tp, records[0].offset, records[-1].offset + 1)
            return []
        expected = self.expected.get(tp)
        if expected is not None:
            if records[0].offset < expected:
                records = [r for r in records if r.offset >= expected]
                if not records:
                    return records
            if records[0].offset > expected and not await self._gap(tp, expected, records[0].offset, records[-1].offset):
                return []
        if records[-1].offset - records[0].offset + 1 != len(records):  # a hole inside the fetch
            run = 1
            while records[run].offset == records[run - 1].offset + 1:
                run += 1
            if not await self._gap(tp, records[run - 1].offset + 1, records[run].offset, records[-1].offset):
                records = records[:run]
        self.expected[tp] = next_expected = records[-1].offset + 1
        if self.missing.get(tp, -1) < next_expected:  # nothing known to be missing (any more)
            self.missing.pop(tp, None)
            self.sought.pop(tp, None)
        return records

    async def _gap(self, tp, expected: int, found: int, last: int) -> bool:
        """True if the log has no record in expected..found-1 (the fetch lost nothing); else rewind."""
        if self.probe is not None:
            try:
                first = await self.probe.first_offset(tp, expected)
            except Exception as exc:
                log.warning("could not read %s from %s to check a gap: %r", tp, expected, exc)
                first = None
            if first is not None and first >= found:
                log.info("offsets %s..%s of %s are not in the log (transaction markers, compaction or "
                         "retention); moving on", expected, found - 1, tp)
                # Faust commits the highest offset up to which every one was acked: it must know
                # that these never will be
                await self.consumer._add_gap(tp, expected, found - 1)
                return True
        self.missing[tp] = max(self.missing.get(tp, -1), last)
        await self._rewind(tp, expected, found)
        return False

    async def _rewind(self, tp, expected: int, found: int) -> None:
        # Seek again if the last seek did not bring the records back within RESEEK_S: Faust
        # swallows a seek that fails mid-rebalance, and a partition must never stay stuck.
        now = time.monotonic()
        if now - self.sought.get(tp, (0.0, None))[0] <= RESEEK_S:
            return
        self.sought[tp] = (now, expected)
        log.warning("records %s..%s of %s went missing in the consumer; fetching them again",
                    expected, found - 1, tp)
        try:
            # On the consumer's own thread: Faust's `seek` changes aiokafka's fetcher from the
            # caller's thread, racing the fetch under way there (seen: KeyError in
            # `Fetcher.fetched_records`, the Fetcher service crashed and the worker stopped).
            await self.consumer.seek_wait({tp: expected})
        except Exception as exc:  # not assigned any more: the next owner reads them
            log.warning("seek of %s to %s failed: %r", tp, expected, exc)


def bootstrap_of(app) -> str:
    return ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)


async def batches(stream, sink: RecordSink, max_n: int, writer=None) -> AsyncIterator[Batch]:
    """The agent's loop: batches of up to `max_n` records, with no fixed wait.

    It blocks for the first records, then takes whatever else is already fetched: at low load a
    batch is one event; under load batches grow by themselves while the last one is processed.

    `writer` (the agent's `StateWriter`) writes state behind: whenever the sink is empty and
    `writer.write_due()` says something is unwritten, the loop waits for more records only until the
    write is due, or until a rebalance clears the sink, and then awaits `writer.flush()`. The writes
    to the local stores stay in the agent's one task, never beside a batch; only their changelog
    records are sent, and their delivery awaited, in a task of their own.
    """
    app = stream.app
    consumer = app.consumer
    inbound = app.monitor.stream_inbound_time  # Faust's stall check reads when a partition last moved
    guard = OffsetGuard(consumer, LogProbe(bootstrap_of(app), app.conf.id), app.conf.consumer_auto_offset_reset)
    stream.channel.__aiter__()  # subscribes the topics with the conductor, as `async for` would
    while True:
        if writer is not None and not sink.chunks:
            due = writer.write_due()
            if due is not None:
                if due > 0:
                    await sink.wait(due)
                if not sink.chunks:
                    await writer.flush()
        chunks = await sink.take(max_n, timeout=RESEEK_S if guard.pending() else None)
        await app.flow_control.acquire()  # returns at once unless a rebalance/recovery is under way
        generation = app.consumer_generation_id
        assigned = consumer.assignment()
        guard.on_generation(generation, [tp for tp in assigned if tp.topic in stream.channel.topics])
        for tp, (first, last) in sink.take_dropped().items():
            guard.dropped(tp, first, last)
        spans = []
        for tp, records in chunks:
            if tp in assigned:
                records = await guard.admit(tp, records)
                if records:
                    spans.append((tp, records))
        await guard.refetch(assigned)
        if spans:
            now = time.monotonic()
            for tp, _ in spans:
                inbound[tp] = now
            yield Batch(consumer, generation, spans)
