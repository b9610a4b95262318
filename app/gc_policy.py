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
is collected between batches, when it holds only what batches left behind.
"""
from __future__ import annotations

import gc

AUTOMATIC = (500_000, 10, 10)  # a safety net; between batches the young generation is collected
YOUNG = 20_000  # collect between batches once this many young objects accumulated


def install() -> None:
    gc.freeze()
    gc.set_threshold(*AUTOMATIC)


def between_batches() -> None:
    if gc.get_count()[0] > YOUNG:
        gc.collect(0)
