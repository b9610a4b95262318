"""The commit gate: an event counts as done only when everything it produced is acknowledged.

Faust commits the offsets of acked events on an interval, and a failed delivery is only logged. So
the agents never let Faust ack an event early: they publish the event's outputs (score, forward or
dead letter), await the delivery futures, retry what failed in place with bounded exponential
backoff and jitter, and only then ack. Faust commits the highest *contiguous* acked offset, so an
event stuck here holds back the commit of its partition: it is retried, never skipped.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import murmur2

from app.errors import is_transient

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_ms: float = 50.0
    max_ms: float = 2000.0

    def backoff_s(self, attempt: int) -> float:
        """Full jitter over an exponential ceiling (attempt counts from 1)."""
        ceiling = min(self.max_ms, self.base_ms * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling) / 1000.0


class Record:
    """One record to publish, with what it belongs to and how its delivery went."""

    __slots__ = ("topic", "key", "value", "headers", "owner", "partition", "attempts", "error")

    def __init__(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
                 owner: Any = None, partition: int | None = None) -> None:
        self.topic, self.key, self.value, self.headers = topic, key, value, headers
        self.owner = owner  # what the record belongs to (the source item), for the caller
        self.partition = partition  # None: by key, as the producer's default partitioner
        self.attempts = 0
        self.error: BaseException | None = None


async def send_batches(producer, records: list[Record]) -> list[tuple[asyncio.Future, list[Record]]]:
    """Queue `records` as aiokafka record batches, one per topic-partition (more if one fills up).

    A record without `partition` goes where `send()` would put it (Kafka's default partitioner:
    murmur2 of the key). Records of one partition keep their order. Returns (delivery future, its
    records): a batch is delivered or fails as a whole.
    """
    kafka = producer._ensure_producer()  # the AIOKafkaProducer under Faust's producer
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
            partition = _default_partition(r.key, partitions[r.topic])
        by_tp.setdefault((r.topic, partition), []).append(r)
    sent = [(failed_future(partitions[topic]), rs) for topic, rs in unsendable.items()]
    for (topic, partition), rs in by_tp.items():
        sent += await send_partition(producer, topic, partition, [(r.key, r.value, r.headers, r) for r in rs])
    return sent


async def send_partition(producer, topic: str, partition: int, entries: list[tuple]) -> list[tuple]:
    """Queue (key, value, headers, member) entries on one partition as record batches, in order.

    Per record this is an append to aiokafka's C record builder instead of a full `send()`
    (metadata wait, partitioner, accumulator, a future each). Returns (delivery future, members
    of that batch) per batch.
    """
    kafka = producer._ensure_producer()
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
                sent.append((await _submit(producer, topic, partition, batch), members))
                batch, members = kafka.create_batch(), []
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        except Exception as exc:  # a record aiokafka cannot write (a header it cannot encode): it alone fails
            sent.append((failed_future(exc), [member]))
            continue
        members.append(member)
    if members:
        sent.append((await _submit(producer, topic, partition, batch), members))
    return sent


@lru_cache(maxsize=1 << 16)
def key_hash(key: bytes) -> int:
    """Kafka's default partitioner hash (murmur2, positive), cached: the same keys recur all the time."""
    return murmur2(key) & 0x7FFFFFFF


def _default_partition(key: bytes | None, partitions: list[int]) -> int:
    # aiokafka's DefaultPartitioner (Kafka's): murmur2 of the key; no key, any partition
    if key is None:
        return random.choice(partitions)
    return partitions[key_hash(key) % len(partitions)]


async def submit_batch(producer, topic: str, partition: int, batch) -> asyncio.Future:
    """Hand one record batch to the producer (the seam where app.faults injects publish failures)."""
    return await producer._ensure_producer().send_batch(batch, topic, partition=partition)


async def _submit(producer, topic: str, partition: int, batch) -> asyncio.Future:
    # Closed: the micro-batch is complete, so the batch goes out at once instead of lingering
    # (PRODUCER_LINGER_MS) for records that will not come.
    batch.close()
    try:
        return await submit_batch(producer, topic, partition, batch)
    except Exception as exc:  # refused before it was queued
        return failed_future(exc)


async def _send_round(producer, records: list[Record]) -> list[Record]:
    sent = await send_batches(producer, records)
    await settle([fut for fut, _ in sent])
    failed = []
    for fut, members in sent:
        exc = exception_of(fut)
        if exc is not None:
            for r in members:
                r.error = exc
                failed.append(r)
    return failed


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


async def publish(producer, records: list[Record], policy: RetryPolicy, on_retry=None) -> list[Record]:
    """Publish and await delivery; return the records still failing once the budget is spent.

    An error that retrying cannot fix (a record too large, an invalid topic) is not retried."""
    pending, given_up = records, []
    for attempt in range(1, policy.attempts + 1):
        pending = await _send_round(producer, pending)
        given_up += [r for r in pending if not is_transient(r.error)]
        pending = [r for r in pending if is_transient(r.error)]
        if not pending:
            return given_up
        if on_retry is not None:
            on_retry(pending)
        if attempt < policy.attempts:
            await asyncio.sleep(policy.backoff_s(attempt))
    return given_up + pending


class Unpublishable(Exception):
    """A dead letter the broker refuses for good, even cut to its headers: the process cannot go on."""


async def publish_until_acknowledged(producer, records: list[Record], policy: RetryPolicy, on_retry=None,
                                     shrink=None) -> None:
    """For dead letters: there is nowhere further to put them, so wait out a transient outage.

    A letter refused for good is handed to `shrink(record)`, which makes it smaller and returns True
    to have it sent again, or False; then `Unpublishable` is raised, never an endless retry."""
    attempt = 0
    while records:
        records = await _send_round(producer, records)
        for r in records:
            if not is_transient(r.error) and (shrink is None or not shrink(r)):
                raise Unpublishable(f"dead letter refused for good by the broker: {r.error!r}")
        if records:
            attempt += 1
            if on_retry is not None:
                on_retry(records)
            if attempt % 10 == 1:
                log.warning("%d dead letter(s) not acknowledged yet (attempt %d): %r",
                            len(records), attempt, records[0].error)
            await asyncio.sleep(policy.backoff_s(min(attempt, 8)))
