"""Replay simulated history through the serving code path, train LightGBM, write model + metadata.

Events go through the same `decode` (so numbers are typed exactly as online), the same
`Pipeline.apply` and `Pipeline.features` as the agents. The held-out set is a time split: the last
20% of events by event time, as the model would meet the future.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import lightgbm as lgb
import numpy as np
import orjson

from app.models import registry
from app.models.scorer import compiled
from app.pipeline.codec import decode
from app.pipelines import Pipeline

SEED = 7


def progress(label: str):
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} ({100 * done // max(total, 1)}%) {time.monotonic() - start:.0f}s",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    return report


class Folded:
    """What `fold` gives: one feature row per event (in order), the events the worker would have
    dead-lettered at its `features` stage, and whatever `keep(state, event)` returned per event."""

    __slots__ = ("rows", "failed", "kept")

    def __init__(self, rows: np.ndarray, failed: list[tuple[int, str]], kept: list | None) -> None:
        self.rows, self.failed, self.kept = rows, failed, kept


def fold(pipe: Pipeline, raws: Sequence[bytes], report=None, keep=None, max_bytes: int = 1 << 20) -> Folded:
    """Replay raw event values (in this order) exactly as a worker does: the same `decode`, the same
    `apply` and `features`, one state per key, the state after each event read for its features.

    An event whose `apply` or `features` raises is what the worker dead-letters at its `features`
    stage: the state stays as it was, its row is NaN and its index is listed in `failed`. `keep`, if
    given, is called with (state after, event) for every event and its results returned in order
    (`None` for a failed event); training uses it to read labels off the serving state. Every
    training path (simulated or recorded) comes through here.
    """
    states: dict[str, dict] = {}
    n = len(raws)
    rows = np.empty((n, len(pipe.feature_names)), dtype=np.float64)
    failed: list[tuple[int, str]] = []
    kept: list | None = [] if keep is not None else None
    schema, check, key_field = pipe.schema, pipe.check, pipe.key_field
    apply, features, new_state = pipe.apply, pipe.features, pipe.new_state
    step = max(1, n // 20)
    for i, raw in enumerate(raws):
        event = decode(raw, schema, max_bytes, check)
        key = event[key_field]
        try:
            state = apply(states.get(key) or new_state(), event)
            rows[i] = features(state, event)
        except Exception as exc:  # as the worker: this event fails, the stream and the state go on
            rows[i] = np.nan
            failed.append((i, f"features: {type(exc).__name__}: {exc}"))
            if kept is not None:
                kept.append(None)
        else:
            states[key] = state
            if kept is not None:
                kept.append(keep(state, event))
        if report and ((i + 1) % step == 0 or i + 1 == n):
            report(i + 1, n)
    return Folded(rows, failed, kept)


def replay(pipe: Pipeline, events: list[dict], report=None) -> np.ndarray:
    """Feature rows for `events` (dicts, in order), exactly as a worker computes them."""
    folded = fold(pipe, [orjson.dumps(raw) for raw in events], report)
    if folded.failed:
        raise ValueError(f"{len(folded.failed)} event(s) failed in the feature code, first: {folded.failed[0]}")
    return folded.rows


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Rank-based ROC AUC (ties averaged)."""
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "seed": SEED,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 2,
    "verbose": -1,
}


def fit(X: np.ndarray, y: np.ndarray, names: list[str], rounds: int, log_every: int = 0) -> lgb.Booster:
    callbacks = [lgb.log_evaluation(log_every)] if log_every else []
    data = lgb.Dataset(X, y, feature_name=names, free_raw_data=False)
    return lgb.train(PARAMS, data, num_boost_round=rounds, valid_sets=[data] if log_every else None,
                     callbacks=callbacks)


def split(ts: np.ndarray, held_out: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    cut = np.quantile(ts, 1 - held_out)
    return ts < cut, ts >= cut


def iso(ms: int | float) -> str:
    """Epoch ms as ISO 8601 UTC, to the millisecond."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def window(ts: np.ndarray) -> dict:
    """The event-time span of training data, for the metadata."""
    lo, hi = int(ts.min()), int(ts.max())
    return {"from_ts": lo, "to_ts": hi, "from": iso(lo), "to": iso(hi)}


def write_model(model_dir: Path, booster: lgb.Booster, meta: dict, files: dict | None = None,
                current: bool = True) -> dict:
    """Store the model as a version of the registry (`<model_dir>/<version>/`, app/models/registry.py) and,
    when `current`, make it the model workers load (`<model_dir>/model.txt` + `meta.json`), compiled
    now so that workers start without compiling. Returns the metadata, `version` first."""
    meta = registry.save(model_dir, booster.model_to_string(),
                         {**meta, "trained_at": meta.get("trained_at") or iso(time.time() * 1000)}, files)
    if current:
        registry.make_current(model_dir, meta["version"])
        compiled(model_dir / registry.MODEL)
    return meta
