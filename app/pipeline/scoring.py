"""One vectorised predict per batch; the rows a model rejects found and failed one by one.

A transient failure (a dependency briefly away) is retried in place (`app.retry`); any other
exception of the batch call means some row is poison: each row is then scored alone, and the rows
that still raise, or whose score is not a probability, fail at stage `score`.
"""
from __future__ import annotations

import logging
import time
from itertools import chain

import numpy as np

from app.errors import is_transient
from app.pipeline.fold import Item
from app.pipelines import Pipeline
from app.retry import RetryPolicy

log = logging.getLogger(__name__)


class Scoring:
    def __init__(self, pipeline: Pipeline, policy: RetryPolicy, metrics, faults=None) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.m = metrics
        self.faults = faults  # app.dev.faults.Faults: score:<pipeline>, score_poison:<event id>
        self._shadow_warned = 0.0

    async def __call__(self, items: list[Item], model) -> None:
        """Set `score` of every item, or fail it, and `reasons` of those scored at least
        `pipeline.reasons_at`; `model` is an `app.models.scorer.Scorer`."""
        t0 = time.perf_counter()
        p = self.pipeline
        rows = self._rows(items)
        async for attempt in self.policy.attempts():
            try:
                if self.faults is not None:
                    self.faults.check_score(p.name)
                    if self.faults.poisoned([it.value[p.id_field] for it in items]):
                        raise ValueError("model rejected an input row")
                scores = model.predict(rows)
                break
            except Exception as exc:
                if not is_transient(exc):
                    scores = self._each(items, rows, model)
                    break
                self.m.retries.labels("score").inc()
                last = exc
        else:
            for it in items:
                it.fail("score", last, attempts=self.policy.attempts_max)
            return
        self.m.score_seconds.observe(time.perf_counter() - t0)
        explain = []
        for i, (it, score) in enumerate(zip(items, scores.tolist())):
            if not it.ok:
                continue
            if not 0.0 <= score <= 1.0:  # NaN too
                it.fail("score", ValueError(f"model returned {score!r}"))
                continue
            it.score = score
            if p.reasons and score >= p.reasons_at:
                explain.append(i)
        if explain:
            explained = [items[i] for i in explain]
            for it, contrib in zip(explained, self._contributions(explained, rows[explain], model)):
                if it.ok:
                    it.reasons = self._reasons(contrib)

    def shadow(self, items: list[Item], challenger) -> None:
        """The challenger's score of each scored item, on the same rows: it decides nothing, and
        whatever it raises only leaves the items without a shadow score (one log line a minute)."""
        items = [it for it in items if it.ok]
        if not items:
            return
        try:
            scores = challenger.predict(self._rows(items)).tolist()
        except Exception as exc:
            if time.monotonic() - self._shadow_warned > 60:
                self._shadow_warned = time.monotonic()
                log.warning("%s challenger %s failed to score a batch: %r", self.pipeline.name,
                            challenger.version, exc)
            return
        for it, score in zip(items, scores):
            it.shadow = score if 0.0 <= score <= 1.0 else None

    def _rows(self, items: list[Item]) -> np.ndarray:
        width = len(self.pipeline.feature_names)
        try:
            return np.fromiter(chain.from_iterable(it.features for it in items), dtype=np.float64,
                               count=len(items) * width).reshape(len(items), width)
        except (TypeError, ValueError):  # a feature that is no number: those events fail, the others are scored
            rows = np.zeros((len(items), width))
            for i, it in enumerate(items):
                try:
                    rows[i] = np.fromiter(it.features, dtype=np.float64, count=width)
                except (TypeError, ValueError) as exc:
                    it.fail("features", ValueError(f"a feature is not a number: {exc}"))
            return rows

    def _each(self, items: list[Item], rows: np.ndarray, model) -> np.ndarray:
        """A batch predict raised: isolate the row(s) that the model rejects."""
        scores = np.full(len(items), np.nan)
        for i, it in enumerate(items):
            try:
                if self.faults is not None and self.faults.poisoned([it.value[self.pipeline.id_field]]):
                    raise ValueError("model rejected this input row")
                scores[i] = model.predict(rows[i:i + 1])[0]
            except Exception as exc:
                it.fail("score", exc)
        return scores

    def _contributions(self, items: list[Item], rows: np.ndarray, model) -> np.ndarray:
        try:
            return model.contributions(rows)
        except Exception:  # a row LightGBM cannot explain: find it, as for the scores
            out = np.zeros((len(items), rows.shape[1] + 1))
            for i, it in enumerate(items):
                try:
                    out[i] = model.contributions(rows[i:i + 1])[0]
                except Exception as exc:
                    it.fail("score", exc)
            return out

    def _reasons(self, contrib: np.ndarray) -> list[dict]:
        names = self.pipeline.feature_names
        top = np.argsort(-contrib[:-1])[: self.pipeline.reasons]
        return [{"feature": names[j], "contribution": round(float(contrib[j]), 4)} for j in top if contrib[j] > 0]
