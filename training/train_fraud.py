"""Train the card-fraud model from simulated card holders.

The simulated history is replayed through the serving code path (`training.train.replay`: the same
decode, `domain.card.apply` and `domain.card.features` as the worker), LightGBM is trained on the
first 80% by event time and evaluated on the last 20%: ROC AUC, and precision / recall at the
review and decline thresholds the service applies (settings FRAUD_REVIEW_AT, FRAUD_DECLINE_AT).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app.models.evaluate import at_threshold
from app.pipelines import configured
from app.settings import current
from training import fraud_sim
from training.train import SEED, auc, fit, progress, replay, split, window, write_model

# What a model without per-card state sees: the transaction alone. Trained beside the real model to
# show what the card's recent history adds.
BASELINE_FEATURES = ("amount", "channel", "mcc", "hour_of_day")


def train(model_dir: Path, n_cards: int = 3000, days: float = 30, rounds: int = 150) -> dict:
    start = time.monotonic()
    fraud, settings = configured()["fraud"], current()
    txns = fraud_sim.simulate(n_cards, days, SEED, progress=progress("simulating card holders"))
    y = np.array([t["_label"] for t in txns])
    ts = np.array([t["ts"] for t in txns])
    patterns = np.array([t["_pattern"] for t in txns])
    X = replay(fraud, txns, progress("replaying through feature code"))
    train_mask, test_mask = split(ts)
    names = list(fraud.feature_names)
    print(f"training on {train_mask.sum()} transactions ({int(y[train_mask].sum())} fraud), holding out "
          f"{test_mask.sum()} ({int(y[test_mask].sum())} fraud; last 20% by event time)")
    model = fit(X[train_mask], y[train_mask], names, rounds, log_every=50)
    p = model.predict(X[test_mask])
    base_cols = [names.index(f) for f in BASELINE_FEATURES]
    baseline = fit(X[train_mask][:, base_cols], y[train_mask], list(BASELINE_FEATURES), rounds)
    p_base = baseline.predict(X[test_mask][:, base_cols])
    yt, pt = y[test_mask], patterns[test_mask]
    review = at_threshold(yt, p, settings.fraud_review_at)
    decline = at_threshold(yt, p, settings.fraud_decline_at)
    recall_by_pattern = {
        pattern: {
            "transactions": int((pt == pattern).sum()),
            "recall_review": round(float((p[pt == pattern] >= settings.fraud_review_at).mean()), 4),
            "recall_decline": round(float((p[pt == pattern] >= settings.fraud_decline_at).mean()), 4),
        }
        for pattern in ("card_testing", "takeover", "high_value") if (pt == pattern).any()
    }
    legit = pt == "legit"
    metrics = {
        "auc_holdout": round(auc(yt, p), 4),
        "auc_baseline_holdout": round(auc(yt, p_base), 4),
        "baseline_features": list(BASELINE_FEATURES),
        "baseline_review": at_threshold(yt, p_base, settings.fraud_review_at),
        "baseline_decline": at_threshold(yt, p_base, settings.fraud_decline_at),
        "review": review,
        "decline": decline,
        "false_positive_rate_review": round(float((p[legit] >= settings.fraud_review_at).mean()), 5),
        "recall_by_pattern": recall_by_pattern,
        "transactions_train": int(train_mask.sum()),
        "transactions_holdout": int(test_mask.sum()),
        "fraud_rate": round(float(y.mean()), 4),
    }
    meta = write_model(model_dir, model, {
        "pipeline": "fraud", "features": names, "metrics": metrics,
        "training": {"cards": n_cards, "days": days, "rounds": rounds, "seed": SEED,
                     "seconds": round(time.monotonic() - start, 1)},
        "source": {"kind": "simulator", "module": "training.fraud_sim", "seed": SEED}, "window": window(ts)})
    print(f"model {meta['version']}: held-out AUC {metrics['auc_holdout']} (without card state: "
          f"{metrics['auc_baseline_holdout']}); "
          f"review >= {review['threshold']}: precision {review['precision']} recall {review['recall']}; "
          f"decline >= {decline['threshold']}: precision {decline['precision']} recall {decline['recall']}")
    return meta
