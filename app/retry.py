"""The one retry policy: how often a transient failure is tried again, and how long to wait between.

Every retry loop of the worker (a score call, a round of outputs, a round of dead letters, the
changelog confirmation of a state write) iterates `policy.attempts()` and decides by itself what a
failure means: a bounded loop gives up after RETRY_ATTEMPTS (the event becomes a dead letter); the
dead letters and the state writes have nowhere further to go, so they wait out an outage
(`forever=True`). The backoff is the same for all: a random wait in the upper half of an
exponential ceiling.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import AsyncIterator


@dataclass(frozen=True)
class RetryPolicy:
    attempts_max: int = 5
    base_ms: float = 50.0
    max_ms: float = 2000.0

    def backoff_s(self, attempt: int) -> float:
        """A random wait between half the ceiling and the ceiling ("equal jitter": never next to
        nothing, yet spread), the ceiling exponential in the attempt (from 1) up to max_ms."""
        ceiling = min(self.max_ms, self.base_ms * (2 ** (min(attempt, 32) - 1)))
        return random.uniform(ceiling / 2, ceiling) / 1000.0

    async def attempts(self, forever: bool = False) -> AsyncIterator[int]:
        """Attempt numbers from 1, with the backoff slept before each one after the first; the
        caller breaks out when it succeeded. Bounded by `attempts_max` unless `forever`."""
        attempt = 1
        while True:
            yield attempt
            if not forever and attempt >= self.attempts_max:
                return
            await asyncio.sleep(self.backoff_s(attempt))
            attempt += 1
