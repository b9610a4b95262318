"""Table recovery in bulk (app/kafka/restore.py, issue 18): a worker with an empty DATA_DIR rebuilds its
tables from the changelog in large fetches and write batches, the newest value per key winning and a
null value deleting, and then scores on that state; a store that has part of the changelog reads
only the rest. Standby copies (app/kafka/standby.py) are written the same way as the changelog grows."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest
import rocksdict
from aiokafka import AIOKafkaProducer
from faust.types import TP

from app.kafka.partitioner import key_hash
from app.kafka.restore import restore
from app.kafka.standby import follow
from app.pipelines import configured
from domain import session
from tests.harness import produce_events, read_json, read_topic
from tests.test_web import get, get_json, wait_until

CHANGELOG = "scoring-user_sessions-changelog"


def record(user: str, events: int, offset_of_event: int) -> bytes:
    state = {**session.new_state(), "session_id": f"{user}:1", "events": events, "last_ts": 1_700_000_000_000}
    return orjson.dumps({"state": state, "applied": {f"cart_events:{key_hash(user.encode()) % 4}": offset_of_event}})


async def write(broker, records: list[tuple[str, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        for user, value in records:
            key = user.encode()
            await producer.send(CHANGELOG, value, key=key, partition=key_hash(key) % 4)
        await producer.flush()
    finally:
        await producer.stop()


def test_a_worker_without_local_state_restores_it_in_bulk_and_scores_on_it(broker, workers):
    users = [f"r{i}" for i in range(300)]
    changelog = [(u, record(u, 1, 0)) for u in users] + [(u, record(u, 7, 5)) for u in users[:100]]
    changelog += [(users[-1], None)]  # deleted
    asyncio.run(write(broker, changelog))
    w = workers("w1", env={"PIPELINES": "cart"})
    assert "restored 401 changelog records of" in w.log()
    assert get_json(w.url, "/state/cart/r0")["state"]["events"] == 7, "the newest value of a key"
    assert get_json(w.url, "/state/cart/r150")["state"]["events"] == 1
    assert get(w.url, f"/state/cart/{users[-1]}")[0] == 404, "a null value deletes"

    cart = configured()["cart"]
    event = {"event_id": "after-restore", "user_id": "r0", "ts": 1_700_000_001_000, "type": "page_view",
             "category": "books", "price": 1.0, "quantity": 1}
    produce_events(broker, cart.source_topic, [event], "user_id")
    out, = read_json(broker, cart.output_topic, 1)
    assert out["features"][cart.feature_names.index("session_events")] == 8.0, "scored on the restored state"


def test_a_restored_record_anyone_wrote_makes_dead_letters_not_a_crash_loop(broker, workers):
    """The changelog can be written by anyone who can write the topic, and every worker restores it.
    Before: the first event of a key whose record was not JSON made the worker exit, after every
    restart again. Now that key's events are dead letters saying why, the other keys are scored, the
    web view says what is wrong, and a mangled dead-letter statistics record is counted anew."""
    asyncio.run(write(broker, [("ok", record("ok", 1, 0)), ("mangled", b"\xff{not json"),
                               ("shapeless", b'{"state": 5, "applied": []}')]))

    async def mangle_statistics() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for p in range(4):
                await producer.send_and_wait("scoring-dead_letter_stats-changelog", b"[1, 2", key=f"p{p}".encode(),
                                             partition=p)
        finally:
            await producer.stop()
    asyncio.run(mangle_statistics())

    async def unstorable() -> None:
        """Before: a record without a key stopped the restore, then Faust's recovery, for good."""
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            partition = key_hash(b"ok") % 4
            await producer.send_and_wait(CHANGELOG, record("ok", 9, 0), key=None, partition=partition)
            await producer.send_and_wait(CHANGELOG, record("ok", 9, 0), key=b"__faust\x00offset__", partition=partition)
        finally:
            await producer.stop()
    asyncio.run(unstorable())
    w = workers("w1", env={"PIPELINES": "cart"})
    cart = configured()["cart"]
    events = [{"event_id": f"h-{u}", "user_id": u, "ts": 1_700_000_001_000, "type": "page_view", "category": "books",
               "price": 1.0, "quantity": 1} for u in ("mangled", "shapeless", "ok")]
    produce_events(broker, cart.source_topic, events, "user_id")

    out, = read_json(broker, cart.output_topic, 1)
    assert out["event_id"] == "h-ok" and out["features"][cart.feature_names.index("session_events")] == 2.0
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= 2)
    reasons = {dict(r.headers)["errors.stage"]: dict(r.headers)["errors.exception"] for r in letters}
    assert len(letters) == 2 and reasons == {b"state": b"CorruptState"}, letters
    status, _, body = get(w.url, "/state/cart/mangled")
    assert status == 500 and b"cannot be read" in body and b"not JSON" in body
    assert w.alive() and "CRITICAL" not in w.log()
    wait_until(lambda: get_json(w.url, "/dead-letters").get("total") == 2, timeout=30,
               what="the dead letters counted, the mangled statistics started anew")
    assert "could not be read; counting anew" in w.log()
    assert "2 changelog records no store can hold" in w.log()


def test_faust_s_own_recovery_skips_what_no_store_can_hold(tmp_path):
    """The bulk restore hands Faust's recovery what is left (after a deadline or a failure): its
    apply_changelog_batch raised on a record without a key, and kept it for the next try."""
    from faust.stores.rocksdb import Store as FaustStore

    from app.kafka import patches
    patches.install(fetch_wait_ms=10)
    store = Store(tmp_path / "db")
    store.use_rocksdict = True
    store.set_persisted_offset = lambda tp, offset: store.db.put(Store.offset_key, str(offset).encode())
    tp = TP(CHANGELOG, 0)
    events = [SimpleNamespace(message=SimpleNamespace(tp=tp, offset=o, partition=0, key=k, value=v))
              for o, (k, v) in enumerate([(b"a", b"1"), (None, b"2"), (Store.offset_key, b"{}"), (b"b", b"3")])]
    FaustStore.apply_changelog_batch(store, events, None, None)
    assert store.db[b"a"] == b"1" and store.db[b"b"] == b"3" and int(store.db[Store.offset_key]) == 3
    store.db.close()


class Store:
    """The parts of Faust's RocksDB store a restore writes: one database per partition, the
    persisted offset beside the values under Faust's key."""

    offset_key = b"__faust\x00offset__"

    def __init__(self, path) -> None:
        self.db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))

    def _db_for_partition(self, partition: int):
        return self.db


def test_a_restore_reads_from_the_persisted_offset_to_the_end_it_was_given(broker, tmp_path):
    users = [f"p{i}" for i in range(40)]
    asyncio.run(write(broker, [(u, record(u, 1, 0)) for u in users]))
    asyncio.run(write(broker, [(u, record(u, 2, 1)) for u in users]))
    partition = key_hash(b"p0") % 4
    tp = TP(CHANGELOG, partition)
    mine = [u for u in users if key_hash(u.encode()) % 4 == partition]  # offsets 0..n-1, then n..2n-1
    store = Store(tmp_path / "db")
    n = len(mine)
    done = asyncio.run(restore(broker.bootstrap, {tp: store}, {tp: n - 1}, {tp: 2 * n - 2}))
    assert done == {tp: 2 * n - 2} and int(store.db[Store.offset_key]) == 2 * n - 2
    states = {u: orjson.loads(store.db[u.encode()])["state"]["events"] for u in mine[:-1]}
    assert set(states) == set(mine[:-1]), "the keys of the second round only"
    assert set(states.values()) == {2}, "the second round, from after the persisted offset"
    assert mine[-1].encode() not in store.db, "nothing past the end it was given"
    store.db.close()


@pytest.mark.parametrize("reader", ["restore", "standby"])
def test_a_rebalance_stops_a_restore_or_a_standby_before_it_writes(broker, tmp_path, reader):
    from app.kafka.restore import Aborted

    asyncio.run(write(broker, [(f"q{i}", record(f"q{i}", 1, 0)) for i in range(20)]))
    tp = TP(CHANGELOG, key_hash(b"q0") % 4)
    store = Store(tmp_path / "db")
    rebalanced = lambda: True  # noqa: E731
    run = (restore(broker.bootstrap, {tp: store}, {tp: -1}, {tp: 3}, should_abort=rebalanced) if reader == "restore"
           else follow(broker.bootstrap, {tp: store}, {tp: -1}, should_abort=rebalanced))
    with pytest.raises(Aborted):
        asyncio.run(asyncio.wait_for(run, 30))
    assert Store.offset_key not in store.db and not list(store.db.keys()), "nothing written"
    store.db.close()


# -- standbys: the same writes, following the changelog as it grows (app/kafka/standby.py) ---------

def test_a_standby_follows_the_changelog_as_it_grows_into_its_store(broker, tmp_path):
    partition = key_hash(b"s0") % 4
    mine = [u for u in (f"s{i}" for i in range(80)) if key_hash(u.encode()) % 4 == partition]
    tp = TP(CHANGELOG, partition)
    store = Store(tmp_path / "db")
    lags: list[dict] = []

    async def scenario():
        await write(broker, [(u, record(u, 1, 0)) for u in mine])
        task = asyncio.ensure_future(follow(broker.bootstrap, {tp: store}, {tp: -1},
                                            on_fetch=lambda written, lag: lags.append(lag)))
        try:
            async def until(offset: int) -> None:
                for _ in range(100):
                    if Store.offset_key in store.db and int(store.db[Store.offset_key]) == offset:
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(f"the persisted offset never reached {offset}")
            await until(len(mine) - 1)
            assert {orjson.loads(store.db[u.encode()])["state"]["events"] for u in mine} == {1}
            # what the owner writes later arrives too: a newer value wins, a null value deletes
            await write(broker, [(mine[0], record(mine[0], 5, 3)), (mine[1], None)])
            await until(len(mine) + 1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert orjson.loads(store.db[mine[0].encode()])["state"]["events"] == 5
    assert mine[1].encode() not in store.db
    assert orjson.loads(store.db[mine[2].encode()])["state"]["events"] == 1
    assert any(lag == {tp: 0} for lag in lags), f"caught up, it reports no lag: {lags[-3:]}"
    store.db.close()


def test_a_restore_gives_up_within_its_deadline_when_the_broker_does_not_answer():
    """Found by review: the deadline counted from after the consumer's start, which waits ~40 s for
    a broker that accepts connections and answers nothing, inside Faust's own timeout for the step."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts, never answers
    try:
        async def main():
            tp = TP(CHANGELOG, 0)
            task = asyncio.ensure_future(restore(f"127.0.0.1:{server.getsockname()[1]}", {tp: None}, {tp: -1},
                                                 {tp: 10}, deadline_s=1.0))
            done, _ = await asyncio.wait([task], timeout=8)
            if not done:
                task.cancel()
            assert done, "still starting its consumer"
            with pytest.raises(asyncio.TimeoutError):
                task.result()
        asyncio.run(main())
    finally:
        server.close()
