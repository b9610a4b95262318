"""Table recovery in bulk: a changelog read in large fetches and written to RocksDB in large batches.

Faust recovers a table by delivering each changelog record through its consumer's per-record path
(a Message and an Event per record, the recovery buffer, a RocksDB write batch per buffer): about
11,000 keys/s here, 90 s for a million users, during which their partitions are not scored. Kafka
Streams restores whole poll batches into RocksDB at a time; so does this.

Where: Faust's recovery (`faust.tables.recovery.Recovery`) first reads each active changelog
partition's end (`_build_highwaters`) and then where its local store is (`_build_offsets`, from the
persisted offset that the store keeps beside its values). Installed, `_build_offsets` of the active
partitions of our tables first reads every record between the two with a consumer of its own
(no group, large fetches), writes them to the partition's RocksDB in write batches (the newest value
per key wins; a null value deletes), each batch with the persisted offset of its last record, in
Faust's own key and format. Faust then finds nothing, or the few records written in the meantime,
left to read, and goes on as usual. Standby partitions are followed with the same writes, as the
changelog grows, by `app/kafka/standby.py`; they do not hold up /ready. Whatever stops the restore (a failure, a rebalance, half of
Faust's own timeout for this step) leaves a persisted offset that matches the values written, and
Faust's own recovery reads the rest.
"""
from __future__ import annotations

import asyncio
import logging
import time

import rocksdict
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.stores import rocksdb as faust_rocksdb
from faust.tables import recovery as faust_recovery

from app import security

log = logging.getLogger(__name__)

FETCH_BYTES = 8 << 20  # per partition of a fetch (64 MB per fetch): more did not read faster
WRITE_EVERY = 20_000  # records per RocksDB write batch of a partition, with its persisted offset

_build_offsets = faust_recovery.Recovery._build_offsets


class Aborted(Exception):
    """A rebalance came: the store may have dropped the partition's database; stop writing."""


def changelog_consumer(bootstrap: str, fetch_max_wait_ms: int) -> AIOKafkaConsumer:
    """A consumer of its own (no group) for reading changelog partitions in large fetches."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=fetch_max_wait_ms,
                            fetch_max_bytes=8 * FETCH_BYTES, max_partition_fetch_bytes=FETCH_BYTES,
                            auto_offset_reset="earliest",  # a start below the log start: from the start
                            isolation_level="read_uncommitted", **security.client_kwargs())


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        # aiokafka's stop can leak its own coordinator task's cancellation: pass on only a
        # cancellation of this task (a new rebalance)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def storable(key) -> bool:
    """Whether a changelog record's key is one a table's store can hold. Anyone who can write a
    changelog can write a record without a key (rocksdict refuses it: the restore, retried, would
    never end) or with the store's own offset key (the next start would read a state record as the
    persisted offset). Such a record is skipped, here and in Faust's own recovery (app/kafka/patches.py)."""
    return type(key) is bytes and key != faust_rocksdb.Store.offset_key


def stage(batch: rocksdict.WriteBatch, records, end: int | None = None) -> int | None:
    """Records (of one partition, in offset order) up to offset `end` into `batch`, the newest value
    per key winning and a null value deleting; returns the offset of the last one staged."""
    last, skipped = None, 0
    for r in records:
        if end is not None and r.offset > end:
            break
        if not storable(r.key):
            skipped += 1
        elif r.value is None:
            batch.delete(r.key)
        else:
            batch.put(r.key, r.value)
        last = r.offset
    if skipped:
        log.warning("%s[%s]: %d changelog records no store can hold (no key, or the store's offset key) "
                    "skipped, the last at offset %s", r.topic, r.partition, skipped, last)
    return last


def write(store, tp, batch: rocksdict.WriteBatch, offset: int, should_abort) -> None:
    """`batch` written to the partition's database with `offset` as its persisted offset, in the
    same write: values and offset land together. Raises `Aborted` instead once a rebalance came."""
    if should_abort():
        raise Aborted()
    batch.put(store.offset_key, str(offset).encode())  # as Store.set_persisted_offset writes it
    store._db_for_partition(tp.partition).write(batch)


async def restore(bootstrap: str, stores: dict, starts: dict, ends: dict, deadline_s: float = 45.0,
                  should_abort=lambda: False) -> dict:
    """Read each changelog partition `tp` of `stores` (tp -> the table's store) from `starts[tp] + 1`
    through `ends[tp]` into its store, each write batch carrying the persisted offset of its last
    record (values and offset land together); returns tp -> the persisted offset now stored. Stops
    at `deadline_s` with what was written (Faust reads the rest) and raises `Aborted` when
    `should_abort()` says a rebalance came."""
    todo = {TopicPartition(*tp): tp for tp in stores if ends.get(tp) is not None and ends[tp] > starts[tp]}
    if not todo:
        return {}
    consumer = changelog_consumer(bootstrap, fetch_max_wait_ms=100)
    deadline = time.monotonic() + deadline_s  # the start counts too: a broker away must not eat Faust's step
    try:
        await asyncio.wait_for(consumer.start(), deadline_s)
    except BaseException:
        await stop_consumer(consumer)
        raise
    done: dict = {}
    try:
        consumer.assign(list(todo))
        for target, tp in todo.items():
            consumer.seek(target, starts[tp] + 1)
        batches = {target: rocksdict.WriteBatch(raw_mode=True) for target in todo}
        pending = dict.fromkeys(todo, 0)
        last: dict = {}

        def written(target, offset: int) -> None:
            tp = todo[target]
            write(stores[tp], tp, batches[target], offset, should_abort)
            done[tp] = offset
            batches[target], pending[target] = rocksdict.WriteBatch(raw_mode=True), 0

        open_tps = set(todo)
        while open_tps and time.monotonic() < deadline:
            fetched = await consumer.getmany(*open_tps, timeout_ms=500)
            for target, records in fetched.items():
                offset = stage(batches[target], records, ends[todo[target]])
                if offset is None:
                    continue
                last[target] = offset
                pending[target] += len(records)  # a bound on the batch's size: past the end counts too
                if pending[target] >= WRITE_EVERY:
                    written(target, offset)
            for target in list(open_tps):
                # the position passes the end also when the log ends in control records
                if await consumer.position(target) > ends[todo[target]]:
                    written(target, ends[todo[target]])
                    open_tps.discard(target)
        for target in open_tps:  # the deadline: keep what was read, Faust reads the rest
            if pending[target]:
                written(target, last[target])
        if open_tps:
            log.warning("bulk restore: %d partition(s) not restored within %.0f s; Faust's recovery reads the rest",
                        len(open_tps), deadline_s)
        return done
    finally:
        await stop_consumer(consumer)


_installed = False


def install(bootstrap: str, is_ours) -> None:
    """Bulk restore for the active changelog partitions of the tables `is_ours(table)` accepts
    (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True

    async def build_offsets(self, consumer, tps, destination, title):
        if title == "active":
            try:
                await restore_actives(self, bootstrap, is_ours, tps, destination)
            except Exception as exc:  # never fatal: an exception here would end Faust's recovery
                log.warning("bulk restore stopped (%r); Faust's recovery reads the rest", exc)
        return await _build_offsets(self, consumer, tps, destination, title)

    faust_recovery.Recovery._build_offsets = build_offsets


async def restore_actives(recovery, bootstrap: str, is_ours, tps, destination) -> None:
    app = recovery.app
    stores = {tp: recovery.tp_to_table[tp].data for tp in tps if is_ours(recovery.tp_to_table.get(tp))}
    starts = {tp: -1 if destination[tp] is None else destination[tp] for tp in stores}
    generation, rebalances = app.consumer_generation_id, app.rebalancing_count

    def rebalanced() -> bool:
        return (app.consumer_generation_id != generation or app.rebalancing_count != rebalances
                or recovery.signal_recovery_start.is_set())

    t0 = time.monotonic()
    try:
        # within Faust's own timeout for this step (broker_request_timeout), which would end recovery
        done = await restore(bootstrap, stores, starts, dict(recovery.active_highwaters),
                             deadline_s=0.5 * float(app.conf.broker_request_timeout), should_abort=rebalanced)
    except Aborted:
        log.info("bulk restore stopped by a rebalance after %.1f s", time.monotonic() - t0)
        return
    if done:
        for tp, offset in done.items():
            destination[tp] = offset
        n = sum(offset - starts[tp] for tp, offset in done.items())
        seconds = time.monotonic() - t0
        log.info("restored %d changelog records of %d partitions in %.2f s (%.0f/s)", n, len(done), seconds,
                 n / max(seconds, 1e-9))
