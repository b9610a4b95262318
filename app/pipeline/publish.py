"""The commit gate: an event counts as done only when everything it produced is acknowledged.

Faust commits the offsets of acked events on an interval, and a failed delivery is only logged. So
the agents never let Faust ack an event early: they publish the event's outputs (score, forward or
dead letter), await the delivery futures, retry what failed in place (`app.retry`), and only then
ack. Faust commits the highest *contiguous* acked offset, so an event stuck here holds back the
commit of its partition: it is retried, never skipped.
"""
from __future__ import annotations

import logging

from app.errors import is_transient
from app.kafka.producer import BatchProducer, Record, exception_of, settle
from app.retry import RetryPolicy

log = logging.getLogger(__name__)


class Overtaken(Exception):
    """A record whose batch failed after a later batch of its partition was delivered: sent again it
    would land behind records that came after it, where order is what makes it count."""


async def send_round(producer: BatchProducer, records: list[Record], ordered: frozenset = frozenset()) -> list[Record]:
    """Send once and await every delivery; the records that failed, each with its `error`.

    On a topic of `ordered`, a failed batch that a later batch of its partition overtook fails
    with `Overtaken`, which is not retried: the repartition hop recognises a record already applied
    by its origin offset, so a record retried behind a later one of its stream would be taken for
    one and dropped."""
    sent = await producer.send(records)
    await settle([fut for fut, _ in sent])
    errors = [exception_of(fut) for fut, _ in sent]
    delivered_after: set = set()  # (topic, partition) of `ordered` with a batch delivered later in `sent`
    for i in range(len(sent) - 1, -1, -1):  # from the end: which failed batch did a later one overtake
        members, exc = sent[i][1], errors[i]
        # records of `ordered` topics name their partition (the hop's forwards do)
        tp = (members[0].topic, members[0].partition) if members[0].topic in ordered else None
        if tp is None:
            continue
        if exc is None:
            delivered_after.add(tp)
        elif tp in delivered_after and is_transient(exc):  # a permanent error keeps its own name
            errors[i] = Overtaken(f"a later batch of {tp[0]}[{tp[1]}] was delivered first; this one failed: {exc!r:.200}")
    failed = []  # in send order, each batch's records in their own order: a retry sends them as before
    for (_, members), exc in zip(sent, errors):
        if exc is not None:
            for r in members:
                r.error = exc
                failed.append(r)
    return failed


async def publish(producer: BatchProducer, records: list[Record], policy: RetryPolicy, on_retry=None,
                  ordered: frozenset = frozenset()) -> list[Record]:
    """Publish and await delivery; return the records still failing once the budget is spent.

    An error that retrying cannot fix (a record too large, an invalid topic, `Overtaken`) is not retried."""
    pending, given_up = records, []
    async for _ in policy.attempts():
        pending = await send_round(producer, pending, ordered)
        given_up += [r for r in pending if not is_transient(r.error)]
        pending = [r for r in pending if is_transient(r.error)]
        if not pending:
            break
        if on_retry is not None:
            on_retry(pending)
    return given_up + pending


class Unpublishable(Exception):
    """A dead letter the broker refuses for good, even cut to its headers: the process cannot go on."""


async def publish_until_acknowledged(producer: BatchProducer, records: list[Record], policy: RetryPolicy,
                                     on_retry=None, shrink=None) -> None:
    """For dead letters: there is nowhere further to put them, so wait out a transient outage.

    A letter refused for good is handed to `shrink(record)`, which makes it smaller and returns True
    to have it sent again, or False; then `Unpublishable` is raised, never an endless retry."""
    if not records:
        return
    async for attempt in policy.attempts(forever=True):
        records = await send_round(producer, records)
        for r in records:
            if not is_transient(r.error) and (shrink is None or not shrink(r)):
                raise Unpublishable(f"dead letter refused for good by the broker: {r.error!r}")
        if not records:
            return
        if on_retry is not None:
            on_retry(records)
        if attempt % 10 == 1:
            log.warning("%d dead letter(s) not acknowledged yet (attempt %d): %r",
                        len(records), attempt, records[0].error)
