"""Model loading and batched scoring.

A model directory holds `model.txt` (LightGBM) and `meta.json` (version, feature names in order,
training metrics). A model whose feature list differs from the code's is refused at start-up: a
silently misaligned feature vector would score garbage with full confidence.
"""
from __future__ import annotations

import hashlib
import os
import time
from importlib.metadata import version as package_version
from pathlib import Path

import lightgbm as lgb
import lleaves
import numpy as np
import orjson
from llvmlite import binding as llvm

from app.models import model_text


class ModelMismatch(RuntimeError):
    pass


class Scorer:
    def __init__(self, model_dir: Path, feature_names: tuple[str, ...]) -> None:
        model_dir = Path(model_dir)
        model_file, meta_file = model_dir / "model.txt", model_dir / "meta.json"
        if not model_file.exists() or not meta_file.exists():
            raise ModelMismatch(f"no model in {model_dir}: run `make model` (or `scoring train`)")
        self.meta = orjson.loads(meta_file.read_bytes())
        model_text.check(model_file.read_bytes())
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
        self.compiled = compiled(model_file)
        self.loaded_at = time.time()

    def predict(self, rows: np.ndarray) -> np.ndarray:
        # The compiled trees: about a tenth of Booster.predict's time per row (bench/README.md), equal
        # to it within 1e-15. One thread: the worker shares two cores with the broker.
        return self.compiled.predict(rows, n_jobs=1)

    def contributions(self, rows: np.ndarray) -> np.ndarray:
        # LightGBM itself: lleaves computes no contributions.
        """Per-feature SHAP contributions (last column is the bias)."""
        return self.booster.predict(rows, pred_contrib=True, num_threads=1)

    def describe(self) -> dict:
        return {**self.meta, "loaded_at": self.loaded_at}


def compiled(model_file: Path) -> lleaves.Model:
    """The model's trees compiled to native code by lleaves, cached beside the model.

    Compiling takes a few seconds (training does it once); the cache is per model content, lleaves
    version and host CPU (the code is built for the CPU it runs on), written under a temporary name
    and renamed, so workers starting together never read a half-written file.
    """
    model = lleaves.Model(model_file=str(model_file))
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:12]
    cache = model_file.with_name(f"{model_file.stem}.{digest}.lleaves-{package_version('lleaves')}-"
                                 f"{llvm.get_host_cpu_name()}.so")
    if cache.exists():
        model.compile(cache=str(cache))
        return model
    partial = cache.with_name(f".{cache.name}.{os.getpid()}")
    try:
        model.compile(cache=str(partial))
        os.replace(partial, cache)
    except OSError:  # a read-only model directory (an image built on another CPU): compile in memory
        model.compile()
    return model
