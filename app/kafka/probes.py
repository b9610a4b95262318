"""Clients of their own that read where a log really starts and ends (no consumer group joined).

Tansu reports end offsets that lag the real end of a partition, and the intake's offset guard must
tell gaps the log has from records the consumer dropped: both are answered by reading the log.
"""
from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from app import security

log = logging.getLogger(__name__)


async def read_true_ends(bootstrap, reported: dict, limit_s: float = 5.0) -> dict:
    """Read from each reported end until nothing more comes back; return the real ends.

    Done when every partition has had a fetch answered (its high watermark is known: an empty round
    before that is only a slow broker) and a round then brings nothing. A partition that other
    workers keep writing (a standby's changelog) never stops growing: after `limit_s` the ends seen
    so far are returned, and recovery catches up from there as usual."""
    ends = dict(reported)
    if not ends:
        return ends
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50,
                             isolation_level="read_uncommitted", **security.client_kwargs())
    await probe.start()
    try:
        # Faust's TP and aiokafka's TopicPartition are equal tuples: one mapping serves both.
        tps = [TopicPartition(*tp) for tp in ends]
        probe.assign(tps)
        for tp, end in ends.items():
            probe.seek(TopicPartition(*tp), end)
        deadline = time.monotonic() + limit_s
        quiet = 0
        while time.monotonic() < deadline:
            batch = await probe.getmany(timeout_ms=200)
            if batch:
                quiet = 0
                for tp, records in batch.items():
                    if records:
                        ends[tp] = max(ends[tp], records[-1].offset + 1)
            elif all(probe.highwater(tp) is not None for tp in tps):
                quiet += 1
                if quiet >= 2:
                    return ends
        log.info("end offsets of %d partition(s) still moving after %.0f s: using the ends read so far",
                 len(ends), limit_s)
        return ends
    finally:
        await probe.stop()


class LogProbe:
    """Reads where the log itself has its next record, with a consumer of its own (no group)."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.bootstrap, self.group = bootstrap, group
        self._consumer = None
        self._group_reader = None

    async def committed(self, tp) -> int | None:
        """The group's committed offset of `tp`, from the broker (without joining the group)."""
        if self._group_reader is None:
            self._group_reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.group,
                                                  enable_auto_commit=False, **security.client_kwargs())
            await self._group_reader.start()
        return await self._group_reader.committed(TopicPartition(tp.topic, tp.partition))

    async def first_offset(self, tp, offset: int) -> int | None:
        """The offset of the first record at or after `offset` in the log; None if none came within 2 s.

        Below the log's start (retention moved it) that is the start: asked of the broker, not left to
        the consumer's reset policy (aiokafka's default, latest, answered with the next new record,
        and the guard took everything before it for a gap)."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                              fetch_max_wait_ms=100, auto_offset_reset="earliest",
                                              **security.client_kwargs())
            await self._consumer.start()
        probe, target = self._consumer, TopicPartition(tp.topic, tp.partition)
        probe.assign([target])
        start = (await probe.beginning_offsets([target]))[target]
        probe.seek(target, max(offset, start))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            got = await probe.getmany(target, timeout_ms=300, max_records=1)
            if got.get(target):
                return got[target][0].offset
        return None

    async def stop(self) -> None:
        for client in (self._consumer, self._group_reader):
            if client is not None:
                await client.stop()
        self._consumer = self._group_reader = None
