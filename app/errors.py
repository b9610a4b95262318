"""The kinds of failure the pipeline distinguishes.

`Poison`: the event can never succeed (bad bytes, bad fields, a model that rejects it). It goes to
the dead-letter topic at once. `Transient`: the same call may succeed later (a send timed out, a
dependency was briefly away). It is retried in place with backoff, and becomes a dead letter only
once the retry budget is spent. Anything else raised while handling an event is treated as poison
for that event: one event must never take the stream down.
"""
from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError


class Poison(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class Transient(Exception):
    """Raise (or wrap) to ask for a retry."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False)) or exc.__class__.__name__ in {
            "KafkaTimeoutError", "RequestTimedOutError", "NotLeaderForPartitionError",
            "KafkaConnectionError", "NodeNotReadyError",
        }
    # a delivery cancelled by a producer that stops: the record was not refused
    return isinstance(exc, (Transient, asyncio.TimeoutError, asyncio.CancelledError, ConnectionError, TimeoutError))
