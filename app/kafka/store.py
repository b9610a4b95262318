"""Faust table declarations and the one way agents write to them.

Values are JSON bytes (raw serializer; `app.pipeline.codec.encode`): compact, fast, and readable by any tool
that reads the changelog. `GatedTable` keeps the changelog delivery futures of its writes so the commit gate can
await them before acking the source events: a state update that never reached the changelog would
otherwise be lost on the next recovery while its source offset is already committed.

The processor reads and writes a whole micro-batch at once (`read_many`; `write`, then `send`): one
RocksDB write batch per partition, the changelog records sent as record batches through the commit
gate's sender, and the persisted changelog offset stored once per partition when the batch is
confirmed.
That is what Faust's `table[key] = value` does per key (local write, changelog send, persisted
offset on delivery), in the same formats and order, without Faust's per-key machinery (about a
fifth of a worker's CPU per event). Reads come from the records written in the same consumer
generation, else from one RocksDB multi-get.
"""
from __future__ import annotations

import asyncio
import inspect

import faust
import orjson
import rocksdict
from faust.types import TP

from app.errors import is_transient
from app.kafka.producer import BatchProducer, exception_of, settle
from app.pipeline.codec import encode
from app.retry import RetryPolicy

# Records this worker wrote lately, kept per table as their encoded bytes (about 400 B each) for the
# reads of the next batches: the working set of active keys. Bytes, not the decoded dicts: the cyclic
# garbage collector scans every container still alive, and 200k decoded records (a million dicts and
# lists) made each collection so slow that 1M users scored at 72% of the rate of 10k users
# (bench/inprocess.py --zipf 1: 61 against 44 us per event); a hit now costs one orjson.loads
# (1M users: 43.8 us per event then; what still separates 1M users from 10k is in bench/README.md).
RECENT_MAX = 200_000


# orjson reads JSON nested up to 1024 levels deep but writes only 254: a stored value nested deeper
# could be read and folded, then not written back.
MAX_DEPTH = 250
# A state record is bounded by its domain: a card's is at most about 75 KB (ids of 256 control
# characters, each written as 6 bytes) and 120 KB with the most streams (app/pipeline/fold.py
# STREAMS_MAX), a partition's dead-letter statistics about 50 KB (domain/dead_letter_stats.py). One
# larger was written by someone else, and folded and written back (a number written as 1e15 comes
# back 4.5 times longer) it could outgrow what the changelog takes (1 MB): the write would fail for
# good and the worker exit, at every restart again. 192 KiB written back is at most 864 KB.
MAX_RECORD_BYTES = 192 << 10


class Undecodable(str):
    """A stored value that is not a record this worker could write back: what a reader gets instead
    of an exception (the changelog a store is restored from can hold anything anyone wrote to it).
    Its text says why."""


def _depth(value) -> int:
    deepest, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            level += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _decode(raw: bytes):
    if len(raw) > MAX_RECORD_BYTES:
        return Undecodable(f"{len(raw):,} bytes, more than a state record's {MAX_RECORD_BYTES:,}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Undecodable(f"not JSON ({exc}): {raw[:60]!r}")
    if value is None:  # JSON null, not a tombstone: a tombstone is no value at all
        return Undecodable("null")
    # Nested d deep, JSON takes at least 2d bytes (d openings, d closings): a record of at most
    # 2 x MAX_DEPTH bytes, as nearly every shopper's is, cannot be too deep and needs no count (two
    # scans of its bytes, a fifth of its decoding time).
    if len(raw) > 2 * MAX_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        return Undecodable(f"nested more than {MAX_DEPTH} levels deep")
    return value


def _encode(value) -> bytes:
    try:
        return encode(value)
    except TypeError:
        # an integer past 64 bits, which orjson cannot write: grown from one that a changelog
        # record held (orjson reads up to 2**64 - 1). Written as a float (what orjson reads such a
        # number back as anyway), and a float past the float range as null, as orjson writes an
        # infinity: the key goes on with a number that means little, and the write does not fail.
        return encode(_writable(value))


def _writable(value):
    if type(value) is int and not -2**63 <= value < 2**64:
        return float(value) if -1e308 < value < 1e308 else None
    if isinstance(value, dict):
        return {k: _writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value


class GatedTable(faust.Table):
    def __init__(self, *args, changelog_prefix: str, **kwargs) -> None:
        self.changelog_prefix = changelog_prefix  # before Faust names the changelog topic
        super().__init__(*args, **kwargs)
        # changelog record batches not yet confirmed: (delivery future, topic-partition, keys)
        self.unconfirmed: list[tuple[asyncio.Future, TP, list[bytes]]] = []
        # key -> (consumer generation, encoded record) of what `write` wrote, in two generations:
        # when `recent` is full it becomes `older` (see read_many)
        self.recent: dict[str, tuple[object, bytes]] = {}
        self.older: dict[str, tuple[object, bytes]] = {}
        self.recent_max = RECENT_MAX
        self.producer: BatchProducer | None = None  # handed in by `declare`

    def _changelog_topic_name(self) -> str:
        # Faust's name is <app id>-<table>-changelog; INTERNAL_TOPIC_PREFIX may name it otherwise
        return f"{self.changelog_prefix}-{self.name}-changelog"

    def read(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else _decode(raw)

    def read_many(self, partition: int, keys: list[str], generation) -> list[dict | None]:
        """Records of `keys`, all of `partition`, for a batch of consumer generation `generation`.

        Records this worker wrote in the same generation come from `self.recent` / `self.older`
        (no RocksDB read); the others from one RocksDB multi-get. Within a generation only this
        worker writes its active partitions (recovery and standby updates happen across a
        rebalance), so a record of the current generation equals what RocksDB holds.
        """
        recent, older = self.recent, self.older
        out: list = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            hit = recent.get(key) or older.get(key)
            if hit is not None and hit[0] == generation:
                out[i] = orjson.loads(hit[1])  # written by this worker
            else:
                missing.append(i)
        if missing:
            raws = self.data._db_for_partition(partition).get([keys[i].encode() for i in missing])
            for i, raw in zip(missing, raws):
                out[i] = None if raw is None else _decode(raw)
        return out

    encode = staticmethod(_encode)  # a record as the table stores it (what `write` takes)

    async def put_many(self, rows: list[tuple[int, str, bytes]], generation) -> None:
        """Write (partition, key, encoded record) rows: every local store, then their changelog
        records (a failed delivery's keys written again)."""
        await self.send(self.write(rows, generation))

    def write(self, rows: list[tuple[int, str, bytes]], generation) -> dict[int, list]:
        """Write (partition, key, encoded record) rows to every local store, at once (no await: a
        reader such as the web view never finds some partitions written and others not yet). The
        bytes are kept as the keys' recent values for reads in the same consumer generation.
        Returns the rows' changelog records by partition, for `send`."""
        if len(self.recent) + len(rows) > self.recent_max // 2:
            self.older, self.recent = self.recent, {}  # bounded: what was not read again is forgotten
        recent = self.recent
        by_partition: dict[int, list] = {}
        for partition, key, v in rows:
            k = key.encode()
            recent[key] = (generation, v)
            entries = by_partition.get(partition)
            if entries is None:
                entries = by_partition[partition] = []
            entries.append((k, v, None, k))
        for partition, entries in by_partition.items():
            batch = rocksdict.WriteBatch(raw_mode=True)
            for k, v, _, _ in entries:
                batch.put(k, v)
            self.data._db_for_partition(partition).write(batch)
        return by_partition

    async def send(self, changelog: dict[int, list]) -> None:
        """Queue the changelog records of a `write`; `confirm` awaits their delivery. A partition's
        records that fill more than one record batch wait here for the broker's answer to the batch
        before (the producer keeps one request per partition in flight)."""
        topic = self.changelog_topic.get_topic_name()
        for partition, entries in changelog.items():
            tp = TP(topic, partition)
            self.unconfirmed += [(fut, tp, keys) for fut, keys in
                                 await self.producer.send_partition(topic, partition, entries)]

    async def confirm(self, policy: RetryPolicy, rewrite, owned=lambda: None) -> None:
        """Await the changelog deliveries; on failure rewrite the keys (the value is the whole state).

        `rewrite(keys)` may be a coroutine function. The persisted changelog offset of each
        partition (where recovery resumes) is stored once its records are delivered, as Faust
        does per delivery. `owned()` says which partitions this worker still holds (None: all):
        a partition that moved while its delivery was retried is neither rewritten (its new owner
        writes it) nor given a persisted offset (that would claim its new owner's records as read).
        """
        failed: list[tuple[int, str]] = []  # (partition, key)
        async for _ in policy.attempts(forever=True):
            now = owned()
            if failed and now is not None:
                failed = [(p, k) for p, k in failed if p in now]
            if failed:
                result = rewrite([k for _, k in failed])
                if inspect.isawaitable(result):
                    await result
            pending, self.unconfirmed = self.unconfirmed, []
            await settle([fut for fut, _, _ in pending])
            failed, delivered = [], {}
            for fut, tp, keys in pending:
                exc = exception_of(fut)
                if exc is not None:
                    if not is_transient(exc):  # a state write that can never succeed: a fault of the process
                        raise exc
                    failed += [(tp.partition, k.decode()) for k in keys]
                    continue
                last = fut.result().offset + len(keys) - 1  # a batch reports its first offset
                delivered[tp] = max(last, delivered.get(tp, -1))
            now = owned()
            for tp, offset in delivered.items():
                if now is None or tp.partition in now:
                    self.data.set_persisted_offset(tp, offset)
            if not failed and not self.unconfirmed:
                return


def declare(app: faust.App, name: str, help: str, producer: BatchProducer, changelog_prefix: str) -> GatedTable:
    table = GatedTable(
        app,
        changelog_prefix=changelog_prefix,
        name=name,
        default=None,
        key_type=bytes,  # bytes selects Faust's raw serializer; str keys are encoded as UTF-8
        value_type=bytes,
        partitions=app.conf.topic_partitions,
        beacon=app.tables.beacon,
        help=help,
    )
    table.producer = producer
    return app.tables.add(table)


def key_counts(table, partitions: list[int], exact_up_to: int) -> dict:
    """Keys of `table` per partition in the local store: exact (a scan) while RocksDB estimates at
    most `exact_up_to` keys in all, else its estimate (a scan of 200k keys stalled the event loop
    ~0.2 s)."""
    store = table.data
    try:
        dbs = {p: store._dbs[p] for p in partitions if p in store._dbs}  # rocksdb store: one DB per partition
    except AttributeError:  # another store: no per-partition view
        return {"keys": len(table), "keys_exact": True, "keys_by_partition": {}}
    estimates = {p: db.property_int_value("rocksdb.estimate-num-keys") or 0 for p, db in dbs.items()}
    exact = sum(estimates.values()) <= exact_up_to
    per_partition = {p: (sum(1 for _ in store._visible_keys(dbs[p])) if exact else estimates[p]) if p in dbs else 0
                     for p in partitions}
    return {"keys": sum(per_partition.values()), "keys_exact": exact,
            "keys_by_partition": {str(p): n for p, n in per_partition.items()}}
