"""Prometheus metrics. Updated once per micro-batch where possible, never logged per event.

Names carry their unit (`_seconds`, `_bytes`, `_records`, `_events`, `_ratio`) and counters end in
`_total`, as Prometheus' naming conventions ask. The process (CPU, memory, open files), GC and
platform collectors are on the same registry, so one scrape of /metrics has them all.
The Grafana dashboard and the alert rules in deploy/ use these names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

registry = CollectorRegistry()
ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
GCCollector(registry=registry)  # python_gc_collections_total, ... per generation
PlatformCollector(registry=registry)  # python_info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS_IN = Counter("scoring_events_in_total", "Input records handled (a repartitioned record once)", ["pipeline"], registry=registry)
SCORED = Counter("scoring_scored_total", "Events scored and published", ["pipeline"], registry=registry)
DEAD = Counter("scoring_dead_letters_total", "Events sent to the dead-letter topic", ["pipeline", "stage"],
               registry=registry)
RETRIES = Counter("scoring_retries_total", "Retried operations", ["pipeline", "stage"], registry=registry)
DUPLICATES = Counter("scoring_duplicates_skipped_total", "Replayed events already in the state",
                     ["pipeline"], registry=registry)
LATENCY = Histogram("scoring_end_to_end_seconds", "Event time to publish", ["pipeline"],
                    buckets=_LATENCY_BUCKETS, registry=registry)
SCORE_SECONDS = Histogram("scoring_predict_seconds", "Model time per micro-batch", ["pipeline"],
                          buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5), registry=registry)
# A score is a probability in [0, 1]: a ratio.
SCORES = Histogram("scoring_score_ratio", "Distribution of scores", ["pipeline"],
                   buckets=tuple(i / 10 for i in range(1, 11)), registry=registry)
BATCH = Histogram("scoring_batch_events", "Events per micro-batch", ["pipeline"],
                  buckets=(1, 5, 10, 50, 100, 250, 500, 1000), registry=registry)
TABLE_KEYS = Gauge("scoring_table_keys", "Keys held on this worker", ["table"], registry=registry)
LAG = Gauge("scoring_consumer_lag_records", "Records behind the end of the partition", ["topic", "partition"],
            registry=registry)
# A standby copy's distance from the end of its changelog partition (app/kafka/standby.py): how much
# a failover to this worker would still have to read.
STANDBY_LAG = Gauge("scoring_standby_lag_records", "Changelog records a standby copy is behind",
                    ["topic", "partition"], registry=registry)
REBALANCES = Counter("scoring_rebalances_total", "Partition rebalances seen by this worker", registry=registry)
# Outcome of a decision-making pipeline (fraud: approve / review / decline), one per scored event.
DECISIONS = Counter("scoring_decisions_total", "Scored events by decision", ["pipeline", "decision"],
                    registry=registry)
# The model each pipeline scores with: scoring_model_info{pipeline="cart",version="c92dc2fadb4c"} 1.
MODEL = Info("scoring_model", "Model a pipeline scores with", ["pipeline"], registry=registry)
# Fill of each agent's intake (app/kafka/intake.py: fetched records not yet taken into a batch); at its
# capacity (2 x BATCH_MAX records) fetching stops: backpressure.
INTAKE_RECORDS = Gauge("scoring_intake_records", "Fetched records waiting in the intake", ["pipeline"],
                       registry=registry)
INTAKE_BYTES = Gauge("scoring_intake_bytes", "Bytes of the records waiting in the intake (keys and values)",
                     ["pipeline"], registry=registry)
# Records that took the repartition hop: keyed by something else than the state key, or by its
# CRC32 (librdkafka's default partitioner) instead of murmur2. Each costs a second trip through the broker.
REPARTITIONED = Counter("scoring_repartitioned_total", "Records forwarded through the repartition topic",
                        ["pipeline"], registry=registry)
# A challenger in shadow (app/models/live.py): its version, its scores, how often its decision is the
# champion's, and the promotions refused (a model whose features are not the code's, or a record that
# does not parse).
CHALLENGER = Info("scoring_challenger", "Model scoring in shadow beside the champion", ["pipeline"],
                  registry=registry)
SHADOW_SCORES = Histogram("scoring_shadow_score_ratio", "Distribution of the challenger's scores", ["pipeline"],
                          buckets=tuple(i / 10 for i in range(1, 11)), registry=registry)
SHADOW_AGREEMENT = Counter("scoring_shadow_decisions_total", "Events by whether the challenger's decision is the "
                           "champion's", ["pipeline", "agree"], registry=registry)
MODEL_REFUSED = Counter("scoring_model_refused_total", "Promoted models a worker refused", ["pipeline"],
                        registry=registry)
LABELS = Counter("scoring_labels_total", "Labels read back, by whether they matched a recent score",
                 ["pipeline", "outcome"], registry=registry)
# One write-behind flush of the state (RocksDB + changelog, until the broker acknowledged it).
STATE_FLUSH = Histogram("scoring_state_flush_seconds", "Time to write and confirm the unwritten state",
                        ["pipeline"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                2.5, 5, 10), registry=registry)


# 1 while this worker's /ready answers 200 (recovery done, partitions assigned, no rebalance), else 0;
# read at each scrape from the function given to `watch_readiness` (the web view's readiness check).
READY = Gauge("scoring_ready", "1 when the worker is ready (as /ready), else 0", registry=registry)


def watch_readiness(check) -> None:
    """`check()` returns (ok, reason), as app/web/health.py's readiness check; evaluated at each scrape."""
    READY.set_function(lambda: 1.0 if check()[0] else 0.0)


def watch_intake(pipeline: str, sink) -> None:
    """The intake gauges of `pipeline` read `sink.size` and `sink.bytes` (app/kafka/intake.py's RecordSink)
    at each scrape: nothing is counted per batch."""
    INTAKE_RECORDS.labels(pipeline).set_function(lambda: sink.size)
    INTAKE_BYTES.labels(pipeline).set_function(lambda: sink.bytes)


def set_model(pipeline: str, version: str) -> None:
    """Publish the version of the model `pipeline` scores with (at load and at every reload)."""
    MODEL.labels(pipeline).info({"version": str(version)})


def set_challenger(pipeline: str, version: str | None) -> None:
    CHALLENGER.labels(pipeline).info({"version": str(version or "")})


@dataclass(frozen=True)
class PipelineMetrics:
    events_in: object
    scored: object
    dead_letters: object
    retries: object
    duplicates: object
    latency: object
    score_seconds: object
    scores: object
    batch_size: object
    decisions: object
    repartitioned: object
    shadow_scores: object
    shadow_agreement: object


def for_pipeline(name: str) -> PipelineMetrics:
    return PipelineMetrics(
        events_in=EVENTS_IN.labels(name),
        scored=SCORED.labels(name),
        dead_letters=_Bound(DEAD, name),
        retries=_Bound(RETRIES, name),
        duplicates=DUPLICATES.labels(name),
        latency=LATENCY.labels(name),
        score_seconds=SCORE_SECONDS.labels(name),
        scores=SCORES.labels(name),
        batch_size=BATCH.labels(name),
        decisions=_Bound(DECISIONS, name),
        repartitioned=REPARTITIONED.labels(name),
        shadow_scores=SHADOW_SCORES.labels(name),
        shadow_agreement=_Bound(SHADOW_AGREEMENT, name),
    )


class _Bound:
    """A labelled metric with the pipeline label already filled in."""

    def __init__(self, metric, pipeline: str) -> None:
        self.metric, self.pipeline = metric, pipeline

    def labels(self, *rest: str):
        return self.metric.labels(self.pipeline, *rest)


def observe_many(histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for each value, with one increment per touched bucket (and the sum).

    Uses the client's bucket layout (non-cumulative counts, `le` bounds); if that ever changes,
    falls back to observing one by one.
    """
    if not len(values):
        return
    bounds, buckets = getattr(histogram, "_upper_bounds", None), getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None:
        for v in values.tolist():
            histogram.observe(v)
        return
    # the first bound >= v: the bucket `observe` picks
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))
