"""Numbers for machines and for the dashboard.

  GET /metrics   Prometheus text format (always open)
  GET /stats     cumulative counters and histograms per pipeline, lag, ownership (the dashboard
                 computes rates from deltas)
  GET /model     per pipeline: the champion (version, features, training metrics, loaded_at), the
                 challenger in shadow, the promotions refused and why

The gauges this module owns (table keys, lag) are filled when /metrics or /stats is read: nothing
is counted while nobody looks.
"""
from __future__ import annotations

import time

from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics
from app.kafka.consumer import lag
from app.web.health import readiness
from app.web.tables import REFRESH_MIN_S, dead_letter_summary


def samples() -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def by(found, name: str, pipeline: str, label: str | None = None):
    rows = [(lb, v) for lb, v in found.get(name, []) if lb.get("pipeline") == pipeline]
    if label is None:
        return sum(v for _, v in rows)
    out: dict[str, float] = {}
    for lb, v in rows:
        out[lb[label]] = out.get(lb[label], 0) + v
    return out


def buckets(found, name: str, pipeline: str) -> list[list]:
    """Cumulative [upper bound, count] pairs; the last bound is "+Inf"."""
    rows = [(lb["le"], v) for lb, v in found.get(f"{name}_bucket", []) if lb.get("pipeline") == pipeline]
    rows.sort(key=lambda r: float(r[0]))
    return [[le if le == "+Inf" else float(le), int(v)] for le, v in rows]


def quantile(cumulative: list[list], q: float) -> float | None:
    """Estimate a quantile from cumulative buckets, as Prometheus' histogram_quantile does."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    prev_le, prev_n = 0.0, 0
    for le, n in cumulative:
        if n >= rank:
            if le == "+Inf":
                return prev_le  # beyond the last finite bucket: a lower bound
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = (le if le != "+Inf" else prev_le), n
    return prev_le


class Gauges:
    """Fills the lag gauges (and, at most once per REFRESH_MIN_S, the key counts) when read."""

    def __init__(self, app, counts) -> None:
        self.app, self.counts = app, counts
        self._labels: set[tuple[str, str]] = set()
        self._last_counted = 0.0

    def refresh(self) -> list[dict]:
        changelogs = {t.changelog_topic.get_topic_name() for t in self.app.tables.values()}
        rows = lag(self.app, changelogs)
        labels = set()
        for row in rows:
            if row["lag"] is not None:
                label = (row["topic"], str(row["partition"]))
                metrics.LAG.labels(*label).set(row["lag"])
                labels.add(label)
        for gone in self._labels - labels:
            try:
                metrics.LAG.remove(*gone)
            except KeyError:
                pass
        self._labels = labels
        now = time.monotonic()
        if now - self._last_counted >= REFRESH_MIN_S:
            self._last_counted = now
            for t in self.app.tables.values():
                metrics.TABLE_KEYS.labels(t.name).set(self.counts(t)["keys"])
        return rows


def ownership(app) -> dict:
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


def register(service, counts) -> None:
    app, running = service.faust, service.pipelines
    gauges = Gauges(app, counts)

    @app.on_partitions_assigned.connect
    async def count_rebalance(*args, **kwargs) -> None:
        metrics.REBALANCES.inc()

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            gauges.refresh()
            return self.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/stats")
    class Stats(View):
        async def get(self, request: Request) -> Response:
            rows = gauges.refresh()
            found = samples()
            out = {}
            for name, r in running.items():
                latency = buckets(found, "scoring_end_to_end_seconds", name)
                out[name] = {
                    "source_topic": r.pipeline.source_topic,
                    "events_in": by(found, "scoring_events_in_total", name),
                    "scored": by(found, "scoring_scored_total", name),
                    "duplicates": by(found, "scoring_duplicates_skipped_total", name),
                    "dead_letters": by(found, "scoring_dead_letters_total", name, "stage"),
                    "retries": by(found, "scoring_retries_total", name, "stage"),
                    "decisions": by(found, "scoring_decisions_total", name, "decision"),
                    "latency_buckets": latency,
                    "latency_p50": quantile(latency, 0.5),
                    "latency_p99": quantile(latency, 0.99),
                    "score_buckets": buckets(found, "scoring_score_ratio", name),
                    "models": {
                        "champion": r.models.champion.version,
                        "challenger": r.models.challenger.version if r.models.challenger else None,
                        "refused": len(r.models.refused),
                        "shadow_score_buckets": buckets(found, "scoring_shadow_score_ratio", name),
                        "shadow_decisions": by(found, "scoring_shadow_decisions_total", name, "agree"),
                        "labels": by(found, "scoring_labels_total", name, "outcome"),
                        **r.quality.summary(),
                    },
                }
            ok, why = readiness(app)
            dead = dead_letter_summary(service)
            dead.pop("recent", None)
            return self.json({
                "worker": str(app.conf.canonical_url),
                "time": time.time(),
                "ready": ok,
                "ready_reason": why,
                "pipelines": out,
                "lag": rows,
                "lag_total": sum(r["lag"] or 0 for r in rows),
                "ownership": ownership(app),
                "rebalances": app.rebalancing_count,
                "dead_letter_table": dead,
            })

    @app.page("/model")
    class Model(View):
        async def get(self, request: Request) -> Response:
            out = {}
            for name, r in running.items():
                live = r.models
                out[name] = {**describe(live.champion, r.pipeline), "promoted_at": live.promoted_at,
                             "challenger": describe(live.challenger, r.pipeline) if live.challenger else None,
                             "refused": live.refused}
            return self.json({"worker": str(app.conf.canonical_url), "pipelines": out})


def describe(model, pipeline) -> dict:
    return {
        "version": model.version,
        "features": list(pipeline.feature_names),
        "metrics": model.meta.get("metrics", {}),
        "training": model.meta.get("training", {}),
        "loaded_at": model.loaded_at,
    }
