"""Train the conversion-propensity model from simulated shoppers."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.pipelines import configured
from domain.session import BASELINE_FEATURES
from training import cart_sim
from training.train import SEED, auc, fit, progress, replay, split, window, write_model


def train(model_dir: Path, n_users: int = 4000, days: float = 14, rounds: int = 200) -> dict:
    cart = configured()["cart"]
    events = cart_sim.simulate(n_users, days, SEED, progress=progress("simulating shoppers"))
    y = np.array([e["_label"] for e in events])
    ts = np.array([e["ts"] for e in events])
    X = replay(cart, events, progress("replaying through feature code"))
    train_mask, test_mask = split(ts)
    names = list(cart.feature_names)
    print(f"training on {train_mask.sum()} events, holding out {test_mask.sum()} (last 20% by event time)")
    model = fit(X[train_mask], y[train_mask], names, rounds, log_every=50)
    base_cols = [names.index(f) for f in BASELINE_FEATURES]
    baseline = fit(X[train_mask][:, base_cols], y[train_mask], list(BASELINE_FEATURES), rounds)
    metrics = {
        "auc_holdout": round(auc(y[test_mask], model.predict(X[test_mask])), 4),
        "auc_baseline_holdout": round(auc(y[test_mask], baseline.predict(X[test_mask][:, base_cols])), 4),
        "baseline_features": list(BASELINE_FEATURES),
        "events_train": int(train_mask.sum()),
        "events_holdout": int(test_mask.sum()),
        "positive_rate": round(float(y.mean()), 4),
    }
    meta = write_model(model_dir, model, {
        "pipeline": "cart", "features": names, "metrics": metrics,
        "training": {"users": n_users, "days": days, "rounds": rounds, "seed": SEED},
        "source": {"kind": "simulator", "module": "training.cart_sim", "seed": SEED}, "window": window(ts)})
    print(f"model {meta['version']}: held-out AUC {metrics['auc_holdout']} "
          f"(baseline without session recency: {metrics['auc_baseline_holdout']})")
    return meta
