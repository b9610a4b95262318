"""Replay simulated history through the serving code path, train LightGBM, write model + metadata.

Events go through the same `decode` (so numbers are typed exactly as online), the same
`UseCase.apply` and `UseCase.features` as the agents. The held-out set is a time split: the last
20% of events by event time, as the model would meet the future.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import orjson

from app.codec import decode
from app.scorer import compiled
from app.usecases import UseCase

SEED = 7


def progress(label: str):
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total} ({100 * done // max(total, 1)}%) {time.monotonic() - start:.0f}s",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    return report


def replay(uc: UseCase, events: list[dict], report=None) -> np.ndarray:
    """Feature rows for `events` (in order), exactly as a worker computes them."""
    states: dict[str, dict] = {}
    rows = np.empty((len(events), len(uc.feature_names)), dtype=np.float64)
    step = max(1, len(events) // 20)
    for i, raw in enumerate(events):
        event = decode(orjson.dumps(raw), uc.schema, 1 << 20, uc.check)
        key = event[uc.key_field]
        state = uc.apply(states.get(key) or uc.new_state(), event)
        states[key] = state
        rows[i] = uc.features(state, event)
        if report and ((i + 1) % step == 0 or i + 1 == len(events)):
            report(i + 1, len(events))
    return rows


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


def write_model(model_dir: Path, booster: lgb.Booster, meta: dict) -> dict:
    model_dir.mkdir(parents=True, exist_ok=True)
    text = booster.model_to_string()
    meta = {"version": hashlib.sha256(text.encode()).hexdigest()[:12], **meta}
    (model_dir / "model.txt").write_text(text)
    (model_dir / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    for stale in model_dir.glob("model.*.so"):  # compiled earlier models
        stale.unlink()
    compiled(model_dir / "model.txt")  # now, so that workers start without compiling
    return meta
