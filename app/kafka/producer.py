"""Records out as aiokafka record batches, one per topic-partition, each with its delivery future.

Per record this is an append to aiokafka's C record builder instead of a full `send()` (metadata
wait, partitioner, accumulator, a future each): the worker sends every output, repartition hop,
dead letter and changelog record this way, through Faust's producer (`app.producer`), whose client
it shares. `app.pipeline.publish` awaits the futures and retries; this module only sends.

Failures are injected here, and only here, when the wiring hands in `app.dev.faults.Faults`.
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError

from app.kafka.partitioner import default_partition

Headers = list[tuple[str, bytes]]


class Record:
    """One record to publish, with what it belongs to and how its delivery went."""

    __slots__ = ("topic", "key", "value", "headers", "owner", "partition", "key_hash", "attempts", "error")

    def __init__(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
                 owner: Any = None, partition: int | None = None, key_hash: int | None = None) -> None:
        self.topic, self.key, self.value, self.headers = topic, key, value, headers
        self.owner = owner  # what the record belongs to (the source item), for the caller
        self.partition = partition  # None: by key, as the producer's default partitioner
        self.key_hash = key_hash  # the partitioner's hash of the key, when the caller knows it
        self.attempts = 0
        self.error: BaseException | None = None


class BatchProducer:
    """Sends through the aiokafka producer under Faust's (`faust_app.producer`, started by Faust)."""

    def __init__(self, faust_app, faults=None, client=None) -> None:
        self.faust_app = faust_app
        self.faults = faults  # app.dev.faults.Faults: publish:<topic> refuses that topic's batches
        self._client = client  # instead of Faust's (app/dev/inprocess.py acknowledges without a broker)

    def client(self):
        return self._client or self.faust_app.producer._ensure_producer()

    async def send(self, records: list[Record]) -> list[tuple[asyncio.Future, list[Record]]]:
        """Queue `records`, grouped by topic-partition (a record without `partition` goes where
        `send()` would put it). Records of one partition keep their order. Returns (delivery
        future, its records): a batch is delivered or fails as a whole."""
        kafka = self.client()
        by_tp: dict[tuple[str, int], list[Record]] = {}
        partitions: dict[str, list[int] | BaseException] = {}
        unsendable: dict[str, list[Record]] = {}
        for r in records:
            r.attempts += 1
            partition = r.partition
            if partition is None:
                if r.topic not in partitions:
                    try:
                        partitions[r.topic] = sorted(await kafka.partitions_for(r.topic))
                    except Exception as exc:  # no metadata: these records fail this round, retried
                        partitions[r.topic] = exc
                if isinstance(partitions[r.topic], BaseException):
                    unsendable.setdefault(r.topic, []).append(r)
                    continue
                partition = default_partition(r.key, partitions[r.topic], r.key_hash)
            by_tp.setdefault((r.topic, partition), []).append(r)
        sent = [(failed_future(partitions[topic]), rs) for topic, rs in unsendable.items()]
        for (topic, partition), rs in by_tp.items():
            sent += await self.send_partition(topic, partition, [(r.key, r.value, r.headers, r) for r in rs])
        return sent

    async def send_partition(self, topic: str, partition: int, entries: list[tuple]) -> list[tuple]:
        """Queue (key, value, headers, member) entries on one partition as record batches, in order.
        Returns (delivery future, members of that batch) per batch."""
        kafka = self.client()
        limit = getattr(kafka, "_max_request_size", None)
        sent = []
        batch, members = kafka.create_batch(), []
        for key, value, headers, member in entries:
            size = len(key or b"") + len(value or b"")
            if headers:
                size += sum(len(k) + len(v or b"") for k, v in headers)
            if limit is not None and size > limit:
                # as `send()` refuses it; the broker's message.max.bytes would refuse it anyway
                sent.append((failed_future(MessageSizeTooLargeError(
                    f"record of about {size} bytes is larger than {limit}")), [member]))
                continue
            try:
                appended = batch.append(key=key, value=value, timestamp=None, headers=headers)
                if appended is None:  # the batch is full: it goes, and the record opens the next one
                    sent.append((await self._submit(topic, partition, batch), members))
                    batch, members = kafka.create_batch(), []
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            except Exception as exc:  # a record aiokafka cannot write (a header it cannot encode): it alone fails
                sent.append((failed_future(exc), [member]))
                continue
            members.append(member)
        if members:
            sent.append((await self._submit(topic, partition, batch), members))
        return sent

    async def _submit(self, topic: str, partition: int, batch) -> asyncio.Future:
        # Closed: the micro-batch is complete, so the batch goes out at once instead of lingering
        # (PRODUCER_LINGER_MS) for records that will not come.
        batch.close()
        try:
            if self.faults is not None:
                self.faults.check_publish(topic)  # raises as a producer that refuses the batch
            return await self.client().send_batch(batch, topic, partition=partition)
        except Exception as exc:  # refused before it was queued
            return failed_future(exc)


async def settle(futs: list) -> None:
    """Wait until every future is done, without raising and without a callback per future.

    aiokafka completes the batches of one partition in send order, so waiting for the last
    unfinished one from the end usually finds the earlier ones done: a few suspensions per round
    instead of `gather`'s bookkeeping per future. Every future is still checked one by one.
    """
    for fut in reversed(futs):
        if not fut.done():
            await asyncio.wait((fut,))


def exception_of(fut: asyncio.Future) -> BaseException | None:
    return asyncio.CancelledError() if fut.cancelled() else fut.exception()


def failed_future(exc: BaseException) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut
