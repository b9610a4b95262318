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
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Record:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None
    owner: Any = None  # what the record belongs to (the source item), for the caller
    attempts: int = 0
    error: BaseException | None = field(default=None, repr=False)


async def _send_round(producer, records: list[Record]) -> list[Record]:
    futs = []
    for r in records:
        r.attempts += 1
        try:
            futs.append(await producer.send(r.topic, r.key, r.value, None, None, r.headers))
        except Exception as exc:  # refused before it was queued
            futs.append(_failed(exc))
    results = await asyncio.gather(*futs, return_exceptions=True)
    failed = []
    for r, res in zip(records, results):
        if isinstance(res, BaseException):
            r.error = res
            failed.append(r)
    return failed


def _failed(exc: BaseException) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


async def publish(producer, records: list[Record], policy: RetryPolicy, on_retry=None) -> list[Record]:
    """Publish and await delivery; return the records still failing once the budget is spent."""
    pending = records
    for attempt in range(1, policy.attempts + 1):
        pending = await _send_round(producer, pending)
        if not pending:
            return []
        if on_retry is not None:
            on_retry(pending)
        if attempt < policy.attempts:
            await asyncio.sleep(policy.backoff_s(attempt))
    return pending


async def publish_until_acknowledged(producer, records: list[Record], policy: RetryPolicy, on_retry=None) -> None:
    """For dead letters: there is nowhere further to put them, so wait out the outage."""
    attempt = 0
    while records:
        records = await _send_round(producer, records)
        if records:
            attempt += 1
            if on_retry is not None:
                on_retry(records)
            if attempt % 10 == 1:
                log.warning("%d dead letter(s) not acknowledged yet (attempt %d): %r",
                            len(records), attempt, records[0].error)
            await asyncio.sleep(policy.backoff_s(min(attempt, 8)))
