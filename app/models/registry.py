"""On-disk model registry: every trained model kept under its version, one of them current.

    <MODEL_DIR>/<pipeline>/<version>/model.txt     LightGBM model text
    <MODEL_DIR>/<pipeline>/<version>/meta.json     version, features, training window (event time),
                                                   data source, metrics, trained_at
    <MODEL_DIR>/<pipeline>/<version>/report.html   held-out evaluation (recorded-event training)
    <MODEL_DIR>/<pipeline>/model.txt + meta.json   the current model: what a worker loads at start

The version is the first 12 hex digits of the SHA-256 of the model text, the same hash
`app.models.scorer.compiled` names its native-code cache by: the same model trained twice is one version.
Pure file operations, no Kafka: live promotion to running workers is built on top of this. Every
file is written under a temporary name and renamed, so a reader never sees half a file; the current
model's `model.txt` is replaced before its `meta.json`.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import orjson

MODEL, META, REPORT = "model.txt", "meta.json", "report.html"
VERSION = re.compile(r"[0-9a-f]{12}")


def version_of(model_text: str | bytes) -> str:
    data = model_text.encode() if isinstance(model_text, str) else model_text
    return hashlib.sha256(data).hexdigest()[:12]


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)


def _dump(meta: dict) -> bytes:
    return orjson.dumps(meta, option=orjson.OPT_INDENT_2)


def save(pipeline_dir: Path, model_text: str, meta: dict, files: dict[str, bytes | str] | None = None) -> dict:
    """Store a model as a version of its own; returns its metadata with `version` first.

    Saving the same model text again replaces that version's metadata and files (a retrain on the
    same data gives the same model, with a newer `trained_at`).
    """
    version = version_of(model_text)
    meta = {"version": version, **{k: v for k, v in meta.items() if k != "version"}}
    target = Path(pipeline_dir) / version
    write_atomic(target / MODEL, model_text)
    for name, data in (files or {}).items():
        write_atomic(target / name, data)
    write_atomic(target / META, _dump(meta))  # last: a version directory with meta.json is complete
    return meta


def version_dir(pipeline_dir: Path, version: str) -> Path:
    return Path(pipeline_dir) / version


def load(pipeline_dir: Path, version: str) -> dict:
    """The metadata of one stored version; KeyError if there is no such version."""
    path = version_dir(pipeline_dir, version)
    if not VERSION.fullmatch(version) or not (path / META).exists() or not (path / MODEL).exists():
        raise KeyError(f"no version {version!r} in {pipeline_dir}")
    return orjson.loads((path / META).read_bytes())


def versions(pipeline_dir: Path) -> list[dict]:
    """Metadata of every stored version, oldest first (by trained_at, then version)."""
    found = []
    root = Path(pipeline_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if path.is_dir() and VERSION.fullmatch(path.name) and (path / META).exists() and (path / MODEL).exists():
            try:
                meta = orjson.loads((path / META).read_bytes())
            except orjson.JSONDecodeError:
                continue
            found.append(meta)
    return sorted(found, key=lambda m: (m.get("trained_at") or "", m["version"]))


def current(pipeline_dir: Path) -> dict | None:
    """Metadata of the current model (the one a worker loads), or None."""
    root = Path(pipeline_dir)
    if not (root / MODEL).exists() or not (root / META).exists():
        return None
    return orjson.loads((root / META).read_bytes())


def make_current(pipeline_dir: Path, version: str) -> dict:
    """Copy a stored version to `<pipeline_dir>/model.txt` + `meta.json`, the files a worker loads
    at start (running workers keep the model they loaded). Native-code caches of other models
    beside it are removed; the caller compiles the new one (`app.models.scorer.compiled`)."""
    root = Path(pipeline_dir)
    meta = load(root, version)
    src = version_dir(root, version)
    write_atomic(root / MODEL, (src / MODEL).read_bytes())
    write_atomic(root / META, (src / META).read_bytes())
    for stale in root.glob("model.*.so"):
        if not stale.name.startswith(f"model.{version}."):
            stale.unlink(missing_ok=True)
    return meta


def listing(pipeline_dir: Path) -> list[dict]:
    """Every stored version's metadata, oldest first, each with `current` (it is the model a worker
    loads) and `registered` (False only for a current model that was never stored as a version:
    one trained before the registry existed)."""
    stored, now = versions(pipeline_dir), current(pipeline_dir)
    out = [{**m, "current": bool(now) and m["version"] == now["version"], "registered": True} for m in stored]
    if now and not any(m["current"] for m in out):
        out.append({**now, "current": True, "registered": False})
    return out


def _source(src: dict) -> str:
    kind = src.get("kind")
    if kind == "file":
        return str(src.get("path"))
    if kind == "topic":
        return f"topic {src.get('topic')}"
    if kind == "simulator":
        return f"simulator ({src.get('module', '')})"
    return "?"


def table(entries: list[dict]) -> list[str]:
    """`scoring models list`: one line per version; * marks the one a worker loads at start,
    [promoted] the one every running worker scores with, [shadow] a challenger (when known)."""
    def num(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"  {'version':<14}{'trained at':<26}{'AUC':>7}{'PR-AUC':>8}{'base AUC':>9}{'events':>10}  source"]
    for m in entries:
        metrics = m.get("metrics", {})
        events = (metrics.get("events_train", metrics.get("transactions_train", 0))
                  + metrics.get("events_holdout", metrics.get("transactions_holdout", 0)))
        lines.append(f"{'*' if m['current'] else ' '} {m['version']:<14}{(m.get('trained_at') or '?'):<26}"
                     f"{num(metrics.get('auc_holdout')):>7}{num(metrics.get('pr_auc_holdout')):>8}"
                     f"{num(metrics.get('auc_baseline_holdout')):>9}{events:>10,}  {_source(m.get('source', {}))}"
                     + ("" if m["registered"] else "  (current only: not stored as a version)")
                     + ("  [promoted]" if m.get("promoted") else "") + ("  [shadow]" if m.get("challenger") else ""))
    lines.append("* current: the model a worker loads at start (<MODEL_DIR>/<pipeline>/model.txt)")
    return lines
