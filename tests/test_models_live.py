"""Models that change while the stream runs (issue 16), with real workers on the embedded broker:
a promotion reaches every worker through the control topic and switches between two batches (no
event lost or repeated, no rebalance, every output naming its model); a model with other features,
or a control record that does not parse, is refused while scoring goes on; rollback; a challenger
in shadow decides nothing, and its AUC beside the champion's comes from labels read back."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from app.models import control, registry
from app.pipelines import configured
from tests import fraud_fixtures
from tests.harness import MODEL_DIR, ROOT, produce_events, read_json
from tests.test_web import get_json, wait_until
from training import cart_sim
from training.train import fit, replay, write_model

CONTROL = "scoring-model-control"


def model_dir_with_another(tmp_path, name: str, seed: int = 3, features=None) -> tuple:
    """A MODEL_DIR with the default models (what workers load at start) and one more version of the
    pipeline's, trained in a moment on few rounds; `features` renames the other's features.
    (dir, start, other)."""
    target = tmp_path / "models"
    shutil.copytree(MODEL_DIR, target)
    pipeline = configured()[name]
    if name == "cart":
        events = [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(60, 2, seed)]
    else:
        events = fraud_fixtures.valid_transactions(40, 12, seed=seed)
    rows = replay(pipeline, events)
    y = np.random.default_rng(seed).integers(0, 2, len(rows))
    names = list(features or pipeline.feature_names)
    meta = write_model(target / name, fit(rows, y, names, 4),
                       {"pipeline": name, "features": names, "source": {"kind": "test"}}, current=False)
    return target, registry.current(target / name)["version"], meta["version"]


def cli(*args, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def models_of(worker, token: str | None = None) -> dict:
    return get_json(worker.url, "/model", token)["pipelines"]


def rebalances(worker) -> int:
    return get_json(worker.url, "/stats")["rebalances"]


def settled(*ws) -> list[int]:
    """Once every worker is ready and no rebalance came for 3 s: their rebalance counts."""
    from tests.test_web import get

    def quiet():
        counts = [rebalances(w) for w in ws]
        if not all(get(w.url, "/ready")[0] == 200 for w in ws):
            return None
        time.sleep(3)
        return counts if counts == [rebalances(w) for w in ws] else None

    return wait_until(quiet, 90, "workers ready and settled")


class Flow(threading.Thread):
    """Events produced at a steady rate while the test acts."""

    def __init__(self, broker, topic: str, events: list[dict], key: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.broker, self.topic, self.events, self.key, self.rate = broker, topic, events, key, rate
        self.sent_at: dict[str, float] = {}

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=5)
        await producer.start()
        try:
            for e in self.events:
                await (await producer.send(self.topic, orjson.dumps(e), key=e[self.key].encode()))
                self.sent_at[e["event_id"]] = time.monotonic()
                await asyncio.sleep(1 / self.rate)
        finally:
            await producer.stop()


def test_a_promotion_reaches_every_worker_between_batches_and_rolls_back(broker, workers, tmp_path):
    model_dir, start, other = model_dir_with_another(tmp_path, "cart")
    env = {"PIPELINES": "cart", "MODEL_DIR": str(model_dir)}
    w1, w2 = workers("w1", env=env), workers("w2", env=env)
    before = settled(w1, w2)
    events = [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(60, 2, 9)][:900]
    flow = Flow(broker, "cart_events", events, "user_id", rate=90)
    flow.start()
    time.sleep(3)
    out = cli("models", "promote", "cart", other, env={**env, "BROKER_URL": broker.url})
    assert f"promoted cart {other} (was {start})" in out
    wait_until(lambda: all(models_of(w)["cart"]["version"] == other for w in (w1, w2)), 60, "both switched")
    switched_at = time.monotonic()
    flow.join(60)

    outputs = read_json(broker, "personalization_scores", len(events), key="event_id")
    by_id = defaultdict(list)
    for o in outputs:
        by_id[o["event_id"]].append(o)
    assert set(by_id) == {e["event_id"] for e in events} and all(len(v) == 1 for v in by_id.values()), \
        "every event scored once: the switch lost and repeated nothing"
    versions = [by_id[e["event_id"]][0]["model_version"] for e in events]
    assert versions[0] == start and versions[-1] == other
    assert {v for e, v in zip(events, versions) if flow.sent_at[e["event_id"]] > switched_at + 1} == {other}
    per_user: dict = defaultdict(list)
    for e, v in zip(events, versions):
        per_user[e["user_id"]].append(v)
    assert all(vs == sorted(vs, key=[start, other].index) for vs in per_user.values()), \
        "a key's outputs switch once, from the old model to the new one"
    assert [rebalances(w) for w in (w1, w2)] == before, "no rebalance"

    listed = cli("models", "list", "cart", env={**env, "BROKER_URL": broker.url})
    assert any(other in line and "[promoted]" in line for line in listed.splitlines())
    out = cli("models", "rollback", "cart", env={**env, "BROKER_URL": broker.url})
    assert f"rolled cart back to {start} (was {other})" in out
    wait_until(lambda: all(models_of(w)["cart"]["version"] == start for w in (w1, w2)), 60, "both rolled back")

    # a model trained on other features, and a record that does not parse: refused, scoring goes on
    _, _, odd = model_dir_with_another(tmp_path / "odd", "cart", seed=5,
                                       features=["not_" + f for f in configured()["cart"].feature_names])
    odd_text = (tmp_path / "odd" / "models" / "cart" / odd / "model.txt").read_text()
    key, value = control.encode("cart", "champion", odd_text, {"features": []}, [start, other])
    # and a forged model whose tree sizes make LightGBM read past its buffer (before: SIGSEGV, every worker)
    start_text = (model_dir / "cart" / start / "model.txt").read_text()
    _, forged = control.encode("cart", "champion", re.sub(r"tree_sizes=(\d+)", "tree_sizes=999999999", start_text,
                                                          count=1), {"features": []}, [start, other])
    asyncio.run(send(broker, [(key, value), (key, forged), (key, b"\xff not json"), (b"nothing:champion", value)]))
    wait_until(lambda: all(len(models_of(w)["cart"]["refused"]) >= 3 for w in (w1, w2)), 60, "refusals reported")
    refused = models_of(w1)["cart"]["refused"]
    assert refused[0]["version"] == odd and "other features" in refused[0]["reason"]
    assert "tree_sizes do not match" in refused[1]["reason"]
    assert "does not parse" in refused[2]["reason"]
    assert all(models_of(w)["cart"]["version"] == start for w in (w1, w2)) and w1.alive() and w2.alive()
    assert "scoring_model_refused_total{pipeline=\"cart\"} 3.0" in metrics_text(w1)
    more = [{**e, "event_id": f"more-{i}"} for i, e in enumerate(events[:40])]
    produce_events(broker, "cart_events", more, "user_id")
    assert {o["model_version"] for o in read_json(broker, "personalization_scores", len(events) + len(more),
                                                   key="event_id") if o["event_id"].startswith("more-")} == {start}


def test_a_challenger_scores_in_shadow_and_is_judged_on_labels_that_come_back(broker, workers, tmp_path):
    model_dir, start, other = model_dir_with_another(tmp_path, "fraud")
    env = {"PIPELINES": "fraud", "MODEL_DIR": str(model_dir)}
    w = workers("w1", env=env)
    cli("models", "shadow", "fraud", other, env={**env, "BROKER_URL": broker.url})
    wait_until(lambda: (models_of(w)["fraud"]["challenger"] or {}).get("version") == other, 60, "challenger loaded")
    txns = fraud_fixtures.valid_transactions(30, 8, seed=21)
    produce_events(broker, "transactions", txns, "card_id")
    out = read_json(broker, "fraud_decisions", len(txns), key="txn_id")
    assert {o["model_version"] for o in out} == {start}, "the champion decides"
    assert all(o["shadow"]["model_version"] == other and 0 <= o["shadow"]["score"] <= 1
               and o["shadow"]["decision"] in ("approve", "review", "decline") for o in out)
    assert all(o["score"] != o["shadow"]["score"] for o in out[:5]), "two models, two scores"

    labels = [(None, orjson.dumps({"txn_id": o["txn_id"], "label": i % 2})) for i, o in enumerate(out)]
    labels += [(None, b"{bad"), (None, orjson.dumps({"txn_id": "never-scored", "label": 1}))]
    asyncio.run(send(broker, labels, topic="fraud_labels"))
    # keyless labels land on any partition, so the last two may be counted after the matched ones
    counted = {"matched": len(out), "invalid": 1, "unmatched": 1}
    models = wait_until(lambda: (m := get_json(w.url, "/stats")["pipelines"]["fraud"]["models"])["labels"] == counted
                        and m, 30, "labels counted")
    assert models["labelled"] == len(out)
    assert models["challenger"] == other and models["champion_auc"] is not None and models["challenger_auc"] is not None
    assert sum(models["shadow_decisions"].values()) == len(out)
    assert models["shadow_score_buckets"][-1][1] == len(out)

    cli("models", "shadow", "fraud", "--off", env={**env, "BROKER_URL": broker.url})
    wait_until(lambda: models_of(w)["fraud"]["challenger"] is None, 30, "shadow ended")


async def send(broker, records: list[tuple], topic: str = CONTROL) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=2 << 20)
    await producer.start()
    try:
        for key, value in records:
            await (await producer.send(topic, value, key=key))
    finally:
        await producer.stop()


def metrics_text(worker) -> str:
    import urllib.request

    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_a_model_registered_in_mlflow_is_promoted_and_served(broker, workers, tmp_path):
    """A local MLflow registry (sqlite, no server): the team registers our model files as a version
    with the alias `champion`; `scoring models promote cart models:/cart-scorer@champion` copies it
    into MODEL_DIR and every worker scores with it."""
    model_dir, start, other = model_dir_with_another(tmp_path, "cart", seed=11)
    # the team's MLflow: the other version, registered there and not in MODEL_DIR
    registered = tmp_path / "registered"
    shutil.move(str(model_dir / "cart" / other), registered)
    mlflow_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    script = f"""
import mlflow
from mlflow import MlflowClient
mlflow.set_experiment("cart")
with mlflow.start_run() as run:
    mlflow.log_artifacts({str(registered)!r}, artifact_path="model")
client = MlflowClient()
client.create_registered_model("cart-scorer")
mv = client.create_model_version("cart-scorer", run.info.artifact_uri + "/model", run_id=run.info.run_id)
client.set_registered_model_alias("cart-scorer", "champion", mv.version)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, **mlflow_env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    env = {"PIPELINES": "cart", "MODEL_DIR": str(model_dir)}
    w = workers("w1", env=env)
    out = cli("models", "promote", "cart", "models:/cart-scorer@champion",
              env={**env, **mlflow_env, "BROKER_URL": broker.url})
    assert f"promoted cart {other} (was {start})" in out
    assert registry.load(model_dir / "cart", other)["source"]["mlflow_uri"] == "models:/cart-scorer@champion"
    wait_until(lambda: models_of(w)["cart"]["version"] == other, 60, "the worker switched")
    events = [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(10, 1, 2)][:50]
    produce_events(broker, "cart_events", events, "user_id")
    assert {o["model_version"] for o in read_json(broker, "personalization_scores", len(events), key="event_id")} == {other}
