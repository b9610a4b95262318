"""State written behind: several batches' new records written to the table at once, then acked.

Each batch's new records (the newest per key) join a buffer of unwritten ones, which later batches
and the web view read; the buffer is written after `flush_events` events or `flush_s`, at once
when a rebalance empties the intake (the agent's loop asks `write_due`), and before a batch of
another consumer generation. A key that several batches touch is written and changelogged once;
the batches are acked together when that write is confirmed. While a write's changelog records are
sent and their delivery awaited, the next batches are processed; the next write waits for that, so
state writes stay in order and the rewrite of a failed changelog delivery cannot overtake a newer
value.

Used by every agent that keeps state: the scoring processors and the dead-letter counter.
"""
from __future__ import annotations

import asyncio
import logging
import time

from app.retry import RetryPolicy

log = logging.getLogger(__name__)


class StateWriter:
    def __init__(self, table, policy: RetryPolicy, flush_events: int, flush_ms: float, name: str,
                 flush_seconds=None) -> None:
        self.table = table
        self.policy = policy
        self.name = name
        self.flush_events, self.flush_s = flush_events, flush_ms / 1000.0
        self.flush_seconds = flush_seconds  # a histogram of the time from write to confirmation
        self.on_failure = None  # set by the agent: an unexpected error while confirming a write
        self.on_written = None  # called after each write of the unwritten state (the app's GC policy)
        # set by the agent: the topic-partitions this worker holds now (None: all it is handed)
        self.assignment = None
        self._confirming: asyncio.Future | None = None  # the last write's confirmation and acks
        # key -> (partition, newest record), and the batches whose state it holds
        self._unwritten: dict[str, tuple[int, dict]] = {}
        self._waiting: list = []
        self._waiting_events = 0
        self._waiting_since = 0.0

    # -- reading: unwritten first -----------------------------------------------------------------

    def read(self, key: str) -> dict | None:
        """The newest record of `key`: unwritten, else the table's."""
        unwritten = self._unwritten.get(key)
        return unwritten[1] if unwritten is not None else self.table.read(key)

    def read_many(self, keys_by_partition: dict[int, list[str]], generation) -> dict[str, dict | None]:
        """Records of keys, grouped by their partition; unwritten first, else one table read per partition."""
        unwritten, records = self._unwritten, {}
        for partition, keys in keys_by_partition.items():
            missing = []
            for key in keys:
                if key in unwritten:
                    records[key] = unwritten[key][1]
                else:
                    missing.append(key)
            if missing:
                records.update(zip(missing, self.table.read_many(partition, missing, generation)))
        return records

    # -- writing ----------------------------------------------------------------------------------

    async def before(self, generation) -> None:
        """A batch of `generation` comes: what was folded in another generation is written first
        (state read from the table is only trusted within one generation)."""
        if self._waiting and self._waiting[-1].generation != generation:
            await self.flush()

    async def add(self, rows: dict[str, tuple[int, dict]], batch, events: int) -> None:
        """The batch's new records (key -> (partition, record)) join the unwritten ones; the batch is
        acked once they are written and confirmed. Writes now if the bounds are reached."""
        self._unwritten.update(rows)
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.append(batch)
        self._waiting_events += events
        if (self._waiting_events >= self.flush_events
                or time.monotonic() - self._waiting_since >= self.flush_s):
            await self.flush()

    def write_due(self) -> float | None:
        """Seconds until the unwritten state is due to be written (0: now); None if nothing is.

        The agent's loop asks whenever its intake is empty and flushes when it is due, so nothing
        stays unwritten (and unacked, holding up commits and rebalances) for long once no more
        records come; at a low rate one write then covers many small batches."""
        if not self._waiting:
            return None
        return max(0.0, self._waiting_since + self.flush_s - time.monotonic())

    async def flush(self) -> None:
        """Write the unwritten state; its batches are acked once its changelog is confirmed."""
        if not self._waiting:
            return
        await self._written()  # the previous write confirmed and acked: the state writes stay in order
        unwritten, batches = self._unwritten, self._waiting
        self._unwritten, self._waiting, self._waiting_events = {}, [], 0
        generation = batches[-1].generation
        owned = self._owned()
        if owned is not None:
            # A worker that lost partitions without taking part in the rebalance (evicted after a
            # pause) must not write their state over what their new owner writes: the new owner
            # replays them from the committed offsets. (Without transactions a write already under
            # way cannot be fenced; this closes the window to the time one write takes to reach
            # the changelog.)
            lost = {p for p, _ in unwritten.values() if p not in owned}
            if lost:
                log.warning("%s partitions %s are no longer assigned here: their unwritten state is "
                            "dropped, their new owner replays it", self.name, sorted(lost))
                unwritten = {k: row for k, row in unwritten.items() if row[0] in owned}
        t0 = time.perf_counter()
        encode = self.table.encode
        # Encoded once: a failed changelog delivery is rewritten from these bytes, and the states
        # themselves die here, before the garbage collector ever scans them (see app/gc_policy.py).
        rows = {key: (partition, key, encode(record)) for key, (partition, record) in unwritten.items()}
        del unwritten
        changelog = self.table.write(list(rows.values()), generation)
        # The changelog is sent behind as well: at a million users a write's records of one partition
        # fill two record batches, and the second waits for the broker's answer to the first.
        self._confirming = asyncio.ensure_future(self._confirm(batches, rows, changelog, generation, t0))
        self._confirming.add_done_callback(self._confirmed)
        if self.on_written is not None:
            self.on_written()

    async def drain(self) -> None:
        """Write what is unwritten; wait until it is confirmed and every batch handed over is acked."""
        await self.flush()
        await self._written()

    async def _confirm(self, batches: list, rows: dict, changelog: dict, generation, t0: float) -> None:
        await self.table.send(changelog)
        await self.table.confirm(self.policy, lambda keys: self.table.put_many([rows[k] for k in keys], generation),
                                 owned=self._owned)
        if self.flush_seconds is not None:
            self.flush_seconds.observe(time.perf_counter() - t0)
        owned = self._owned()
        for batch in batches:
            if owned is None:
                batch.ack()
            else:
                batch.ack(lambda tp: tp.partition in owned)

    def _confirmed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())

    def _owned(self) -> set[int] | None:
        """Partitions of the state (= of the input topics) this worker holds now; None if not known."""
        if self.assignment is None:
            return None
        try:
            return {tp.partition for tp in self.assignment()}
        except Exception:  # no consumer (yet): nothing to fence against
            return None

    async def _written(self) -> None:
        if self._confirming is not None:
            await self._confirming
