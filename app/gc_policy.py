"""When the cyclic garbage collector runs in a worker.

A micro-batch allocates a few hundred thousand short-lived containers (events, states, outputs) and
the worker holds large long-lived ones (the tables' recent records, the web view's rings); none of
the hot objects form cycles, refcounting frees them (tests/test_processor.py checks that a handled
batch leaves no cyclic garbage: when items and their output records referred to each other, the
collector took a quarter of the CPU per event). With CPython's default thresholds (700, 10, 10)
the collector ran about 270 times a second and took a third of the worker's CPU; with a young
threshold of 50,000 it still ran in the middle of every batch, scanning the batch's live objects
and promoting them, about 14% of the CPU. So: startup objects (modules, the model) are frozen out of
collection, the automatic threshold is set above what one batch allocates, and the young generation
is collected between batches.

Which batches: those after a state write (`state_written`, called by the state writers). The state
folded since the last write (a dict and two lists per key) is what a batch leaves alive; a write
encodes it and lets it go, so right after a write the young generation holds little, and each
state dies without ever being scanned. Collected by a count instead (20,000 young objects), each
collection scanned the unwritten state of every key touched since the last one: with a million
users, whose keys rarely repeat within a write, that was twice the collector's time of 10,000 users
(`python -m bench.inprocess --zipf 1 --users 1000000`). A write comes at least every
`STATE_FLUSH_MS`; `YOUNG_MAX` bounds the young generation between writes all the same.
"""
from __future__ import annotations

import gc

AUTOMATIC = (500_000, 10, 10)  # a safety net; between batches the young generation is collected
# Young objects that are collected between batches even without a state write. With what one batch
# allocates on top (about 90,000 at the peak of a 5,000-event cart batch of new users) it stays
# under AUTOMATIC's 500,000, so the collector does not start in the middle of a batch.
YOUNG_MAX = 200_000

_written = False


def install() -> None:
    gc.freeze()
    gc.set_threshold(*AUTOMATIC)


def state_written() -> None:
    global _written
    _written = True


def between_batches() -> None:
    global _written
    if _written or gc.get_count()[0] > YOUNG_MAX:
        _written = False
        gc.collect(0)
        # An explicit collection counts towards the older generations' thresholds, and only an
        # automatic one (which the young collections keep from coming) collects them: a garbage
        # cycle that outlived one young collection was never freed. So the oldest generation past
        # its threshold is collected here, as the automatic collection would. A full one, every
        # hundred writes, took 1-2 ms in the processor holding a million users' caches (the startup
        # objects are frozen, the caches hold bytes).
        older = gc.get_count()
        for generation in (2, 1):
            if older[generation] > AUTOMATIC[generation]:
                gc.collect(generation)
                break
