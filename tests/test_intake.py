"""Unit tests of app/kafka/intake.py: the sink's bounds, the offset guard, and a batch's ack in Faust's books.

The integration tests (cart, fraud, failure semantics, scale-out) run the intake inside real workers;
these pin down its edge cases without a broker.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict, namedtuple
from weakref import WeakSet

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree

from app.kafka import intake
from app.kafka.intake import Batch, OffsetGuard, RecordSink

Rec = namedtuple("Rec", "offset key value", defaults=(None, b"x"))
A, B = TP("events", 0), TP("events", 1)


def recs(first: int, last: int) -> list:
    return [Rec(o) for o in range(first, last + 1)]


class FakeConsumer:
    """The parts of Faust's Consumer that the intake reads and writes; its commit arithmetic
    (`_new_offset`, `_add_gap`) is Faust's own."""

    _new_offset = FaustConsumer._new_offset
    _add_gap = FaustConsumer._add_gap

    def __init__(self, committed: dict | None = None, assigned=()) -> None:
        self.flow_active = True
        self._committed_offset = defaultdict(lambda: None, committed or {})
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._n_acked = 0
        self._unacked_messages = WeakSet()
        self._waiting_for_ack = None
        self._read_offset = {}
        self.app = type("App", (), {"topics": type("Topics", (), {"acks_enabled_for": staticmethod(lambda t: True)})()})()
        self.assigned = set(assigned)
        self.seeks: list = []

    def assignment(self) -> set:
        return self.assigned

    async def seek_wait(self, partitions: dict) -> None:
        """The seek on the consumer's thread (its `seek` runs on the caller's and races the fetcher)."""
        self.seeks += list(partitions.items())

    def commit_offset(self, tp) -> int | None:
        """What Faust would commit for `tp` now (and books as committed)."""
        offset = self._new_offset(tp)
        if offset is not None:
            self._committed_offset[tp] = offset
        return self._committed_offset[tp]


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_sink_takes_what_is_there_up_to_max_and_splits_a_long_chunk():
    async def main():
        sink, consumer = RecordSink(capacity=100), FakeConsumer()
        await sink.put(consumer, A, recs(0, 6))
        await sink.put(consumer, B, recs(0, 2))
        first = await sink.take(5)
        assert [(tp, [r.offset for r in rs]) for tp, rs in first] == [(A, [0, 1, 2, 3, 4])]
        rest = await sink.take(5)
        assert [(tp, [r.offset for r in rs]) for tp, rs in rest] == [(A, [5, 6]), (B, [0, 1, 2])]
        assert sink.size == 0
    run(main())


async def full_sink_and_a_blocked_put():
    sink, consumer = RecordSink(capacity=3), FakeConsumer()
    await sink.put(consumer, A, recs(0, 2))
    blocked = asyncio.ensure_future(sink.put(consumer, A, recs(3, 4)))
    await asyncio.sleep(0.01)
    assert not blocked.done(), "a full sink blocks the put"
    return sink, consumer, blocked


def test_a_full_sink_holds_the_fetcher_until_there_is_room():
    async def main():
        sink, consumer, blocked = await full_sink_and_a_blocked_put()
        await sink.take(10)
        await asyncio.wait_for(blocked, 1)
        assert [r.offset for _, rs in await sink.take(10) for r in rs] == [3, 4]
    run(main())


def test_a_rebalance_clears_the_sink_and_drops_a_blocked_put():
    async def main():
        sink, consumer, blocked = await full_sink_and_a_blocked_put()
        consumer.flow_active = False  # Faust: stop_flow, then flow_control.clear() clears the sink
        sink.clear()
        await asyncio.wait_for(blocked, 1)
        assert sink.size == 0 and not sink.chunks, "records fetched before the rebalance are not kept"
    run(main())


def test_waiting_for_records_ends_when_they_come_when_the_sink_is_cleared_or_at_the_timeout():
    """The agent waits this way while state is written behind (app/pipeline/writer.py: write_due)."""
    async def main():
        loop = asyncio.get_running_loop()
        sink, consumer = RecordSink(capacity=100), FakeConsumer()
        t0 = loop.time()
        await sink.wait(0.05)
        assert loop.time() - t0 >= 0.05 and not sink.chunks, "nothing came: the timeout"
        loop.call_later(0.01, lambda: asyncio.ensure_future(sink.put(consumer, A, recs(0, 1))))
        await asyncio.wait_for(sink.wait(10), 1)
        assert sink.chunks, "records came"
        await sink.wait(10)  # already there: at once
        await sink.take(10)
        loop.call_later(0.01, sink.clear)
        await asyncio.wait_for(sink.wait(10), 1)  # a rebalance: at once, so the state gets written
        assert not sink.chunks
        await asyncio.wait_for(sink.wait(10), 1)  # and until records are taken again
        await sink.put(consumer, A, recs(2, 2))
        await sink.take(10)
        t0 = loop.time()
        await sink.wait(0.05)
        assert loop.time() - t0 >= 0.05
    run(main())


def test_guard_skips_records_seen_before_and_rewinds_over_a_hole():
    async def main():
        consumer = FakeConsumer({A: 10})
        guard = OffsetGuard(consumer)
        guard.on_generation(1)
        assert [r.offset for r in await guard.admit(A, recs(8, 12))] == [10, 11, 12], "below committed: done"
        assert await guard.admit(A, recs(15, 16)) == [], "13..14 missing: nothing past the hole"
        assert consumer.seeks == [(A, 13)]
        assert await guard.admit(A, recs(15, 16)) == [] and consumer.seeks == [(A, 13)], "one seek per RESEEK_S"
        assert [r.offset for r in await guard.admit(A, recs(13, 16))] == [13, 14, 15, 16]
        # a hole inside one fetched list: the run before it is admitted, the rest fetched again
        got = await guard.admit(A, [Rec(17), Rec(18), Rec(20)])
        assert [r.offset for r in got] == [17, 18] and consumer.seeks[-1] == (A, 19)
        # a new generation starts again from the committed offsets
        consumer._committed_offset[A] = 5
        guard.on_generation(2)
        assert [r.offset for r in await guard.admit(A, recs(5, 6))] == [5, 6]
    run(main())


class FakeProbe:
    """The log's own answer: where its next record at or after an offset is; the group's committed offsets."""

    def __init__(self, log_offsets: list[int], committed: dict | None = None) -> None:
        self.log_offsets = log_offsets
        self.committed_offsets = committed or {}

    async def committed(self, tp):
        return self.committed_offsets.get(tp)

    async def first_offset(self, tp, offset: int):
        return next((o for o in self.log_offsets if o >= offset), None)


def test_gaps_that_the_log_itself_has_are_passed_and_only_real_holes_rewound():
    """Issue 14, 3: transaction markers (aiokafka skips them), compaction and retention leave gaps
    the guard used to rewind over forever; the partition never moved."""
    async def main():
        consumer = FakeConsumer({A: 10})
        # 12 and 13 are transaction markers; 20..29 were compacted away; the log has the rest
        guard = OffsetGuard(consumer, FakeProbe([10, 11, 14, 15, 16, 17, 18, 19, 30, 31, 32]))
        guard.on_generation(1, [A])
        assert [r.offset for r in await guard.admit(A, [Rec(10), Rec(11), Rec(14), Rec(15)])] == [10, 11, 14, 15]
        assert [r.offset for r in await guard.admit(A, recs(16, 19))] == [16, 17, 18, 19]
        assert [r.offset for r in await guard.admit(A, recs(30, 31))] == [30, 31] and consumer.seeks == []
        # records the consumer dropped are still in the log: fetched again
        guard.probe.log_offsets += [33, 34, 35]
        assert await guard.admit(A, recs(34, 35)) == [] and consumer.seeks == [(A, 32)]
    run(main())


def test_a_partition_never_committed_is_expected_from_the_start_of_its_log():
    """Issue 14: with no committed offset the guard expected nothing, so a hole at the partition's
    start was admitted, and Faust commits the first run of acked offsets whatever lies before it."""
    async def main():
        guard = OffsetGuard(FakeConsumer({}), FakeProbe(list(range(0, 100))))
        guard.on_generation(1, [B])
        assert await guard.admit(B, recs(40, 45)) == [] and guard.consumer.seeks == [(B, 0)], "0..39 went missing"
        retention = OffsetGuard(FakeConsumer({}), FakeProbe(list(range(40, 100))))
        retention.on_generation(1, [B])
        assert [r.offset for r in await retention.admit(B, recs(40, 41))] == [40, 41], "the log starts at 40"
        # committed, but not in Faust's books yet: the group's offset from the broker, not the log start
        known = OffsetGuard(FakeConsumer({}), FakeProbe(list(range(0, 100)), {B: 93}))
        known.on_generation(1, [B])
        assert [r.offset for r in await known.admit(B, recs(93, 95))] == [93, 94, 95]
        assert known.consumer.seeks == []
    run(main())


def test_a_partition_never_committed_starts_where_the_consumer_does_when_that_is_the_end():
    """With AUTO_OFFSET_RESET=latest the consumer starts a never-committed partition at its end;
    the guard rewound it to the log's start (the policy was ignored, the backlog scored)."""
    async def main():
        guard = OffsetGuard(FakeConsumer({}), FakeProbe(list(range(0, 100))), reset="latest")
        guard.on_generation(1, [B])
        assert [r.offset for r in await guard.admit(B, recs(100, 102))] == [100, 101, 102]
        assert guard.consumer.seeks == []
        assert await guard.admit(B, recs(104, 105)) == [] and guard.consumer.seeks == [(B, 103)], \
            "after the start, a hole is a hole"
        # records the intake dropped before the first admit (a rebalance cleared them): fetched again
        dropped = OffsetGuard(FakeConsumer({}), FakeProbe(list(range(0, 100))), reset="latest")
        dropped.on_generation(1, [B])
        dropped.dropped(B, 100, 104)
        await dropped.refetch([B])
        assert dropped.consumer.seeks == [(B, 100)], "before: forgotten, and Faust committed past them"
    run(main())


def test_batch_is_unacked_until_acked_then_every_offset_is_in_fausts_books():
    consumer = FakeConsumer({A: 3})
    batch = Batch(consumer, 1, [(A, recs(1, 5)), (B, recs(0, 1))])
    assert [r.offset for r in batch.records] == [1, 2, 3, 4, 5, 0, 1]
    assert batch in consumer._unacked_messages, "a rebalance waits for the batch in flight"
    batch.ack()
    batch.ack()  # idempotent
    assert batch not in consumer._unacked_messages and batch.acked
    assert sorted(consumer._acked[A]) == [3, 4, 5], "offsets below the committed one are not acked again"
    assert sorted(consumer._acked[B]) == [0, 1]
    assert consumer._n_acked == 5


def test_a_gap_the_log_has_is_committed_past():
    """Issue 14, 3: the guard passed the gap, but Faust's commit stops at the first offset it never
    saw acked (`Consumer._new_offset`), so the partition's commit stayed before the markers forever."""
    async def main():
        consumer = FakeConsumer({A: 10})
        guard = OffsetGuard(consumer, FakeProbe([10, 11, 14, 15, 16]))  # 12, 13: transaction markers
        guard.on_generation(1, [A])
        Batch(consumer, 1, [(A, await guard.admit(A, recs(10, 11)))]).ack()
        assert consumer.commit_offset(A) == 12
        Batch(consumer, 1, [(A, await guard.admit(A, recs(14, 16)))]).ack()
        assert consumer.commit_offset(A) == 17, "committed past the markers"
    run(main())


def test_a_broker_that_cannot_say_where_a_partition_starts_admits_nothing_unchecked():
    """With no expected offset a hole at the start would be admitted and Faust would commit past it
    (it does not check a gap before the first acked offset when nothing was committed)."""
    class Unreachable(FakeProbe):
        async def committed(self, tp):
            raise ConnectionError("broker away")

    async def main():
        probe = Unreachable(list(range(0, 100)))
        guard = OffsetGuard(FakeConsumer({}), probe)
        guard.on_generation(1, [B])
        assert await guard.admit(B, recs(40, 45)) == [] and guard.consumer.seeks == [(B, 40)]
        probe.committed = FakeProbe.committed.__get__(probe)  # the broker is back: 0..39 were never read
        guard.sought.clear()
        assert await guard.admit(B, recs(40, 45)) == [] and guard.consumer.seeks[-1] == (B, 0)
    run(main())


class FakeApp:
    """What `intake.batches` reads of the Faust app."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.consumer_generation_id = 1
        self.monitor = type("Monitor", (), {"stream_inbound_time": {}})()
        self.conf = type("Conf", (), {"id": "test", "broker": [], "consumer_auto_offset_reset": "earliest"})()
        self.flow_control = type("Flow", (), {"acquire": staticmethod(lambda: asyncio.sleep(0))})()


class FakeStream:
    def __init__(self, app, topics) -> None:
        self.app = app
        self.channel = type("Channel", (), {"topics": set(topics), "__aiter__": lambda self: self})()


def test_records_cleared_at_the_end_of_a_partition_are_fetched_again():
    """Issue 14: the loss seen in the soak. Faust seeks to the committed offsets and then resumes the
    flow, which clears the intake; a fetch answered before the seek but put into the intake after
    it was cleared with it. The consumer's position was past those records and nothing came after
    them, so the partition stayed behind (committed 86 of 218) and its state without them."""
    async def main():
        consumer = FakeConsumer({A: 86}, assigned=[A])
        sink = RecordSink(capacity=1000)
        loop = intake.batches(FakeStream(FakeApp(consumer), ["events"]), sink, 100)
        await sink.put(consumer, A, recs(86, 217))
        sink.clear()  # Faust's flow_control.resume()
        taking = asyncio.ensure_future(loop.__anext__())
        for _ in range(100):
            if consumer.seeks:
                break
            await asyncio.sleep(0.01)
        assert consumer.seeks == [(A, 86)], "sought back to the first record it never handled"
        await sink.put(consumer, A, recs(86, 217))  # fetched again
        batch = await asyncio.wait_for(taking, 1)
        assert [r.offset for r in batch.records] == list(range(86, 186))
        batch.ack()
        assert consumer.commit_offset(A) == 186
        await loop.aclose()
    run(main())


def test_records_cleared_while_others_of_the_partition_wait_are_not_admitted_twice():
    async def main():
        consumer = FakeConsumer({A: 0, B: 0}, assigned=[A, B])
        sink = RecordSink(capacity=1000)
        loop = intake.batches(FakeStream(FakeApp(consumer), ["events"]), sink, 1000)
        take = lambda: asyncio.wait_for(loop.__anext__(), 1)  # noqa: E731
        await sink.put(consumer, A, recs(0, 9))
        batch = await take()
        assert [r.offset for r in batch.records] == list(range(0, 10))
        await sink.put(consumer, A, recs(10, 19))
        sink.clear()
        await sink.put(consumer, B, recs(0, 4))
        batch = await take()
        assert [(tp, r.offset) for tp, rs in batch.spans for r in rs] == [(B, o) for o in range(5)]
        assert consumer.seeks == [(A, 10)]
        await sink.put(consumer, A, recs(5, 19))  # from before the seek: the ones seen are skipped
        batch = await take()
        assert [r.offset for r in batch.records] == list(range(10, 20))
        await loop.aclose()
    run(main())


class FetchingConsumer:
    """The parts of Faust's Consumer that its fetch loop reads (the active-partition bookkeeping is
    Faust's own): the flow suspended until the loop waits for it, `paused` of A and B paused."""

    _get_active_partitions = FaustConsumer._get_active_partitions
    _set_active_tps = FaustConsumer._set_active_tps

    def __init__(self, paused=()) -> None:
        self.flow_active = False
        self.can_resume_flow = asyncio.Event()
        self.app = type("App", (), {"client_only": False})()
        self._active_partitions = None
        self._paused_partitions = set(paused)
        self.not_waiting_next_records = asyncio.Event()  # Faust's loop sets it
        self.slept: list = []
        self.waited: list = []

    def assignment(self) -> set:
        return {A, B}

    async def wait(self, event) -> None:  # the end of a recovery: the flow resumes, partitions later
        self.flow_active = True

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def _getmany(self, active_partitions, timeout):
        assert not active_partitions & self._paused_partitions, "paused partitions fetched"
        self.waited.append(timeout)
        return {}


def test_the_fetch_loop_looks_at_the_active_partitions_again_soon():
    """Faust's loop waited up to a second: asleep when, the flow resumed, it found every partition
    still paused (a recovery resumes them a moment later), or for records of the partitions active
    when its wait began. The partitions resumed meanwhile waited for it: the last second of every
    failover (make bench-failover: first score 1.0 s after ready, now 0.07-0.20 s)."""
    paused = FetchingConsumer(paused=[A, B])
    records, active = run(intake._wait_next_records_into_sinks(paused, 1.0))
    assert paused.flow_active and not records and not active and not paused.waited
    assert paused.slept and max(paused.slept) <= 0.1, "Faust slept a whole second"

    some = FetchingConsumer(paused=[A])  # B active, A resumed soon
    records, active = run(intake._wait_next_records_into_sinks(some, 1.0))
    assert active == {B} and some.waited and max(some.waited) <= 0.1, "Faust waited a whole second"
