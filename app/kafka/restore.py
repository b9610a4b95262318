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
per key wins; a null value deletes), and stores the last offset read as the persisted offset, as
Faust's own `apply_changelog_batch` does. Faust then finds nothing, or the few records written in
the meantime, left to read, and goes on as usual (standbys keep Faust's path: they follow the
changelog as it grows). A failure here leaves the persisted offset where the records written so far
end, and Faust's own recovery reads the rest.
"""
from __future__ import annotations

import logging
import time

import rocksdict
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.tables import recovery as faust_recovery

from app import security

log = logging.getLogger(__name__)

FETCH_BYTES = 64 << 20  # per fetch, and per partition of a fetch: a restore reads megabytes at a time
WRITE_EVERY = 50_000  # records per RocksDB write batch (and persisted offset update)
STALL_S = 10.0

_build_offsets = faust_recovery.Recovery._build_offsets


async def restore(bootstrap: str, stores: dict, starts: dict, ends: dict) -> dict:
    """Read each changelog partition `tp` of `stores` (tp -> the table's store) from `starts[tp] + 1`
    through `ends[tp]` into its store; returns tp -> the last offset written."""
    todo = {tp: (starts[tp] + 1, ends[tp]) for tp in stores if ends.get(tp) is not None and ends[tp] > starts[tp]}
    if not todo:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100,
                                fetch_max_bytes=FETCH_BYTES, max_partition_fetch_bytes=FETCH_BYTES,
                                max_poll_records=WRITE_EVERY, isolation_level="read_uncommitted",
                                **security.client_kwargs())
    await consumer.start()
    done: dict = {}
    try:
        targets = {TopicPartition(tp.topic, tp.partition): tp for tp in todo}
        consumer.assign(list(targets))
        for target, tp in targets.items():
            consumer.seek(target, todo[tp][0])
        open_tps = set(targets)
        batches: dict = {}
        pending = 0
        last_progress = time.monotonic()
        while open_tps:
            fetched = await consumer.getmany(*open_tps, timeout_ms=1000)
            if not fetched:
                if time.monotonic() - last_progress > STALL_S:
                    log.warning("bulk restore: nothing came for %.0f s from %s; Faust's recovery reads the rest",
                                STALL_S, sorted(open_tps))
                    break
                continue
            last_progress = time.monotonic()
            for target, records in fetched.items():
                tp = targets[target]
                last_wanted = todo[tp][1]
                batch = batches.get(tp)
                if batch is None:
                    batch = batches[tp] = rocksdict.WriteBatch(raw_mode=True)
                for r in records:
                    if r.offset > last_wanted:
                        break
                    if r.value is None:
                        batch.delete(r.key)
                    else:
                        batch.put(r.key, r.value)
                    done[tp] = r.offset
                    pending += 1
                if done.get(tp, -1) >= last_wanted or records[-1].offset >= last_wanted:
                    open_tps.discard(target)
            if pending >= WRITE_EVERY:
                _write(stores, batches, done)
                batches, pending = {}, 0
        _write(stores, batches, done)
        return done
    finally:
        await consumer.stop()


def _write(stores: dict, batches: dict, done: dict) -> None:
    """Values first, then the offset they reach: a crash in between reads those records again."""
    for tp, batch in batches.items():
        if tp not in done:
            continue
        store = stores[tp]
        store._db_for_partition(tp.partition).write(batch)
        store.set_persisted_offset(tp, done[tp])


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
            stores = {tp: self.tp_to_table[tp].data for tp in tps if is_ours(self.tp_to_table.get(tp))}
            starts = {tp: -1 if destination[tp] is None else destination[tp] for tp in stores}
            t0 = time.monotonic()
            try:
                done = await restore(bootstrap, stores, starts, dict(self.active_highwaters))
            except Exception as exc:  # Faust's own recovery reads what is left
                log.warning("bulk restore stopped (%r); Faust's recovery reads the rest", exc)
                done = {}
            if done:
                for tp, offset in done.items():
                    destination[tp] = offset
                n = sum(offset - starts[tp] for tp, offset in done.items())
                seconds = time.monotonic() - t0
                log.info("restored %d changelog records of %d partitions in %.2f s (%.0f/s)", n, len(done), seconds,
                         n / max(seconds, 1e-9))
        return await _build_offsets(self, consumer, tps, destination, title)

    faust_recovery.Recovery._build_offsets = build_offsets
