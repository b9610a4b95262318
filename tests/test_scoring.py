"""Scoring a batch with the real fraud model: the reasons (TreeSHAP, hundreds of times the cost of
the prediction) are computed for the decisions a person reads, review and decline, and only for them,
unless FRAUD_REASONS=all; they are the same as LightGBM's contributions of that row alone."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app import metrics
from app.dev.inprocess import ConsumerRecord
from app.models.scorer import Scorer
from app.pipeline.fold import Item
from app.pipeline.scoring import Scoring
from app.pipelines import define
from app.retry import RetryPolicy
from app.settings import Settings
from tests.harness import MODEL_DIR
from training import fraud_sim
from training.train import replay


class CountingScorer(Scorer):
    """The real model, counting the rows it was asked to explain."""

    explained = 0

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        self.explained += len(rows)
        return super().contributions(rows)


def scored(monkeypatch, reasons: str):
    monkeypatch.setenv("FRAUD_REASONS", reasons)
    fraud = define(Settings())["fraud"]
    txns = [{k: v for k, v in t.items() if not k.startswith("_")} for t in fraud_sim.simulate(60, 10, 3)]
    rows = replay(fraud, txns)
    items = []
    for offset, row in enumerate(rows):
        it = Item(ConsumerRecord(fraud.source_topic, 0, offset, None, b"", []))
        it.features = tuple(row)
        items.append(it)
    model = CountingScorer(MODEL_DIR / "fraud", fraud.feature_names)
    asyncio.run(Scoring(fraud, RetryPolicy(), metrics.for_pipeline(fraud.name))(items, model))
    return fraud, rows, items, model


def top_reasons(fraud, model: Scorer, row: np.ndarray) -> list[dict]:
    contrib = model.booster.predict(row.reshape(1, -1), pred_contrib=True)[0][:-1]
    top = sorted(range(len(contrib)), key=lambda j: -contrib[j])[: fraud.reasons]
    return [{"feature": fraud.feature_names[j], "contribution": round(float(contrib[j]), 4)}
            for j in top if contrib[j] > 0]


def test_only_flagged_transactions_are_explained_by_default(monkeypatch):
    fraud, rows, items, model = scored(monkeypatch, "flagged")
    flagged = [i for i, it in enumerate(items) if it.score >= fraud.reasons_at]
    assert fraud.reasons_at == 0.5  # FRAUD_REVIEW_AT
    assert 0 < len(flagged) < len(items) / 10, "the sample has both, approvals the most"
    assert model.explained == len(flagged), "TreeSHAP ran on the flagged rows only"
    for i, it in enumerate(items):
        assert it.ok
        if i in flagged:
            assert it.reasons and it.reasons == top_reasons(fraud, model, rows[i])
        else:
            assert it.reasons is None  # the output says "reasons": []


def test_every_transaction_is_explained_with_fraud_reasons_all(monkeypatch):
    fraud, rows, items, model = scored(monkeypatch, "all")
    assert fraud.reasons_at == 0.0 and model.explained == len(items)
    for i in range(0, len(items), 37):
        assert items[i].reasons == top_reasons(fraud, model, rows[i])


@pytest.mark.parametrize("value", ["some", ""])
def test_fraud_reasons_takes_flagged_or_all(monkeypatch, value):
    monkeypatch.setenv("FRAUD_REASONS", value)
    if value:
        with pytest.raises(Exception, match="FRAUD_REASONS"):
            Settings()
    else:  # empty is unset
        assert Settings().fraud_reasons == "flagged"
