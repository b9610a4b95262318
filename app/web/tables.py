"""The tables this worker holds, and the dead letters it counted.

  GET /tables, /tables/{name}     keys held on this worker, partitions owned (a sample of keys)
  GET /dead-letters               dead letters by stage and exception, recent samples (this worker's partitions)
"""
from __future__ import annotations

import time

from faust.web import Request, Response, View

from app import metrics
from app.kafka.store import key_counts
from app.web.lookups import bad_key
from domain import dead_letter_stats

# Keys are counted exactly (a scan of the local store, on the event loop) while RocksDB estimates at
# most this many; beyond, its estimate is the count.
KEY_COUNT_EXACT = 20_000
REFRESH_MIN_S = 1.0


def assigned(app, kind: str = "actives") -> set:
    try:
        return getattr(app.assignor, f"assigned_{kind}")()
    except Exception:  # no assignment yet
        return set()


class KeyCounts:
    """Key counts per table, scanned at most once per REFRESH_MIN_S per table and assignment: a
    request does not choose how often the worker scans its stores."""

    def __init__(self, app) -> None:
        self.app = app
        self._cached: dict[str, tuple[float, object, dict]] = {}  # table -> (when, assignment, counts)

    def __call__(self, table) -> dict:
        owned = frozenset(assigned(self.app))
        now = time.monotonic()
        cached = self._cached.get(table.name)
        if cached is not None and cached[1] == owned and now - cached[0] < REFRESH_MIN_S:
            return cached[2]
        topic = table.changelog_topic.get_topic_name()
        counts = key_counts(table, sorted(tp.partition for tp in owned if tp.topic == topic), KEY_COUNT_EXACT)
        self._cached[table.name] = (now, owned, counts)
        return counts


def summary(app, table, counts: dict) -> dict:
    topic = table.changelog_topic.get_topic_name()
    metrics.TABLE_KEYS.labels(table.name).set(counts["keys"])
    return {
        "name": table.name,
        "help": table.help,
        "changelog_topic": topic,
        **counts,
        "active_partitions": sorted(tp.partition for tp in assigned(app, "actives") if tp.topic == topic),
        "standby_partitions": sorted(tp.partition for tp in assigned(app, "standbys") if tp.topic == topic),
    }


def dead_letter_summary(service) -> dict:
    letters = service.dead_letters
    # The one key per partition the agent writes, not a scan of the table: its changelog, which anyone
    # can write, may hold a million other keys, and the dashboard asks every 2 s.
    records = [letters.writer.read(f"p{p}") for p in range(service.settings.partitions)]
    merged = dead_letter_stats.merge([r for r in records if r is not None and dead_letter_stats.readable(r)])
    topic = letters.table.changelog_topic.get_topic_name()
    merged["partitions"] = sorted(tp.partition for tp in assigned(service.faust) if tp.topic == topic)
    return merged


def register(service, counts: KeyCounts) -> None:
    app = service.faust

    @app.page("/tables")
    class Tables(View):
        async def get(self, request: Request) -> Response:
            return self.json({"worker": str(app.conf.canonical_url),
                              "tables": [summary(app, t, counts(t)) for t in app.tables.values()]})

    @app.page("/tables/{name}")
    class TableDetail(View):
        async def get(self, request: Request, name: str) -> Response:
            table = app.tables.get(name) if not bad_key(name) else None
            if table is None:
                return self.error(404, "unknown table", tables=sorted(app.tables))
            sample = []
            for k in table.keys():
                sample.append(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k))
                if len(sample) >= 20:
                    break
            hosts = {}
            try:
                hosts = {str(h): parts for h, parts in app.router.table_metadata(name).items()}
            except Exception:
                pass
            return self.json({"worker": str(app.conf.canonical_url), **summary(app, table, counts(table)),
                              "sample_keys": sample, "hosts": hosts})

    @app.page("/dead-letters")
    class DeadLetters(View):
        async def get(self, request: Request) -> Response:
            return self.json({"worker": str(app.conf.canonical_url), **dead_letter_summary(service)})
