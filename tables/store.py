"""Faust table declarations and the one way agents write to them.

Values are orjson bytes (raw serializer): compact, fast, and readable by any tool that reads the
changelog. `GatedTable` keeps the changelog delivery futures of its writes so the commit gate can
await them before acking the source events: a state update that never reached the changelog would
otherwise be lost on the next recovery while its source offset is already committed.
"""
from __future__ import annotations

import asyncio
import weakref

import faust
import orjson
from faust.streams import _current_event

from app.gate import RetryPolicy


class GatedTable(faust.Table):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unconfirmed: list = []

    def on_key_set(self, key, value) -> None:
        self.unconfirmed.append(self.send_changelog(self.partition_for_key(key), key, value))
        self._sensor_on_set(self, key, value)

    def read(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else orjson.loads(raw)

    def write(self, event, key: str, value: dict) -> None:
        """Write under `event`, whose partition is the key's partition (Faust reads it from context)."""
        token = _current_event.set(weakref.ref(event))
        try:
            self[key] = orjson.dumps(value)
        finally:
            _current_event.reset(token)

    async def confirm(self, policy: RetryPolicy, rewrite) -> None:
        """Await the changelog futures; on failure rewrite the keys (the value is the whole state)."""
        attempt = 0
        while self.unconfirmed:
            futs, self.unconfirmed = self.unconfirmed, []
            results = await asyncio.gather(*futs, return_exceptions=True)
            failed = [_text(f.message.key) for f, r in zip(futs, results) if isinstance(r, BaseException)]
            if failed:
                attempt += 1
                await asyncio.sleep(policy.backoff_s(min(attempt, 8)))
                rewrite(failed)


def _text(key) -> str:
    return key.decode() if isinstance(key, bytes) else key


def declare(app: faust.App, name: str, help: str) -> GatedTable:
    table = GatedTable(
        app,
        name=name,
        default=None,
        key_type=bytes,  # bytes selects Faust's raw serializer; str keys are encoded as UTF-8
        value_type=bytes,
        partitions=app.conf.topic_partitions,
        beacon=app.tables.beacon,
        help=help,
    )
    return app.tables.add(table)
