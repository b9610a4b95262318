"""Prometheus metrics. Updated once per micro-batch where possible, never logged per event."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS_IN = Counter("scoring_events_in_total", "Source records handled", ["pipeline"], registry=registry)
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
SCORES = Histogram("scoring_score", "Distribution of scores", ["pipeline"],
                   buckets=tuple(i / 10 for i in range(1, 11)), registry=registry)
BATCH = Histogram("scoring_batch_size", "Events per micro-batch", ["pipeline"],
                  buckets=(1, 5, 10, 50, 100, 250, 500, 1000), registry=registry)
TABLE_KEYS = Gauge("scoring_table_keys", "Keys held on this worker", ["table"], registry=registry)
LAG = Gauge("scoring_consumer_lag", "Records behind the end of the partition", ["topic", "partition"],
            registry=registry)
REBALANCES = Counter("scoring_rebalances_total", "Partition rebalances seen by this worker", registry=registry)
# Outcome of a decision-making pipeline (fraud: approve / review / decline), one per scored event.
DECISIONS = Counter("scoring_decisions_total", "Scored events by decision", ["pipeline", "decision"],
                    registry=registry)


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
