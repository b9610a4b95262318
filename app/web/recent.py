"""The last outputs of recently scored keys, in memory, for the key lookups (fed by the processor).

An entry is the very bytes object that was published: nothing is built per event, and bytes are
no work for the garbage collector. Entries are decoded when looked up. Memory is bounded: least
recently scored keys are dropped. The ring lives on the worker that scored the events, which is
the owner of the key's partition, where lookups are routed; after a rebalance the new owner's
ring starts empty.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import orjson

PER_KEY = 10
KEYS = 10_000


class RecentScores:
    def __init__(self, id_field: str) -> None:
        self.id_field = id_field
        self._ring: OrderedDict[str, list] = OrderedDict()

    def record(self, items: Iterable) -> None:
        """Called once per micro-batch with the items it scored and published (attributes `key` and
        `encoded`, the published output's bytes), the items of one key together."""
        ring = self._ring
        key = entries = None
        for it in items:
            if it.key != key:
                key = it.key
                entries = ring.get(key)
                if entries is None:
                    entries = ring[key] = []
                else:
                    ring.move_to_end(key)
            entries.append(it.encoded)
            if len(entries) >= 2 * PER_KEY:
                del entries[:-PER_KEY]
        while len(ring) > KEYS:
            ring.popitem(last=False)

    def of(self, key: str) -> list[dict]:
        """Newest first."""
        outputs = self._ring.get(key)
        if not outputs:
            return []
        return [self._entry(orjson.loads(raw)) for raw in reversed(outputs[-PER_KEY:])]

    def _entry(self, output: dict) -> dict:
        entry = {"event_id": output.get(self.id_field), "score": output["score"], "event_ts": output.get("event_ts"),
                 "model_version": output.get("model_version"), "recorded_at": output.get("scored_at")}
        for optional in ("type", "reasons", "decision"):
            if output.get(optional):
                entry[optional] = output[optional]
        return entry
