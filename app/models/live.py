"""The models a pipeline scores with now: a champion that decides, maybe a challenger in shadow.

The processor reads both once per batch (`Processor.handle`), so a switch happens between two
batches: a batch is scored by one model, and every output names its version. A promotion from the
control topic (app/models/control.py) is applied here: the model's files are written under
DATA_DIR/models/<pipeline>/<version>/, its trees compiled in a process of their own (seconds of CPU
the worker's loop must not spend), the model loaded and checked against the code's features. A
model that does not fit is refused with the reason (`refused`, shown by /model; a metric; a log
line) and the pipeline keeps what it has: a worker never stops for a promotion.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from app import metrics
from app.kafka import broadcast
from app.models import control, model_text, registry
from app.models.control import Promotion
from app.models.scorer import Scorer

log = logging.getLogger(__name__)

REFUSED_KEPT = 5
# The models of these pipelines compile in a few seconds; the bound stops a forged one from holding
# model control (and a core) at every start.
COMPILE_TIMEOUT_S = 300.0


class LiveModels:
    def __init__(self, pipeline, champion: Scorer, store: Path) -> None:
        self.pipeline = pipeline
        self.champion = champion
        self.challenger: Scorer | None = None
        self.store = Path(store) / pipeline.name  # where received models are kept
        self.refused: list[dict] = []  # the last refusals, newest last
        self.promoted_at: int | None = None
        metrics.set_model(pipeline.name, champion.version)

    async def apply(self, promotion: Promotion) -> None:
        """Switch to what `promotion` names, or refuse it; never raises."""
        name, role = self.pipeline.name, promotion.role
        if promotion.version is None:  # the challenger's shadow ended
            if self.challenger is not None:
                log.info("%s challenger %s no longer scores in shadow", name, self.challenger.version)
                self.challenger = None
                metrics.set_challenger(name, None)
            return
        current = self.champion if role == "champion" else self.challenger
        if current is not None and current.version == promotion.version:
            return
        try:
            model = await self._load(promotion)
        except Exception as exc:  # a model file that will not load is refused like a mismatch
            self._refuse(promotion, f"{type(exc).__name__}: {exc}"[:500])
            return
        if role == "champion":
            before, self.champion, self.promoted_at = self.champion.version, model, promotion.promoted_at
            metrics.set_model(name, model.version)
            log.info("%s now scores with model %s (was %s)", name, model.version, before)
        else:
            self.challenger = model
            metrics.set_challenger(name, model.version)
            log.info("%s challenger %s scores in shadow beside %s", name, model.version, self.champion.version)

    async def _load(self, promotion: Promotion) -> Scorer:
        model_text.check(promotion.model_text.encode())  # before anything reads it (BadModel: refused)
        folder = self.store / promotion.version
        if not (folder / registry.META).exists():
            registry.save(self.store, promotion.model_text, {**promotion.meta, "version": promotion.version})
        model_file = folder / registry.MODEL
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "app.models.compile", str(model_file),
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:  # a model made to take the compiler a very long time
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"compiling the model took more than {COMPILE_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the model failed: {err.decode(errors='replace')[-300:]}")
        return Scorer(folder, self.pipeline.feature_names)  # ModelMismatch: other features than the code's

    def _refuse(self, promotion: Promotion, why: str) -> None:
        self.refused = [*self.refused, {"version": promotion.version, "role": promotion.role, "reason": why,
                                        "at": time.time()}][-REFUSED_KEPT:]
        metrics.MODEL_REFUSED.labels(self.pipeline.name).inc()
        log.warning("%s model %s refused, still scoring with %s: %s", self.pipeline.name, promotion.version,
                    self.champion.version, why)

    def refuse_record(self, why: str) -> None:
        """A control record for this pipeline that does not parse."""
        self._refuse(Promotion(self.pipeline.name, "?", None, None, {}, (), None), why)



class ModelControl:
    """Follows the control topic and applies each promotion to the pipeline it names."""

    START_WAIT_S = 60.0  # the agents wait this long at most for the promotions made before the start

    def __init__(self, live: dict[str, LiveModels], pipelines, bootstrap: str, topic: str) -> None:
        self.live, self.pipelines, self.bootstrap, self.topic = live, pipelines, bootstrap, topic
        self.ready = asyncio.Event()

    async def run(self) -> None:
        await broadcast.follow(self.bootstrap, self.topic, self._start, self._one)

    async def wait_ready(self) -> None:
        """Until the promotions made before this worker started are applied (bounded)."""
        try:
            await asyncio.wait_for(self.ready.wait(), self.START_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("model control topic %s not read after %.0f s: scoring with the models loaded at start",
                        self.topic, self.START_WAIT_S)

    async def _start(self, records: list) -> None:
        newest = {}
        for r in records:  # only the last promotion of each key matters now
            newest[r.key] = r
        for r in newest.values():
            await self._one(r)
        self.ready.set()

    async def _one(self, record) -> None:
        promotion, why = control.parse(record.key, record.value, self.pipelines)
        if promotion is None:
            name = (record.key or b"").split(b":", 1)[0].decode(errors="replace")
            if name in self.live:
                self.live[name].refuse_record(why)
            else:
                log.warning("control record at offset %s refused: %s", record.offset, why)
            return
        if promotion.pipeline in self.live:
            await self.live[promotion.pipeline].apply(promotion)
