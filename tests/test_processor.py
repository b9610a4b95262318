"""The processor with its real table (RocksDB in a temporary directory) and a producer that
acknowledges every record batch at once (app/dev/inprocess.py): state written behind
for several batches, acks only after that write, replays recognised and rewritten.

The integration tests run the same code in real workers against the broker; these pin down the
order of writes and acks, which a worker only shows through timing.
"""
from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.dev.inprocess import AckingProducer, ConsumerRecord, FakeBatch, build
from tests.flows import FLOWS

T0 = 1_700_000_000_000


@pytest.fixture
def harness(tmp_path):
    """(processor, its acknowledging producer, its table) of the cart pipeline of a fresh worker."""
    def make(flush_events: int, flush_ms: float):
        service = build(tmp_path, state_flush_events=flush_events, state_flush_ms=flush_ms)
        cart = service.pipelines["cart"]
        return cart.processor, service.producer.client(), cart.table

    return make


def cart_records(events: list[dict], first_offset: int = 0) -> list[ConsumerRecord]:
    """Each user's events on the user's partition (keyed as a shop would), offsets from `first_offset`."""
    from app.kafka.partitioner import key_hash

    out, offsets = [], {}
    for e in events:
        key = e["user_id"].encode()
        p = key_hash(key) % 4
        offset = offsets.setdefault(p, first_offset)
        offsets[p] = offset + 1
        out.append(ConsumerRecord("cart_events", p, offset, key, orjson.dumps(e), []))
    return out


def event(i: int, user: str, kind: str = "product_view") -> dict:
    return {"event_id": f"e{i}", "user_id": user, "ts": T0 + i * 1000, "type": kind, "product_id": "p1",
            "category": "books", "price": 10.0, "quantity": 1}


def changelog_records(producer: AckingProducer) -> int:
    return sum(n for (topic, _), n in producer.offsets.items() if topic.endswith("user_sessions-changelog"))


def outputs(producer: AckingProducer) -> int:
    return sum(n for (topic, _), n in producer.offsets.items() if topic == "personalization_scores")


def test_state_is_written_once_per_key_for_several_batches_and_acked_after_the_write(harness):
    processor, producer, table = harness(flush_events=1000, flush_ms=60_000)
    events = [event(0, "u1"), event(1, "u2"), event(2, "u1", "add_to_cart"), event(3, "u1")]
    records = cart_records(events)
    first, second = FakeBatch(records[:2], 1), FakeBatch(records[2:], 1)

    async def run():
        await processor.handle(first)
        await processor.handle(second)
        assert outputs(producer) == 4, "outputs never wait for the state"
        assert changelog_records(producer) == 0 and not first.acked and not second.acked
        assert table.read("u1") is None, "nothing written yet"
        await processor.writer.flush()
        await processor.writer.drain()

    asyncio.run(run())
    assert first.acked and second.acked
    assert changelog_records(producer) == 2, "u1, touched by both batches, is written once"
    expected = FLOWS["cart"].offline_states(events)
    assert table.read("u1")["state"] == expected["u1"] and table.read("u2")["state"] == expected["u2"]
    assert table.read("u1")["applied"] == {f"cart_events:{records[3].partition}": records[3].offset}


def test_a_batch_reads_the_state_that_earlier_batches_left_unwritten(harness):
    processor, producer, table = harness(flush_events=1000, flush_ms=60_000)
    events = [event(i, "u1", "add_to_cart" if i % 2 else "product_view") for i in range(6)]
    records = cart_records(events)

    async def run():
        for r in records:  # one event per batch
            await processor.handle(FakeBatch([r], 1))
        await processor.writer.drain()

    asyncio.run(run())
    assert table.read("u1")["state"] == FLOWS["cart"].offline_states(events)["u1"]
    assert changelog_records(producer) == 1


def test_the_write_happens_after_enough_events_and_before_another_generation(harness):
    processor, producer, table = harness(flush_events=3, flush_ms=60_000)
    records = cart_records([event(i, f"u{i}") for i in range(5)])
    batches = [FakeBatch(records[:2], 1), FakeBatch(records[2:3], 1), FakeBatch(records[3:4], 1),
               FakeBatch(records[4:], 2)]

    def written() -> list[str]:
        return [f"u{i}" for i in range(5) if table.read(f"u{i}") is not None]

    async def run():
        await processor.handle(batches[0])
        assert written() == []
        await processor.handle(batches[1])  # 3 events waiting: written now, their changelog sent behind
        assert written() == ["u0", "u1", "u2"]
        await processor.handle(batches[2])
        assert written() == ["u0", "u1", "u2"] and not batches[2].acked
        await asyncio.sleep(0)  # the loop's next turn: the write's changelog is sent
        assert changelog_records(producer) == 3
        await processor.handle(batches[3])  # another consumer generation: the first writes what it has
        assert written() == ["u0", "u1", "u2", "u3"] and not batches[3].acked
        await processor.writer.drain()

    asyncio.run(run())
    assert all(b.acked for b in batches) and changelog_records(producer) == 5


def test_replayed_events_change_nothing_and_rewrite_the_state_to_the_changelog(harness):
    processor, producer, table = harness(flush_events=1000, flush_ms=60_000)
    events = [event(0, "u1"), event(1, "u2"), event(2, "u1", "add_to_cart")]
    records = cart_records(events)

    async def run():
        await processor.handle(FakeBatch(records, 1))
        await processor.writer.drain()
        before = {u: table.read(u) for u in ("u1", "u2")}
        written, scored = changelog_records(producer), outputs(producer)
        await processor.handle(FakeBatch(records, 2))  # a replay after a crash, from older offsets
        await processor.writer.drain()
        assert outputs(producer) == scored, "a replayed event is not scored again"
        assert changelog_records(producer) == written + 2, "both keys rewritten"
        assert {u: table.read(u) for u in ("u1", "u2")} == before

    asyncio.run(run())


class StalledChangelog(AckingProducer):
    """Takes a changelog record batch only once `go` is set: a broker slow to answer the batch
    before it on the same partition (aiokafka keeps one request per partition in flight)."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.go = asyncio.Event()

    async def send_batch(self, batch, topic, partition):
        if topic.endswith("-changelog"):
            await self.go.wait()
        return await super().send_batch(batch, topic, partition)


def test_the_next_batches_are_scored_while_a_write_s_changelog_waits_for_the_broker(tmp_path):
    """A write's changelog records are sent behind it: at a million users they fill two record
    batches per partition, and the second waits for the broker's answer to the first. The batches
    of the write are acked only once its changelog is delivered, and the next write waits for that
    (else a rewrite of a failed delivery could overtake a newer value)."""
    producer = StalledChangelog(4)
    service = build(tmp_path, producer, state_flush_events=2, state_flush_ms=60_000)
    processor, table = service.pipelines["cart"].processor, service.pipelines["cart"].table
    records = cart_records([event(i, f"u{i}") for i in range(5)])
    written, after, more = FakeBatch(records[:2], 1), FakeBatch(records[2:3], 1), FakeBatch(records[3:], 1)

    async def run():
        await asyncio.wait_for(processor.handle(written), 5)  # the write: its changelog stalls
        await asyncio.wait_for(processor.handle(after), 5)
        assert outputs(producer) == 3, "scored and published while the changelog waits"
        assert not written.acked and changelog_records(producer) == 0
        next_write = asyncio.ensure_future(processor.handle(more))  # 3 events waiting: the next write
        await asyncio.sleep(0.2)
        assert outputs(producer) == 5 and not next_write.done(), "the next write waits"
        assert table.read("u2") is None and table.read("u0") is not None
        producer.go.set()
        await asyncio.wait_for(next_write, 5)
        await processor.writer.drain()

    asyncio.run(run())
    assert written.acked and after.acked and more.acked and changelog_records(producer) == 5
    assert all(table.read(f"u{i}")["state"]["events"] == 1 for i in range(5))


def test_a_write_is_due_state_flush_ms_after_the_first_unwritten_batch_and_reads_see_it_before(harness):
    processor, producer, table = harness(flush_events=1000, flush_ms=200)
    records = cart_records([event(0, "u1"), event(1, "u1")])

    async def run():
        assert processor.writer.write_due() is None, "nothing unwritten"
        await processor.handle(FakeBatch(records[:1], 1))
        assert 0.1 < processor.writer.write_due() <= 0.2
        assert processor.read("u1")["state"]["events"] == 1 and table.read("u1") is None
        await asyncio.sleep(0.1)
        await processor.handle(FakeBatch(records[1:], 1))  # a later batch does not move the deadline
        assert processor.writer.write_due() <= 0.1
        await asyncio.sleep(0.1)
        assert processor.writer.write_due() == 0.0
        await processor.writer.flush()
        assert processor.writer.write_due() is None and table.read("u1")["state"]["events"] == 2
        await processor.writer.drain()

    asyncio.run(run())


def test_a_worker_that_lost_a_partition_does_not_write_its_state_over_the_new_owner(harness):
    """Issue 14: a worker evicted mid-flush (a pause past the session timeout) still wrote its changelog
    after the new owner had taken the partition: no fencing by assignment."""
    from faust.types import TP

    processor, producer, table = harness(flush_events=1000, flush_ms=60_000)
    records = cart_records([event(i, f"u{i}") for i in range(8)])
    kept = records[0].partition
    assert {r.partition for r in records} != {kept}, "users on several partitions"
    processor.writer.assignment = lambda: {TP("cart_events", kept)}
    batch = FakeBatch(records, 1)
    owned_seen = []
    batch.ack = lambda owned=None: owned_seen.append(owned)

    async def run():
        await processor.handle(batch)
        await processor.writer.drain()

    asyncio.run(run())
    written = {f"u{i}" for i in range(8) if table.read(f"u{i}") is not None}
    assert written == {r.key.decode() for r in records if r.partition == kept}
    assert changelog_records(producer) == len(written)
    owned, = owned_seen
    assert owned(TP("cart_events", kept)) and not any(owned(TP("cart_events", r.partition))
                                                       for r in records if r.partition != kept)


def test_a_partition_lost_while_its_changelog_delivery_is_retried_is_neither_rewritten_nor_marked_read(harness):
    """Found by review: the retry of a failed changelog delivery rewrote every key and stored every
    partition's persisted offset, also of a partition that had moved meanwhile: an old value after
    the new owner's, and an offset claiming the new owner's records as read."""
    from aiokafka.errors import KafkaConnectionError
    from faust.types import TP

    processor, producer, table = harness(flush_events=1000, flush_ms=60_000)
    records = cart_records([event(i, f"v{i}") for i in range(8)])
    kept = records[0].partition
    lost = {r.partition for r in records} - {kept}
    assert lost, "users on several partitions"
    held = {TP("cart_events", p) for p in range(4)}
    processor.writer.assignment = lambda: set(held)
    deliver = producer.send_batch
    sent: list = []
    refused: list = []

    async def refuse_once(batch, topic, partition):
        if topic.endswith("changelog"):
            sent.append(partition)
            if partition in lost and not refused:
                refused.append(partition)
                held.difference_update({TP("cart_events", p) for p in lost})  # a rebalance while it is retried
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(KafkaConnectionError("a moment of outage"))
                return fut
        return await deliver(batch, topic, partition)
    producer.send_batch = refuse_once

    async def run():
        await processor.handle(FakeBatch(records, 1))
        await processor.writer.drain()
    asyncio.run(run())
    changelog = table.changelog_topic.get_topic_name()
    assert refused and sent.count(refused[0]) == 1, "the refused partition, lost meanwhile, is not written again"
    for p in lost:
        assert table.data.persisted_offset(TP(changelog, p)) is None, f"partition {p} not marked read"


@pytest.mark.parametrize("bad_every", [0, 7], ids=["all-valid", "with-dead-letters"])
def test_a_handled_batch_leaves_no_cyclic_garbage(harness, bad_every):
    """Refcounting alone frees a batch once handled: an item and its output record referring to each
    other, or a dead letter's traceback holding the frames (and through them the batch), made every
    event cyclic garbage, and the collector cost a quarter of the worker's CPU per event."""
    import gc

    processor, _, _ = harness(flush_events=1, flush_ms=0)
    records = cart_records([event(i, f"u{i % 50}") for i in range(400)])
    if bad_every:
        records = [r._replace(value=b"{not json") if i % bad_every == 0 else r for i, r in enumerate(records)]

    async def handle() -> None:
        for i in range(0, len(records), 100):
            await processor.handle(FakeBatch(records[i:i + 100]))
        await processor.writer.drain()

    asyncio.run(handle())  # warm: first-use caches and imports are not the batch's
    gc.collect()
    records = [r._replace(offset=r.offset + 1000) for r in records]
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(handle())
        gc.collect()
        left = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not left & {"Item", "Record", "traceback", "frame"}, left


def test_a_write_lets_the_written_states_go_before_its_changelog_is_confirmed(harness):
    """The state of every key folded since the last write is what a batch leaves alive; once written,
    it is held only as the bytes a failed changelog delivery is rewritten from. So the collector run
    after a write (app/gc_policy.py) finds it gone instead of scanning it: when the pending
    confirmation held the state dicts, a million users' states were each scanned once, twice the
    collector's time of ten thousand users."""
    import gc

    processor, _, _ = harness(flush_events=1, flush_ms=60_000)
    users = {f"gone{i}" for i in range(20)}
    records = cart_records([event(i, f"gone{i % 20}") for i in range(60)])

    def states_alive() -> set:
        return {o["session_id"].split(":")[0] for o in gc.get_objects()
                if type(o) is dict and type(o.get("session_id")) is str} & users

    async def run():
        await processor.handle(FakeBatch(records))  # written at once (flush_events=1)
        assert processor.writer._confirming is not None and not processor.writer._confirming.done(), \
            "the confirmation is still pending"
        gc.collect()
        alive = states_alive()
        await processor.writer.drain()
        return alive

    assert asyncio.run(run()) == set()


@pytest.fixture
def collections(monkeypatch):
    """The generations the collector collects from here on (a fresh policy, the worker's thresholds)."""
    import gc

    from app import gc_policy

    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    monkeypatch.setattr(gc_policy, "_written", False)
    old = gc.get_threshold()
    gc.set_threshold(*gc_policy.AUTOMATIC)
    gc.collect()
    gc.callbacks.append(record)
    yield seen
    gc.callbacks.remove(record)
    gc.set_threshold(*old)


def test_the_young_generation_is_collected_after_a_state_write_and_otherwise_only_when_large(collections):
    from app import gc_policy

    keep = [[i] for i in range(gc_policy.YOUNG_MAX // 2)]  # many young objects, below the bound
    gc_policy.between_batches()
    assert collections == [], "no write, not past YOUNG_MAX: no collection"
    gc_policy.state_written()
    gc_policy.between_batches()
    assert collections == [0], "after a write: the young generation"
    gc_policy.between_batches()
    assert collections == [0], "once per write"
    keep += [[i] for i in range(gc_policy.YOUNG_MAX + 1)]
    gc_policy.between_batches()
    assert collections == [0, 0], "past YOUNG_MAX without a write"
    del keep


def test_a_garbage_cycle_that_outlived_a_young_collection_is_freed(collections):
    """The young collections between batches keep the automatic collection from coming, and only that
    collected the older generations: a cycle still alive at one young collection (an exception and its
    traceback, a Faust object) was never freed once it became garbage. Now an older generation past
    its threshold is collected after a young collection, as the automatic collection would."""
    import weakref

    from app import gc_policy

    class Node:
        pass

    def cycle():
        node = Node()
        node.me = node
        return node

    def batches(n: int) -> None:
        for _ in range(n):
            gc_policy.state_written()
            gc_policy.between_batches()

    middle, oldest = cycle(), cycle()
    freed_middle, freed_oldest = weakref.ref(middle), weakref.ref(oldest)
    batches(1)  # both alive: out of the young generation
    del middle
    batches(1 + gc_policy.AUTOMATIC[1])  # a middle collection: `oldest`, alive, goes to the oldest
    assert freed_middle() is None and 1 in collections
    del oldest
    batches((gc_policy.AUTOMATIC[1] + 1) * (gc_policy.AUTOMATIC[2] + 1))
    assert freed_oldest() is None and 2 in collections


# Kafka's own test vectors (UtilsTest.testMurmur2), as Java's signed ints.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
                b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}


@pytest.mark.parametrize("key, java", JAVA_MURMUR2.items())
def test_murmur2_is_kafkas(key, java):
    from app.kafka.partitioner import murmur2

    assert murmur2(key) == java & 0xFFFFFFFF


@given(st.binary(max_size=300))
def test_murmur2_equals_aiokafkas_for_any_key(key):
    """Keys of any length, past the precompiled word readers (256 bytes) too: the partition of a
    key must be the one every other Kafka client computes, or its state is read on the wrong worker."""
    from aiokafka.partitioner import murmur2 as reference

    from app.kafka.partitioner import murmur2

    assert murmur2(key) == reference(key)


def _same_length_in_words(words: int):
    """Enough keys of one length in words to be hashed together."""
    from app.kafka.partitioner import TOGETHER_MIN

    return st.lists(st.binary(min_size=4 * words, max_size=4 * words + 3), min_size=TOGETHER_MIN, max_size=40)


@given(group=st.integers(0, 70).flatmap(_same_length_in_words), others=st.lists(st.binary(max_size=300), max_size=40),
       data=st.data())
def test_keys_hashed_together_hash_as_aiokafkas_partitioner_does(group, others, data):
    """A batch's new keys are hashed a word of many keys at a time (keys of one length in words,
    from TOGETHER_MIN of them; numpy's uint32 arithmetic): every key must get aiokafka's hash,
    whatever its tail and whatever else is in the batch, or its records go to another partition."""
    from aiokafka.partitioner import murmur2 as reference

    from app.kafka.partitioner import TOGETHER_MIN, key_hashes

    assert len(group) >= TOGETHER_MIN
    keys = data.draw(st.permutations(group + others))
    assert key_hashes(keys) == [reference(k) & 0x7FFFFFFF for k in keys]


def test_the_tables_read_their_records_from_rocksdbs_files_without_a_block_cache(harness):
    """The table keeps the records it wrote lately itself (`recent`), so what it reads from RocksDB
    is rarely read again soon: caching its blocks made a fresh worker's first reads slower and its
    memory larger by the cache (app/kafka/patches.py, patch 6). Read in a later generation (not from
    `recent`) and out of the memtable, every record comes back whole."""
    processor, _, table = harness(flush_events=1, flush_ms=60_000)
    events = [event(i, f"u{i}", "add_to_cart") for i in range(400)]
    records = cart_records(events)

    async def run():
        await processor.handle(FakeBatch(records, 1))
        await processor.writer.drain()

    asyncio.run(run())
    keys_of: dict[int, list[str]] = {}
    for r in records:
        keys_of.setdefault(r.partition, []).append(r.key.decode())
    dbs = [table.data._db_for_partition(p) for p in keys_of]
    for db in dbs:
        db.flush()  # out of the memtable, into a table file

    read = {key: record for p, keys in keys_of.items() for key, record in zip(keys, table.read_many(p, keys, 2))}

    expected = FLOWS["cart"].offline_states(events)
    assert {key: record["state"] for key, record in read.items()} == expected
    assert [db.property_int_value("rocksdb.block-cache-usage") for db in dbs] == [None] * len(dbs), "no block cache"
