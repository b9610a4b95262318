"""Standby replicas in bulk: the changelog partitions a worker keeps warm for others, followed in
large fetches and written in RocksDB write batches.

Faust keeps a standby partition warm through the worker's own consumer, record by record: a
Message, an Event, the recovery queue and buffer, a few sums over all partitions per record. Two cart
workers of `STANDBY_REPLICAS=1` with 1M users (`make bench-standby`): after a restart each worker's
copies took 28 s to catch up with the other's restored state, and a burst cost the pair 53.8 us of
CPU per event against 32.8 without standbys (its throughput 0.75x). Here: 2 s, and the burst costs
0.98-1.14x the CPU per event of a pair without standbys (two runs; throughput 0.84-1.02x).

Installed, the standby partitions of our tables are taken out of Faust's recovery at each rebalance,
so its consumer never resumes them, and once the worker's recovery is complete a consumer of its own
(no group) follows them from each store's persisted offset: each fetch of a partition is one RocksDB
write batch carrying the persisted offset of its last record, as the bulk restore writes
(`app/kafka/restore.py`). When such a partition comes to this worker as active, the restore reads
from that offset only what the copy had not read yet. A rebalance stops the follower before its next
write and cancels it; the next recovery starts one for the new assignment; the worker's stop
cancels it before the stores close.
"""
from __future__ import annotations

import asyncio
import logging
import time

import rocksdict
from aiokafka import TopicPartition
from faust.tables import recovery as faust_recovery

from app import metrics
from app.kafka.restore import Aborted, changelog_consumer, stage, stop_consumer, write
from app.retry import RetryPolicy

log = logging.getLogger(__name__)

# How long a fetch waits for records: a copy's lag is bounded by about this plus the owner's state
# flush, and fewer, larger fetches are what makes a copy cheap.
FETCH_WAIT_MS = 200


async def follow(bootstrap: str, stores: dict, starts: dict, should_abort=lambda: False, on_fetch=None) -> None:
    """Follow each changelog partition `tp` of `stores` (tp -> the table's store) from `starts[tp] + 1`
    into its store until cancelled, each fetch of a partition written as one write batch with the
    persisted offset of its last record. Raises `Aborted` when `should_abort()` says a rebalance
    came. After each fetch, `on_fetch(written, lags)` hears how many records it wrote and, per
    partition, how far it is behind the end the broker last reported."""
    targets = {TopicPartition(*tp): tp for tp in stores}
    consumer = changelog_consumer(bootstrap, fetch_max_wait_ms=FETCH_WAIT_MS)
    try:
        await consumer.start()
        consumer.assign(list(targets))
        for target, tp in targets.items():
            consumer.seek(target, starts[tp] + 1)
        while True:
            fetched = await consumer.getmany(timeout_ms=FETCH_WAIT_MS * 5)
            written = 0
            for target, records in fetched.items():
                tp = targets[target]
                batch = rocksdict.WriteBatch(raw_mode=True)
                offset = stage(batch, records)
                if offset is not None:
                    write(stores[tp], tp, batch, offset, should_abort)
                    written += len(records)
            if on_fetch is not None:
                lags = {}
                for target, tp in targets.items():
                    end = consumer.highwater(target)
                    lags[tp] = None if end is None else max(0, end - await consumer.position(target))
                on_fetch(written, lags)
    finally:
        await stop_consumer(consumer)


class Standbys:
    """The standby partitions of our tables, taken from Faust's recovery and followed in bulk."""

    def __init__(self, bootstrap: str, is_ours) -> None:
        self.bootstrap, self.is_ours = bootstrap, is_ours
        self.taken: set = set()  # the standby changelog partitions of this rebalance
        self.generation = None  # the consumer generation they were assigned in
        self.task: asyncio.Task | None = None

    def take(self, recovery) -> None:
        """After Faust's recovery learnt the new assignment: our standby partitions out of its hands
        (changed in place: its recovery loop holds these very sets)."""
        self.stop()
        if recovery._generation_id != recovery.app.consumer_generation_id:
            return  # Faust's on_rebalance returned early: a newer rebalance came, its call takes them
        self.generation = recovery.app.consumer_generation_id
        self.taken = {tp for tp in recovery.standby_tps if self.is_ours(recovery.tp_to_table.get(tp))}
        recovery.standby_tps.difference_update(self.taken)
        for tps in recovery.standbys_for_table.values():
            tps.difference_update(self.taken)
        for tp in self.taken:
            recovery.standby_offsets.pop(tp, None)
            recovery.standby_highwaters.pop(tp, None)

    def start(self, recovery) -> None:
        """Once the worker's recovery is complete: follow what `take` took, until the next rebalance."""
        app = recovery.app
        if not self.taken or app.consumer_generation_id != self.generation:
            return  # nothing to follow, or a newer rebalance is on its way (its recovery starts it)
        self.stop()
        stores = {tp: recovery.tp_to_table[tp].data for tp in self.taken}
        rebalances = app.rebalancing_count

        def rebalanced() -> bool:
            return (app.consumer_generation_id != self.generation or app.rebalancing_count != rebalances
                    or recovery.signal_recovery_start.is_set() or recovery.should_stop)

        t0, total, caught_up = time.monotonic(), 0, False

        def progress(written: int, lags: dict) -> None:
            nonlocal total, caught_up
            total += written
            for tp, records in lags.items():
                if records is not None:
                    metrics.STANDBY_LAG.labels(tp.topic, str(tp.partition)).set(records)
            if not caught_up and all(records == 0 for records in lags.values()):
                caught_up = True
                log.info("standby partitions caught up: %d changelog records in %.2f s", total, time.monotonic() - t0)

        async def run() -> None:
            by_topic: dict = {}
            for tp in sorted(stores):
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            log.info("following standby partitions in bulk: %s", "; ".join(f"{t} {ps}" for t, ps in by_topic.items()))
            async for _ in RetryPolicy(base_ms=1000, max_ms=30_000).attempts(forever=True):
                if rebalanced():
                    return
                try:
                    # from what the store holds: after a failure, the last write tells where to go on
                    starts = {tp: -1 if (at := store.persisted_offset(tp)) is None else at
                              for tp, store in stores.items()}
                    await follow(self.bootstrap, stores, starts, rebalanced, progress)
                except Aborted:
                    return
                except Exception as exc:  # a broker outage, a store busy: scoring goes on, the copies catch up after it
                    log.warning("standby follower failed (%r); it starts again from the copies' offsets", exc)

        self.task = asyncio.ensure_future(run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        metrics.STANDBY_LAG.clear()


_current: Standbys | None = None


def install(bootstrap: str, is_ours) -> None:
    """Standbys of the tables `is_ours(table)` accepts followed in bulk; the patches of Faust's
    recovery once per process, the last worker built being the one they serve."""
    global _current
    first = _current is None
    _current = Standbys(bootstrap, is_ours)
    if not first:
        return
    on_rebalance = faust_recovery.Recovery.on_rebalance
    on_recovery_completed = faust_recovery.Recovery.on_recovery_completed
    on_stop = faust_recovery.Recovery.on_stop

    async def rebalance(self, *args, **kwargs) -> None:
        await on_rebalance(self, *args, **kwargs)
        _current.take(self)

    async def recovery_completed(self, *args, **kwargs) -> None:
        await on_recovery_completed(self, *args, **kwargs)
        _current.start(self)

    async def stop(self) -> None:  # before the tables close their stores
        _current.stop()
        await on_stop(self)

    faust_recovery.Recovery.on_rebalance = rebalance
    faust_recovery.Recovery.on_recovery_completed = recovery_completed
    faust_recovery.Recovery.on_stop = stop
