"""The champion and the challenger judged on the same events, once their labels come back.

While a challenger scores in shadow, the last RECENT events scored by both are remembered by id
(`record`, fed by the processor). Labels arrive later and from elsewhere (fraud: chargebacks and
reviews) on the pipeline's label topic, `{"<id field>": ..., "label": 0 or 1}`; a label of a
remembered event adds (label, champion score, challenger score) to a window of the last LABELLED
ones, from which `summary` gives both models' AUC on the same events. Bounded in memory; a label
that does not parse, or names no remembered event, is counted and dropped (it is a side channel,
not an input: nothing to dead-letter).
"""
from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np
import orjson

from app import metrics
from app.models.evaluate import roc_auc

RECENT = 100_000
LABELLED = 10_000


class ShadowQuality:
    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self._recent: OrderedDict[str, tuple[float, float, str, str]] = OrderedDict()
        self._labelled: deque = deque(maxlen=LABELLED)  # (label, both scores, both versions)
        self._labels = metrics.LABELS

    def record(self, items) -> None:
        """The scored items of a batch; those with a shadow score are remembered."""
        recent, id_field = self._recent, self.pipeline.id_field
        for it in items:
            shadow = it.output.get("shadow")
            if shadow is not None:
                if self._labelled and self._labelled[-1][4] != shadow["model_version"]:
                    self._labelled.clear()  # another challenger: judged on its own events
                    recent.clear()
                recent[it.value[id_field]] = (it.score, shadow["score"], it.output["model_version"],
                                              shadow["model_version"])
        while len(recent) > RECENT:
            recent.popitem(last=False)

    def label(self, value: bytes | None) -> None:
        """One record of the label topic."""
        name = self.pipeline.name
        try:
            body = orjson.loads(value)
            event_id, label = body[self.pipeline.id_field], body["label"]
            if label not in (0, 1) or isinstance(label, bool) or not isinstance(event_id, str):
                raise ValueError(label)
        except Exception:
            self._labels.labels(name, "invalid").inc()
            return
        scores = self._recent.pop(event_id, None)
        if scores is None:
            self._labels.labels(name, "unmatched").inc()
            return
        self._labels.labels(name, "matched").inc()
        self._labelled.append((label, *scores))

    def summary(self) -> dict:
        """Both models' AUC over the labelled window, for the models that scored those events."""
        rows = list(self._labelled)
        out = {"labelled": len(rows), "remembered": len(self._recent), "champion_auc": None, "challenger_auc": None}
        if rows:
            y = np.array([r[0] for r in rows])
            out["champion_auc"] = roc_auc(y, np.array([r[1] for r in rows]))
            out["challenger_auc"] = roc_auc(y, np.array([r[2] for r in rows]))
            out["champion_version"], out["challenger_version"] = rows[-1][3], rows[-1][4]
        return out
