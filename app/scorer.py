"""Model loading and batched scoring.

A model directory holds `model.txt` (LightGBM) and `meta.json` (version, feature names in order,
training metrics). A model whose feature list differs from the code's is refused at start-up: a
silently misaligned feature vector would score garbage with full confidence.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import orjson


class ModelMismatch(RuntimeError):
    pass


class Scorer:
    def __init__(self, model_dir: Path, feature_names: tuple[str, ...]) -> None:
        model_dir = Path(model_dir)
        model_file, meta_file = model_dir / "model.txt", model_dir / "meta.json"
        if not model_file.exists() or not meta_file.exists():
            raise ModelMismatch(f"no model in {model_dir}: run `make model` (or `scoring train`)")
        self.meta = orjson.loads(meta_file.read_bytes())
        self.booster = lgb.Booster(model_file=str(model_file))
        found = tuple(self.booster.feature_name())
        if found != tuple(feature_names) or tuple(self.meta.get("features", ())) != tuple(feature_names):
            missing = [f for f in feature_names if f not in found]
            extra = [f for f in found if f not in feature_names]
            raise ModelMismatch(
                f"model in {model_dir} was trained on other features than this code computes "
                f"(missing {missing}, unexpected {extra}, or a different order): retrain it"
            )
        self.version: str = self.meta["version"]
        self.loaded_at = time.time()

    def predict(self, rows: np.ndarray) -> np.ndarray:
        # One thread: the worker shares two cores with the broker, and batches are small.
        return self.booster.predict(rows, num_threads=1)

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        """Per-feature SHAP contributions (last column is the bias)."""
        return self.booster.predict(rows, pred_contrib=True, num_threads=1)

    def describe(self) -> dict:
        return {**self.meta, "loaded_at": self.loaded_at}
