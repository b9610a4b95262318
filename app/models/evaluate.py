"""Held-out evaluation: ROC and precision-recall curves, average precision, thresholds.

Scores are compared at their distinct values (tied scores move together), so the area under
`roc_curve` equals the rank AUC of `training.train.auc` (training uses these too) with ties averaged.
"""
from __future__ import annotations

import numpy as np


def _counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when flagging scores >= each distinct score, highest first."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order].astype(np.float64), p[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tp = np.cumsum(ys)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp, ps[last_of_tie]


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), from (0, 0) to (1, 1)."""
    tp, fp, _ = _counts(y, p)
    n_pos, n_neg = tp[-1], fp[-1]
    return np.r_[0.0, fp / max(n_neg, 1)], np.r_[0.0, tp / max(n_pos, 1)]


def pr_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct threshold, highest threshold first."""
    tp, fp, _ = _counts(y, p)
    return tp / max(tp[-1], 1), tp / (tp + fp)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve (trapezoids); None when the held-out part has one class only."""
    if y.min() == y.max():
        return None
    fpr, tpr = roc_curve(y, p)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y: np.ndarray, p: np.ndarray) -> float | None:
    """PR-AUC as average precision: sum over thresholds of (recall gained) x precision there
    (the step-wise area, as scikit-learn computes it; no optimistic interpolation)."""
    if y.max() == 0 or y.min() == 1:
        return None
    recall, precision = pr_curve(y, p)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Flagged count, precision and recall of `score >= threshold` (the service's rule)."""
    flagged = p >= threshold
    tp = int((flagged & (y == 1)).sum())
    n_flagged, n_pos = int(flagged.sum()), int((y == 1).sum())
    return {
        "threshold": threshold,
        "flagged": n_flagged,
        "precision": round(tp / n_flagged, 4) if n_flagged else None,
        "recall": round(tp / n_pos, 4) if n_pos else None,
    }


def thin(x: np.ndarray, y: np.ndarray, most: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most `most` points of a curve, evenly by index, first and last kept (for drawing)."""
    if len(x) <= most:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, len(x) - 1, most).astype(int), len(x) - 1])
    return x[idx], y[idx]
