"""Models from an MLflow model registry: `scoring models promote cart models:/cart-scorer@champion`.

A team that keeps its models in MLflow registers a version whose artifacts hold the LightGBM model
text (`model.txt`, anywhere in the artifacts) and, if it has one, our `meta.json`; the URI is
resolved with MLflow's own client (MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: a server, or a
database such as sqlite, whose schema must be of the same MLflow version), its files copied into MODEL_DIR as a version of the registry
(app/models/registry.py), and promoted from there like any other: the workers never talk to MLflow.
MLflow is optional: `pip install '.[mlflow]'`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightgbm as lgb
import orjson

from app.models import registry


class MlflowUnavailable(SystemExit):
    pass


def copy_into(uri: str, pipeline_dir: Path) -> str:
    """The model at `uri` (models:/<name>@<alias> or models:/<name>/<version>) as a version under
    `pipeline_dir`; its version."""
    # no telemetry thread (it looks hosts up), no INFO lines from the store's migrations
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        import mlflow
    except ImportError:
        raise MlflowUnavailable(f"{uri}: MLflow is not installed (pip install '.[mlflow]')") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as exc:
            raise MlflowUnavailable(f"{uri}: {type(exc).__name__}: {str(exc)[:300]}") from None
        found = sorted(local.rglob(registry.MODEL))
        if not found:
            raise MlflowUnavailable(f"{uri}: no {registry.MODEL} in the model's artifacts")
        text = found[0].read_text()
        meta_file = found[0].with_name(registry.META)
        meta = orjson.loads(meta_file.read_bytes()) if meta_file.exists() else {}
    meta.setdefault("features", lgb.Booster(model_str=text).feature_name())
    meta["source"] = {**(meta.get("source") or {}), "mlflow_uri": uri}
    return registry.save(pipeline_dir, text, meta)["version"]
