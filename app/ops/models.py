"""`scoring models list`: the versions of a pipeline's model under MODEL_DIR."""
from __future__ import annotations

from pathlib import Path

import orjson

from app.models import registry


def listing(model_dir: Path, pipeline: str, as_json: bool) -> str:
    pipeline_dir = Path(model_dir) / pipeline
    entries = registry.listing(pipeline_dir)
    if as_json:
        return orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode()
    if not entries:
        raise SystemExit(f"scoring models: no {pipeline} model in {pipeline_dir}")
    return "\n".join(registry.table(entries))
