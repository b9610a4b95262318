"""Web views on each worker (Faust's web server, WEB_PORT), and the dashboard.

Endpoints (JSON unless noted):
  GET /health                     liveness (always open)
  GET /ready                      200 once table recovery is done and partitions are assigned, else 503
  GET /metrics                    Prometheus text format (always open)
  GET /dashboard                  the HTML dashboard (always open; its data calls carry the token); / redirects here
  GET /users/{user_id}/session    a user's live session state, features and recent scores (routed to the owner)
  GET /cards/{card_id}/state      a card's state in the fraud pipeline (routed; 404 while there is no such pipeline)
  GET /state/{pipeline}/{key}     the same for any pipeline, by its state key (routed)
  GET /tables, /tables/{name}     tables, keys held on this worker, partitions owned
  GET /dead-letters               dead letters by stage and exception, recent samples (this worker's partitions)
  GET /model                      per pipeline: model version, features, training metrics, loaded_at
  GET /stats                      cumulative counters and histograms for the dashboard (it computes rates from deltas)

With WEB_TOKEN set, every endpoint but /health, /metrics and the dashboard page itself needs
`Authorization: Bearer <token>`; the check is an aiohttp middleware, so it covers Faust's own
routes (/router, /table) too. Every error is a JSON body, never a stack trace.

Key lookups are answered by whichever worker owns the key's partition, whichever worker is asked:
Faust's `table_route` forwards the request (with its headers, so the token too) to the owner.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import aiohttp
import orjson
from aiohttp import web as aioweb
from faust.exceptions import SameNode
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics
from app.settings import settings
from app.worker import app, pipelines
from agents.dead_letters import dead_letter_table
from tables import dead_letter_stats

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_KEY_CHARS = 256  # the codec's limit for a string field such as user_id
OPEN_PATHS = frozenset({"/health", "/metrics", "/dashboard", "/favicon.ico"})
# Keys are counted exactly (a scan of the local store, on the event loop) while RocksDB estimates at
# most this many; beyond, its estimate is the count: scanning 200k keys stalled the worker ~0.2 s.
KEY_COUNT_EXACT = 20_000
REFRESH_MIN_S = 1.0


# -- recent scores per key (fed by the processor) -------------------------------------------------

RECENT_PER_KEY = 10
RECENT_KEYS = 10_000
_recent: dict[str, OrderedDict] = {}


def record_scores(pipeline_name: str, items: Iterable) -> None:
    """Remember the last RECENT_PER_KEY outputs of the last RECENT_KEYS keys of a pipeline (in memory).

    Called by the processor once per micro-batch with the items it scored and published (attributes
    `key` and `encoded`, the published output's bytes), the items of one key together. An entry is
    the very bytes object that was published: nothing is built per event, and bytes are no work for
    the garbage collector. Entries are decoded when looked up.

    Memory is bounded: least recently scored keys are dropped. The ring lives on the worker that scored
    the events, which is the owner of the key's partition, where user lookups are routed; after a
    rebalance the new owner's ring starts empty.
    """
    if pipeline_name not in pipelines:
        return
    ring = _recent.setdefault(pipeline_name, OrderedDict())
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
        if len(entries) >= 2 * RECENT_PER_KEY:
            del entries[:-RECENT_PER_KEY]
    while len(ring) > RECENT_KEYS:
        ring.popitem(last=False)


def _score_entry(id_field: str, output: dict) -> dict:
    entry = {"event_id": output.get(id_field), "score": output["score"], "event_ts": output.get("event_ts"),
             "model_version": output.get("model_version"), "recorded_at": output.get("scored_at")}
    for optional in ("type", "reasons", "decision"):
        if output.get(optional):
            entry[optional] = output[optional]
    return entry


# Without a circular import (app.web imports the worker, which imports the processor): a processor
# with an `on_scored` attribute gets this module's recorder; it calls it with the items it scored.
for _name, _pipeline in pipelines.items():
    if _pipeline.processor is not None and hasattr(_pipeline.processor, "on_scored"):
        _pipeline.processor.on_scored = functools.partial(record_scores, _name)


def recent_scores(pipeline_name: str, key: str) -> list[dict]:
    """Newest first."""
    outputs = _recent.get(pipeline_name, {}).get(key)
    if not outputs:
        return []
    id_field = pipelines[pipeline_name].usecase.id_field
    return [_score_entry(id_field, orjson.loads(raw)) for raw in reversed(outputs[-RECENT_PER_KEY:])]


# -- errors, auth and the root redirect: one middleware over every route --------------------------

def _json_error(status: int, message: str, **extra) -> aioweb.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="scoring"'} if status == 401 else None
    return aioweb.Response(body=orjson.dumps({"error": message, **extra}), status=status,
                           content_type="application/json", charset="utf-8", headers=headers)


def _authorized(request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # aiohttp keeps a header's non-ASCII bytes as lone surrogates: no token of ours has them
    given = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, settings.web_token.encode())


@aioweb.middleware
async def _guard(request, handler):
    if request.path == "/":
        raise aioweb.HTTPFound("/dashboard")
    if settings.web_token and request.path not in OPEN_PATHS and not _authorized(request):
        return _json_error(401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except aioweb.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(exc.status, exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("web request %s %s failed", request.method, request.path)
        return _json_error(500, "internal error (see the worker log)")


app.web.web_app.middlewares.append(_guard)


# -- helpers ---------------------------------------------------------------------------------------

def _bad_key(key: str) -> str | None:
    """Why a key from the URL is malformed, or None."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        return "key contains control characters"
    return None


def _worker() -> str:
    return str(app.conf.canonical_url)


def _changelog_topics() -> set[str]:
    return {t.changelog_topic.get_topic_name() for t in app.tables.values()}


def _assigned(kind: str = "actives") -> set:
    try:
        return getattr(app.assignor, f"assigned_{kind}")()
    except Exception:  # no assignment yet
        return set()


def _partition_of(pipeline, key: str) -> int | None:
    processor = pipeline.processor
    return processor.partition_of(key.encode()) if processor is not None else None


def _features_now(uc, state: dict) -> tuple[dict | None, dict | None]:
    """Features of the last event as the state holds them, with the event's own fields set by a probe.

    The state keeps no copy of the last event, so the event-specific features (event_type, price)
    are those of the probe, a page_view at price 0; every state-derived feature is what the last
    event was scored with. A use case whose features need other event fields gets None.
    """
    probe = {"type": "page_view", "price": 0.0, "quantity": 1}
    try:
        return dict(zip(uc.feature_names, uc.features(state, probe))), probe
    except Exception:
        return None, None


async def _routing_metadata(table) -> None:
    """Faust's router hashes the key with the producer's metadata of the changelog topic, which the
    producer only has once it wrote to that topic; without it routing raises TypeError. Fetch it."""
    try:
        producer = app.producer._ensure_producer()
        await asyncio.wait_for(producer.partitions_for(table.changelog_topic.get_topic_name()), 5.0)
    except Exception:
        log.debug("no metadata for %s yet", table.name, exc_info=True)


async def _routed(view: View, request: Request, table, key: str, local):
    """Answer on the worker that owns `key` in `table`; forward there if it is another worker."""
    await _routing_metadata(table)
    try:
        return await app.router.route_req(table.name, key, view.web, request)
    except SameNode:
        return local()
    except aiohttp.ClientError as exc:
        return view.error(503, f"owner of the key is unreachable: {type(exc).__name__}")


def _key_state(view: View, pipeline_name: str, key: str, not_found: str):
    pipeline = pipelines[pipeline_name]
    uc = pipeline.usecase
    record = pipeline.processor.read(key)
    if record is None:
        return view.error(404, not_found, **{uc.key_field: key})
    state = record["state"]
    features, probe = _features_now(uc, state)
    return view.json({
        "pipeline": pipeline_name,
        uc.key_field: key,
        "worker": _worker(),
        "partition": _partition_of(pipeline, key),
        "state": state,
        "applied_offsets": record.get("applied", {}),
        "features_now": features,
        "features_probe": probe,
        "model_version": pipeline.scorer.version if pipeline.scorer else None,
        "recent_scores": recent_scores(pipeline_name, key),
    })


# -- key lookups -----------------------------------------------------------------------------------

if "cart" in pipelines:
    @app.page("/users/{user_id}/session")
    class UserSession(View):
        """A user's live session, answered by the owner of the user's partition."""

        async def get(self, request: Request, user_id: str) -> Response:
            reason = _bad_key(user_id)
            if reason:
                return self.error(400, f"malformed user_id: {reason}")
            await _routing_metadata(pipelines["cart"].table)
            try:
                return await self._lookup(request, user_id=user_id)
            except aiohttp.ClientError as exc:
                return self.error(503, f"owner of the user is unreachable: {type(exc).__name__}")

        @app.table_route(table=pipelines["cart"].table, match_info="user_id")
        async def _lookup(self, request: Request, user_id: str) -> Response:
            return _key_state(self, "cart", user_id, "unknown user")


@app.page("/cards/{card_id}/state")
class CardState(View):
    async def get(self, request: Request, card_id: str) -> Response:
        if "fraud" not in pipelines:
            return self.error(404, "no fraud pipeline on this deployment")
        reason = _bad_key(card_id)
        if reason:
            return self.error(400, f"malformed card_id: {reason}")
        return await _routed(self, request, pipelines["fraud"].table, card_id,
                             lambda: _key_state(self, "fraud", card_id, "unknown card"))


@app.page("/state/{pipeline}/{key}")
class KeyState(View):
    async def get(self, request: Request, pipeline: str, key: str) -> Response:
        if pipeline not in pipelines:
            return self.error(404, "unknown pipeline", pipelines=sorted(pipelines))
        reason = _bad_key(key)
        if reason:
            return self.error(400, f"malformed key: {reason}")
        return await _routed(self, request, pipelines[pipeline].table, key,
                             lambda: _key_state(self, pipeline, key, "unknown key"))


# -- tables ----------------------------------------------------------------------------------------

_key_counts: dict[str, tuple[float, object, dict]] = {}  # table -> (when, assignment, counts)


def _count_keys(table) -> dict:
    """`_scan_keys`, at most once per REFRESH_MIN_S per table and assignment: a request does not
    choose how often the worker scans its stores."""
    owned = frozenset(_assigned("actives"))
    now = time.monotonic()
    cached = _key_counts.get(table.name)
    if cached is not None and cached[1] == owned and now - cached[0] < REFRESH_MIN_S:
        return cached[2]
    counts = _scan_keys(table)
    _key_counts[table.name] = (now, owned, counts)
    return counts


def _scan_keys(table) -> dict:
    """Keys per active partition on this worker: exact for small stores, else RocksDB's estimate."""
    topic = table.changelog_topic.get_topic_name()
    owned = sorted(tp.partition for tp in _assigned("actives") if tp.topic == topic)
    store = table.data
    try:
        dbs = {p: store._dbs[p] for p in owned if p in store._dbs}  # rocksdb store: one DB per partition
    except AttributeError:  # another store: no per-partition view
        return {"keys": len(table), "keys_exact": True, "keys_by_partition": {}}
    estimates = {p: db.property_int_value("rocksdb.estimate-num-keys") or 0 for p, db in dbs.items()}
    exact = sum(estimates.values()) <= KEY_COUNT_EXACT
    per_partition = {p: (sum(1 for _ in store._visible_keys(dbs[p])) if exact else estimates[p]) if p in dbs else 0
                     for p in owned}
    return {"keys": sum(per_partition.values()), "keys_exact": exact,
            "keys_by_partition": {str(p): n for p, n in per_partition.items()}}


def _table_summary(table, counts: dict | None = None) -> dict:
    topic = table.changelog_topic.get_topic_name()
    counts = counts if counts is not None else _count_keys(table)
    metrics.TABLE_KEYS.labels(table.name).set(counts["keys"])
    return {
        "name": table.name,
        "help": table.help,
        "changelog_topic": topic,
        **counts,
        "active_partitions": sorted(tp.partition for tp in _assigned("actives") if tp.topic == topic),
        "standby_partitions": sorted(tp.partition for tp in _assigned("standbys") if tp.topic == topic),
    }


@app.page("/tables")
class Tables(View):
    async def get(self, request: Request) -> Response:
        return self.json({"worker": _worker(), "tables": [_table_summary(t) for t in app.tables.values()]})


@app.page("/tables/{name}")
class TableDetail(View):
    async def get(self, request: Request, name: str) -> Response:
        table = app.tables.get(name) if not _bad_key(name) else None
        if table is None:
            return self.error(404, "unknown table", tables=sorted(app.tables))
        summary = _table_summary(table)
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
        return self.json({"worker": _worker(), **summary, "sample_keys": sample, "hosts": hosts})


# -- dead letters, model ---------------------------------------------------------------------------

def _dead_letter_summary() -> dict:
    stats = [orjson.loads(v) for v in dead_letter_table.values() if v is not None]
    merged = dead_letter_stats.merge(stats)
    topic = dead_letter_table.changelog_topic.get_topic_name()
    merged["partitions"] = sorted(tp.partition for tp in _assigned("actives") if tp.topic == topic)
    return merged


@app.page("/dead-letters")
class DeadLetters(View):
    async def get(self, request: Request) -> Response:
        return self.json({"worker": _worker(), **_dead_letter_summary()})


@app.page("/model")
class Model(View):
    async def get(self, request: Request) -> Response:
        out = {}
        for name, p in pipelines.items():
            s = p.scorer
            out[name] = None if s is None else {
                "version": s.version,
                "features": list(p.usecase.feature_names),
                "metrics": s.meta.get("metrics", {}),
                "training": s.meta.get("training", {}),
                "loaded_at": s.loaded_at,
            }
        return self.json({"worker": _worker(), "pipelines": out})


# -- health, readiness, metrics --------------------------------------------------------------------

@app.page("/health")
class Health(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})


def _readiness() -> tuple[bool, str]:
    if not app.tables.recovery.completed.is_set():
        return False, "table recovery not completed"
    if app.rebalancing or getattr(app, "in_recovery", False):
        return False, "rebalancing"
    try:
        assignment = app.consumer.assignment()
    except Exception:
        assignment = set()
    if not assignment:
        return False, "no partitions assigned"
    return True, "ready"


metrics.watch_readiness(_readiness)


@app.page("/ready")
class Ready(View):
    async def get(self, request: Request) -> Response:
        ok, why = _readiness()
        return self.json({"ready": ok, "reason": why}, status=200 if ok else 503)


_lag_labels: set[tuple[str, str]] = set()
_last_refresh = 0.0


def _lag() -> list[dict]:
    """Per assigned source partition: highwater minus committed offset (the consumer group's lag).

    Tansu reports high watermarks that trail the real end of a partition; the value is an estimate.
    """
    consumer = app.consumer
    changelogs = _changelog_topics()
    committed = getattr(consumer, "_committed_offset", {})
    read = getattr(consumer, "_read_offset", {})
    out = []
    try:
        assignment = consumer.assignment()
    except Exception:
        return out
    for tp in sorted(assignment):
        if tp.topic in changelogs or tp.topic.endswith("__assignor-__leader"):
            continue
        try:
            hw = consumer.highwater(tp)
        except Exception:
            hw = None
        pos = committed.get(tp)
        if pos is None and read.get(tp) is not None:
            pos = read[tp] + 1
        lag = None if hw is None else max(0, hw - (pos or 0))
        out.append({"topic": tp.topic, "partition": tp.partition, "highwater": hw, "committed": pos, "lag": lag})
    return out


def refresh() -> list[dict]:
    """Fill the gauges this module owns (table keys, lag), when /metrics or /stats is read (no timer:
    nothing is counted while nobody looks); returns the lag rows."""
    global _last_refresh
    lag = _lag()
    labels = set()
    for row in lag:
        if row["lag"] is not None:
            label = (row["topic"], str(row["partition"]))
            metrics.LAG.labels(*label).set(row["lag"])
            labels.add(label)
    for gone in _lag_labels - labels:
        try:
            metrics.LAG.remove(*gone)
        except KeyError:
            pass
    _lag_labels.clear()
    _lag_labels.update(labels)
    now = time.monotonic()
    if now - _last_refresh >= REFRESH_MIN_S:
        _last_refresh = now
        for t in app.tables.values():
            metrics.TABLE_KEYS.labels(t.name).set(_count_keys(t)["keys"])
    return lag


@app.on_partitions_assigned.connect
async def _count_rebalance(*args, **kwargs) -> None:
    metrics.REBALANCES.inc()


@app.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        refresh()
        return self.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])


# -- stats for the dashboard -----------------------------------------------------------------------

def _samples() -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _by(samples, name: str, pipeline: str, label: str | None = None):
    rows = [(lb, v) for lb, v in samples.get(name, []) if lb.get("pipeline") == pipeline]
    if label is None:
        return sum(v for _, v in rows)
    out: dict[str, float] = {}
    for lb, v in rows:
        out[lb[label]] = out.get(lb[label], 0) + v
    return out


def _buckets(samples, name: str, pipeline: str) -> list[list]:
    """Cumulative [upper bound, count] pairs; the last bound is "+Inf"."""
    rows = [(lb["le"], v) for lb, v in samples.get(f"{name}_bucket", []) if lb.get("pipeline") == pipeline]
    rows.sort(key=lambda r: float(r[0]))
    return [[le if le == "+Inf" else float(le), int(v)] for le, v in rows]


def quantile(buckets: list[list], q: float) -> float | None:
    """Estimate a quantile from cumulative buckets, as Prometheus' histogram_quantile does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0
    for le, n in buckets:
        if n >= rank:
            if le == "+Inf":
                return prev_le  # beyond the last finite bucket: a lower bound
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = (le if le != "+Inf" else prev_le), n
    return prev_le


def _ownership() -> dict:
    hosts: dict[str, dict[str, list[int]]] = {}
    try:
        for dist in (app.assignor.tables_metadata(), app.assignor.external_topics_metadata()):
            for host, topics in dist.items():
                h = hosts.setdefault(str(host), {})
                for topic, parts in topics.items():
                    h[topic] = sorted(set(h.get(topic, [])) | set(parts))
    except Exception:
        pass
    return hosts


@app.page("/stats")
class Stats(View):
    async def get(self, request: Request) -> Response:
        lag = refresh()
        samples = _samples()
        out = {}
        for name in pipelines:
            latency = _buckets(samples, "scoring_end_to_end_seconds", name)
            out[name] = {
                "source_topic": pipelines[name].usecase.source_topic,
                "events_in": _by(samples, "scoring_events_in_total", name),
                "scored": _by(samples, "scoring_scored_total", name),
                "duplicates": _by(samples, "scoring_duplicates_skipped_total", name),
                "dead_letters": _by(samples, "scoring_dead_letters_total", name, "stage"),
                "retries": _by(samples, "scoring_retries_total", name, "stage"),
                "decisions": _by(samples, "scoring_decisions_total", name, "decision"),
                "latency_buckets": latency,
                "latency_p50": quantile(latency, 0.5),
                "latency_p99": quantile(latency, 0.99),
                "score_buckets": _buckets(samples, "scoring_score_ratio", name),
            }
        ok, why = _readiness()
        dead = _dead_letter_summary()
        dead.pop("recent", None)
        return self.json({
            "worker": _worker(),
            "time": time.time(),
            "ready": ok,
            "ready_reason": why,
            "pipelines": out,
            "lag": lag,
            "lag_total": sum(r["lag"] or 0 for r in lag),
            "ownership": _ownership(),
            "rebalances": app.rebalancing_count,
            "dead_letter_table": dead,
        })


# -- dashboard -------------------------------------------------------------------------------------

@app.page("/dashboard")
class Dashboard(View):
    async def get(self, request: Request) -> Response:
        try:
            page = (STATIC / "dashboard.html").read_text(encoding="utf-8")
        except OSError:
            return self.error(500, "dashboard.html is missing from the installation")
        # The page learns here whether to ask for the token, before its first data call.
        page = page.replace("__AUTH_REQUIRED__", "true" if settings.web_token else "false")
        return self.html(page, headers={"Cache-Control": "no-store"})
