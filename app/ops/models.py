"""`scoring models list|promote|rollback|shadow`: the versions under MODEL_DIR, and which one every
running worker of a pipeline scores with (through the model control topic, app/models/control.py).

    scoring models list PIPELINE                 versions with their metrics; the promoted one marked
    scoring models promote PIPELINE VERSION      every worker switches to it between two batches
    scoring models rollback PIPELINE             back to the version promoted before the current one
    scoring models shadow PIPELINE VERSION|--off a challenger scores beside the champion, deciding nothing

VERSION is a version under MODEL_DIR/<pipeline>/, or an MLflow model URI (`models:/name@alias`,
with the `mlflow` extra), which is first copied into MODEL_DIR as a version of its own.
"""
from __future__ import annotations

from pathlib import Path

import orjson

from app.kafka import broadcast
from app.models import control, registry


class CommandError(SystemExit):
    pass


def listing(model_dir: Path, pipeline: str, as_json: bool, promoted: dict | None) -> str:
    """`promoted`: {"champion": version, "challenger": version} as the control topic says, or None
    when it could not be read (then only the model a worker loads at start is marked)."""
    pipeline_dir = Path(model_dir) / pipeline
    entries = registry.listing(pipeline_dir)
    for e in entries:
        e["promoted"] = bool(promoted) and promoted.get("champion") == e["version"]
        e["challenger"] = bool(promoted) and promoted.get("challenger") == e["version"]
    if as_json:
        return orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode()
    if not entries:
        raise CommandError(f"scoring models: no {pipeline} model in {pipeline_dir}")
    lines = registry.table(entries)
    if promoted is None:
        lines.append("(the model control topic could not be read: promotions are not shown)")
    elif not promoted.get("champion"):
        lines.append("nothing promoted yet: workers score with the model they load at start (*)")
    else:
        lines.append("[promoted]: every running worker scores with it; [shadow]: scores beside it, deciding nothing")
    return "\n".join(lines)


async def promoted(bootstrap: str, topic: str, pipeline_names) -> dict[str, dict]:
    """pipeline -> {"champion": Promotion, "challenger": Promotion}: the last of each on the topic."""
    out: dict[str, dict] = {}
    for r in await broadcast.read_all(bootstrap, topic):
        promotion, _ = control.parse(r.key, r.value, pipeline_names)
        if promotion is not None:
            roles = out.setdefault(promotion.pipeline, {})
            if promotion.version is None:
                roles.pop(promotion.role, None)
            else:
                roles[promotion.role] = promotion
    return out


def stored(model_dir: Path, pipeline, version: str) -> tuple[str, dict]:
    """(model text, metadata) of a version under MODEL_DIR, or of an MLflow model URI copied there;
    refused if its features are not the code's."""
    pipeline_dir = Path(model_dir) / pipeline.name
    if version.startswith("models:/"):
        from app.models import mlflow_source

        version = mlflow_source.copy_into(version, pipeline_dir)
    try:
        meta = registry.load(pipeline_dir, version)
    except KeyError:
        known = [m["version"] for m in registry.versions(pipeline_dir)]
        raise CommandError(f"scoring models: no version {version!r} of {pipeline.name} in {pipeline_dir} "
                           f"(there are: {', '.join(known) or 'none'})") from None
    if tuple(meta.get("features", ())) != tuple(pipeline.feature_names):
        raise CommandError(f"scoring models: {pipeline.name} {version} was trained on other features than this "
                           f"code computes: workers would refuse it")
    return (registry.version_dir(pipeline_dir, version) / registry.MODEL).read_text(), meta


async def publish(bootstrap: str, topic: str, key: bytes, value: bytes | None) -> None:
    from aiokafka import AIOKafkaProducer

    from app import security

    await broadcast.ensure_topic(bootstrap, topic, compacted=True)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=control.MAX_RECORD_BYTES + 4096,
                                **security.client_kwargs())
    await producer.start()
    try:
        await (await producer.send(topic, value, key=key))
    finally:
        await producer.stop()


async def promote(bootstrap: str, topic: str, model_dir: Path, pipeline, version: str, pipelines) -> str:
    text, meta = stored(model_dir, pipeline, version)
    version = meta["version"]
    current = (await promoted(bootstrap, topic, pipelines)).get(pipeline.name, {}).get("champion")
    if current is not None:
        earlier = [current.version, *current.history]
    else:  # the first promotion: before it, workers scored with the model they load at start
        at_start = registry.current(Path(model_dir) / pipeline.name)
        earlier = [at_start["version"]] if at_start else []
    history = [v for v in earlier if v != version]
    await _send(bootstrap, topic, pipeline, "champion", text, meta, history)
    was = earlier[0] if earlier else "the model loaded at start"
    return f"promoted {pipeline.name} {version} (was {was}): every running worker switches between two batches"


async def rollback(bootstrap: str, topic: str, model_dir: Path, pipeline, pipelines) -> str:
    current = (await promoted(bootstrap, topic, pipelines)).get(pipeline.name, {}).get("champion")
    if current is None or not current.history:
        raise CommandError(f"scoring models: nothing to roll back to: {pipeline.name} has "
                           f"{'no promotion before ' + current.version if current else 'never been promoted'}")
    previous = current.history[0]
    text, meta = stored(model_dir, pipeline, previous)
    await _send(bootstrap, topic, pipeline, "champion", text, meta, list(current.history[1:]))
    return f"rolled {pipeline.name} back to {previous} (was {current.version})"


async def shadow(bootstrap: str, topic: str, model_dir: Path, pipeline, version: str | None) -> str:
    if version is None:
        await publish(bootstrap, topic, control.key_of(pipeline.name, "challenger"), None)
        return f"{pipeline.name}: no challenger scores in shadow any more"
    text, meta = stored(model_dir, pipeline, version)
    await _send(bootstrap, topic, pipeline, "challenger", text, meta, [])
    return f"{pipeline.name} {meta['version']} scores in shadow beside the champion, deciding nothing"


async def _send(bootstrap, topic, pipeline, role, text, meta, history) -> None:
    try:
        key, value = control.encode(pipeline.name, role, text, meta, history)
    except control.PromotionError as exc:
        raise CommandError(f"scoring models: {exc}") from None
    await publish(bootstrap, topic, key, value)
