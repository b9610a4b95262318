"""`scoring train --events / --from-topic`: training on a user's recorded events, the registry,
`scoring models list`, and parity with a real worker on a model trained from a user's file."""
from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import orjson
import pytest

from app.cli import main
from app.models import registry
from app.models.scorer import Scorer
from app.pipelines import configured
from app.settings import current
from tests.harness import ROOT, produce, read_json
from training import cart_sim, fraud_sim, recorded
from training.train import auc, fold, replay, split

CART = configured()["cart"]
FRAUD = configured()["fraud"]

ROUNDS = "30"  # enough to learn something, quick to train and compile
VERSION_LINE = re.compile(r"version: ([0-9a-f]{12})")
BAD_LINES = [  # (line, stage the worker would dead-letter it at)
    (b"this is not json", "decode"),
    (b'{"event_id":"b1","user_id":"u1","ts":1700000000000,"type":"teleport","category":"c","price":1,"quantity":1}',
     "validate"),
    (b'{"event_id":"b2","user_id":"u1","ts":1700000000000,"type":"add_to_cart","category":"c","price":1,"quantity":1}',
     "validate"),  # add_to_cart without product_id: the pipeline's check
    (b"[1, 2, 3]", "decode"),
]


def cli(*argv: str) -> list[str]:
    """Run `scoring ...` in this process; its stdout lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(list(argv))
    return out.getvalue().splitlines()


def version_of(lines: list[str]) -> str:
    match = VERSION_LINE.fullmatch(lines[-1])
    assert match, f"last line is not the version: {lines[-1]!r}"
    return match.group(1)


def user_file_events(n_users: int = 1000, days: float = 3, seed: int = 21) -> list[dict]:
    """What a user's export looks like: simulated shoppers, some events of a user sharing a
    timestamp, lines not quite in event-time order."""
    events = [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(n_users, days, seed)]
    last_of: dict[str, dict] = {}
    for k, e in enumerate(events):
        prev = last_of.get(e["user_id"])
        if prev is not None and k % 9 == 0 and e["ts"] - prev["ts"] < 60_000:
            e["ts"] = prev["ts"]  # a tie within one user: the file's order decides
        last_of[e["user_id"]] = e
    rng = random.Random(seed)
    for start in range(0, len(events) - 6, 6):  # nearby lines swapped: not sorted
        block = events[start:start + 6]
        rng.shuffle(block)
        events[start:start + 6] = block
    return events


def write_lines(path: Path, events: list[dict], bad: list[bytes] = ()) -> Path:
    lines = [orjson.dumps(e) for e in events]
    for k, b in enumerate(bad):  # bad lines spread through the file
        lines.insert(k * 97, b)
    lines.insert(50, b"   ")  # a blank line is skipped, not bad
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def replay_order(events: list[dict]) -> list[dict]:
    """Event time, ties in file order: the order training replays (and a worker must meet) them."""
    return sorted(events, key=lambda e: e["ts"])


@pytest.fixture(scope="module")
def cart_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cart-data")
    events = user_file_events()
    return events, write_lines(d / "events.jsonl", events, [b for b, _ in BAD_LINES])


@pytest.fixture(scope="module")
def cart_model(cart_file, tmp_path_factory):
    """A model trained by `scoring train --events` on the user's file, in an empty model dir."""
    events, path = cart_file
    model_dir = tmp_path_factory.mktemp("models")
    lines = cli("train", "--pipeline", "cart", "--events", str(path), "--model-dir", str(model_dir), "--rounds", ROUNDS)
    return model_dir, version_of(lines), lines


# -- training from a file -----------------------------------------------------------------------

def test_a_file_trains_a_version_that_becomes_current_when_there_is_none(cart_file, cart_model):
    events, _ = cart_file
    model_dir, version, lines = cart_model
    vdir = model_dir / "cart" / version
    text = (vdir / "model.txt").read_text()
    assert registry.version_of(text) == version, "version is the content hash of the model file"
    meta = orjson.loads((vdir / "meta.json").read_bytes())
    assert meta["version"] == version and meta["pipeline"] == "cart"
    assert meta["features"] == list(CART.feature_names)
    assert meta["source"]["kind"] == "file" and meta["source"]["events"] == len(events)
    assert meta["training"]["events_used"] == len(events)
    # no current model before: this one is current, and a worker's Scorer loads it
    assert (model_dir / "cart" / "model.txt").read_text() == text
    assert orjson.loads((model_dir / "cart" / "meta.json").read_bytes())["version"] == version
    assert Scorer(model_dir / "cart", CART.feature_names).version == version
    assert f"current model: {version} (there was none)" in lines


def test_bad_lines_are_counted_and_reported_with_their_line_numbers(cart_model):
    model_dir, version, lines = cart_model
    src = orjson.loads((model_dir / "cart" / version / "meta.json").read_bytes())["source"]
    assert src["bad"] == len(BAD_LINES)
    # line numbers in the file: bad line k was inserted at index k * 97, then the blank line at index 50
    expected_lines = [1, 99, 196, 293]
    assert [s.split(":")[0] for s in src["bad_samples"]] == [f"line {n}" for n in expected_lines]
    assert [s.split(": ")[1] for s in src["bad_samples"]] == [stage for _, stage in BAD_LINES]
    assert f"bad records: {len(BAD_LINES)} (skipped; the worker would dead-letter them); first:" in lines
    assert any(line.strip().startswith("line 99: validate: Invalid enum value 'teleport'") for line in lines)


def test_the_gzip_file_gives_the_same_model_and_does_not_replace_the_current_one(cart_file, cart_model, tmp_path):
    events, _ = cart_file
    model_dir, version, _ = cart_model
    gz = write_lines(tmp_path / "events.jsonl.gz", events, [b for b, _ in BAD_LINES])
    lines = cli("train", "--pipeline", "cart", "--events", str(gz), "--model-dir", str(model_dir), "--rounds", ROUNDS)
    assert version_of(lines) == version, "same events, same model: same version"
    meta = orjson.loads((model_dir / "cart" / version / "meta.json").read_bytes())
    assert meta["source"]["gzip"] is True and meta["source"]["bad"] == len(BAD_LINES)
    assert f"current model: {version} (unchanged)" in lines
    # the version's metadata now tells of the gzip file, and so does the current one's (same model)
    assert orjson.loads((model_dir / "cart" / "meta.json").read_bytes()) == meta


def test_the_metrics_in_meta_json_are_those_of_the_model_on_the_held_out_events(cart_file, cart_model):
    _, path = cart_file
    model_dir, version, lines = cart_model
    meta = orjson.loads((model_dir / "cart" / version / "meta.json").read_bytes())
    m = meta["metrics"]
    # recompute from scratch: the file through the worker's code, the time split, the stored model
    rec = recorded.read_file("cart", path, quiet=True)
    data = recorded.build(rec, quiet=True)
    train_mask, test_mask = split(rec.ts, 0.2)
    booster = lgb.Booster(model_file=str(model_dir / "cart" / version / "model.txt"))
    p = booster.predict(data.rows[test_mask])
    assert m["auc_holdout"] == round(auc(data.y[test_mask], p), 4)
    assert m["events_train"] == train_mask.sum() and m["events_holdout"] == test_mask.sum()
    assert m["positives_holdout"] == data.y[test_mask].sum() > 0
    assert m["holdout_from_ts"] == rec.ts[test_mask].min() > rec.ts[train_mask].max()
    assert 0.6 < m["auc_holdout"] <= 1 and 0 < m["pr_auc_holdout"] <= 1
    assert m["pr_auc_holdout"] > m["positives_holdout"] / m["events_holdout"], "better than chance"
    assert 0.5 <= m["auc_baseline_holdout"] < m["auc_holdout"]
    assert m["baseline_features"] == ["event_type", "price", "purchases_total", "sessions_total"]
    assert set(m["recency_features"]) == set(CART.feature_names) - set(m["baseline_features"])
    assert meta["window"]["from_ts"] == rec.ts.min() and meta["window"]["to_ts"] == rec.ts.max()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", meta["trained_at"])
    table = "\n".join(lines)
    assert re.search(rf"model\s+{m['auc_holdout']:.4f}\s+{m['pr_auc_holdout']:.4f}", table)
    assert re.search(rf"baseline\s+{m['auc_baseline_holdout']:.4f}\s+{m['pr_auc_baseline_holdout']:.4f}", table)


def test_the_report_has_the_curves_histograms_and_feature_importance(cart_model):
    model_dir, version, lines = cart_model
    html = (model_dir / "cart" / version / "report.html").read_text()
    assert f"report: {model_dir / 'cart' / version / 'report.html'}" in lines
    for chart in ("roc", "pr", "hist", "hist-baseline", "importance"):
        assert f'<svg id="{chart}"' in html
    roc = html[html.index('<svg id="roc"'):html.index("</svg>", html.index('<svg id="roc"'))]
    model_curve = re.search(r'data-series="model" points="([^"]+)"', roc).group(1).split()
    assert len(model_curve) > 20, "a curve, not a line"
    xs, ys = zip(*((float(a), float(b)) for a, b in (pt.split(",") for pt in model_curve)))
    assert list(xs) == sorted(xs) and list(ys) == sorted(ys, reverse=True), "ROC rises monotonically (SVG y down)"
    assert 'data-series="baseline"' in roc
    pr = html[html.index('<svg id="pr"'):]
    assert re.search(r'data-series="model" points="[^"]+"', pr)
    hist = html[html.index('<svg id="hist"'):]
    assert 'data-series="positives"' in hist and 'data-series="negatives"' in hist
    for name in CART.feature_names:
        assert f'data-feature="{name}"' in html


def test_a_file_where_no_event_parses_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(b for b, _ in BAD_LINES) + b"\n")
    model_dir = tmp_path / "models"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "train", "--pipeline", "cart", "--events", str(bad),
                           "--model-dir", str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "version:" not in proc.stdout and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"scoring train: no record of {bad} is a valid cart event (4 bad; first: line 1: decode")
    assert not (model_dir / "cart").exists()

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(SystemExit, match="holds no events"):
        cli("train", "--pipeline", "cart", "--events", str(empty), "--model-dir", str(model_dir))
    with pytest.raises(SystemExit, match="cannot read"):
        cli("train", "--pipeline", "cart", "--events", str(tmp_path / "missing.jsonl"), "--model-dir", str(model_dir))


def test_cart_labels_are_this_session_buys_later_on_the_serving_sessions():
    t0 = 1_700_000_000_000
    gap = int(current().session_gap_s * 1000)

    def ev(i, user, dt, kind):
        e = {"event_id": f"e{i}", "user_id": user, "ts": t0 + dt, "type": kind, "category": "c", "price": 1.0,
             "quantity": 1}
        return e if kind == "page_view" else {**e, "product_id": "p"}

    events = [
        ev(0, "a", 0, "page_view"), ev(1, "a", 1000, "add_to_cart"), ev(2, "b", 1500, "page_view"),
        ev(3, "a", 2000, "purchase"), ev(4, "a", 3000, "page_view"), ev(5, "a", 4000, "purchase"),
        ev(6, "a", 4000 + gap + 1, "page_view"),  # a new session: no purchase follows in it
        ev(7, "b", 5000, "add_to_cart"),
    ]
    folded = fold(CART, [orjson.dumps(e) for e in events], keep=recorded.cart_keep)
    # before the session's first purchase: 1; the purchase and what follows it: 0; other sessions apart
    assert recorded.cart_labels(folded.kept).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]

    # the simulator's own label, where its sessions are the serving sessions (99.8% of events)
    sim = cart_sim.simulate(200, 3, 4)
    folded = fold(CART, [orjson.dumps({k: v for k, v in e.items() if k != "_label"}) for e in sim],
                           keep=recorded.cart_keep)
    agree = (recorded.cart_labels(folded.kept) == np.array([e["_label"] for e in sim])).mean()
    assert agree > 0.99


# -- fraud: labels from a file ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fraud_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fraud-data")
    sim = fraud_sim.simulate(250, 20, 13)
    txns = [{k: v for k, v in t.items() if not k.startswith("_")} for t in sim]
    rng = random.Random(3)
    labelled = [t for t in sim if t["_label"] or rng.random() < 0.5]  # every fraud, half the rest
    labels = [orjson.dumps({"txn_id": t["txn_id"], "label": t["_label"]}) for t in labelled]
    labels.insert(3, b'{"txn_id": "x", "label": 2}')       # bad label line
    labels.append(b'{"txn_id": "nowhere-1", "label": 1}')  # matches no transaction
    (d / "txns.jsonl").write_bytes(b"\n".join(orjson.dumps(t) for t in txns) + b"\n")
    (d / "labels.jsonl").write_bytes(b"\n".join(labels) + b"\n")
    return sim, txns, labelled, d


def test_fraud_trains_on_labels_unlabelled_transactions_negative_or_left_out(fraud_files, tmp_path):
    sim, txns, labelled, d = fraud_files
    n_fraud = sum(t["_label"] for t in sim)
    assert n_fraud > 50
    args = ["train", "--pipeline", "fraud", "--events", str(d / "txns.jsonl"), "--labels", str(d / "labels.jsonl"),
            "--model-dir", str(tmp_path)]  # the default rounds: few rounds never reach the decline threshold
    lines = cli(*args)
    meta = orjson.loads((tmp_path / "fraud" / version_of(lines) / "meta.json").read_bytes())
    m, lab = meta["metrics"], meta["labels"]
    assert meta["training"]["events_used"] == len(txns), "unlabelled transactions count as negatives"
    assert m["positives_train"] + m["positives_holdout"] == n_fraud
    assert lab["transactions_labelled"] == len(labelled) and lab["bad"] == 1 and lab["unmatched"] == 1
    assert lab["bad_samples"] == ["line 4: 'label' must be 0 or 1, got 2"]
    for name, threshold in (("review", current().fraud_review_at), ("decline", current().fraud_decline_at)):
        assert m[name]["threshold"] == threshold and 0 < m[name]["precision"] <= 1 and 0 < m[name]["recall"] <= 1
        assert m[f"baseline_{name}"]["threshold"] == threshold
    assert m["auc_holdout"] > 0.95 and m["pr_auc_holdout"] > 0.5
    assert m["baseline_features"] == ["amount", "channel", "mcc", "hour_of_day"]
    table = "\n".join(lines)
    assert re.search(rf"review >= {current().fraud_review_at}\s+{m['review']['precision']:.4f}\s+"
                     rf"{m['review']['recall']:.4f}", table)

    only = cli(*args, "--labelled-only")
    meta = orjson.loads((tmp_path / "fraud" / version_of(only) / "meta.json").read_bytes())
    assert meta["training"]["events_used"] == len(labelled)
    assert meta["metrics"]["positives_train"] + meta["metrics"]["positives_holdout"] == n_fraud
    assert "unlabelled transactions left out (--labelled-only)" in "\n".join(only)
    assert version_of(only) != version_of(lines)

    # left out of training, the unlabelled transactions still built the cards' state
    data = recorded.build(recorded.read_file("fraud", d / "txns.jsonl", quiet=True),
                          recorded.read_labels(d / "labels.jsonl"), labelled_only=True, quiet=True)
    assert data.use.sum() == len(labelled)
    assert np.array_equal(data.rows, replay(FRAUD, replay_order(txns)))

    with pytest.raises(SystemExit, match="labelled 0: nothing to learn .pass --labels."):
        cli("train", "--pipeline", "fraud", "--events", str(d / "txns.jsonl"), "--model-dir", str(tmp_path))


# -- the registry -------------------------------------------------------------------------------

def test_models_list_marks_the_current_version_and_promote_local_moves_it(cart_file, tmp_path):
    events, path = cart_file
    first = version_of(cli("train", "--pipeline", "cart", "--events", str(path), "--model-dir", str(tmp_path),
                           "--rounds", ROUNDS))
    other = write_lines(tmp_path / "fewer.jsonl", events[: len(events) * 3 // 4])
    lines = cli("train", "--pipeline", "cart", "--events", str(other), "--model-dir", str(tmp_path), "--rounds", ROUNDS)
    second = version_of(lines)
    assert second != first
    assert f"current model stays {first}" in "\n".join(lines)

    listing = cli("models", "list", "cart", "--model-dir", str(tmp_path))
    rows = {line[2:14]: line for line in listing if re.match(r"[ *] [0-9a-f]{12}", line)}
    assert set(rows) == {first, second}
    assert rows[first].startswith("* ") and rows[second].startswith("  ")
    meta2 = orjson.loads((tmp_path / "cart" / second / "meta.json").read_bytes())
    assert f"{meta2['metrics']['auc_holdout']:.4f}" in rows[second] and meta2["trained_at"] in rows[second]
    assert str(other.resolve()) in rows[second] and str(path.resolve()) in rows[first]

    lines = cli("train", "--pipeline", "cart", "--events", str(other), "--model-dir", str(tmp_path), "--rounds", ROUNDS,
                "--promote-local")
    assert version_of(lines) == second
    assert (tmp_path / "cart" / "model.txt").read_bytes() == (tmp_path / "cart" / second / "model.txt").read_bytes()
    as_json = orjson.loads("\n".join(cli("models", "list", "cart", "--model-dir", str(tmp_path), "--json")))
    assert {m["version"]: m["current"] for m in as_json} == {first: False, second: True}
    # one compiled model beside the current one: the promoted one
    assert [p.name.split(".")[1] for p in (tmp_path / "cart").glob("model.*.so")] == [second]


def test_a_current_model_from_before_the_registry_is_listed(tmp_path):
    pipeline_dir = tmp_path / "cart"
    pipeline_dir.mkdir()
    (pipeline_dir / "model.txt").write_text("tree")
    (pipeline_dir / "meta.json").write_bytes(orjson.dumps({"version": "0123456789ab", "metrics": {"auc_holdout": 0.7}}))
    listing = cli("models", "list", "cart", "--model-dir", str(tmp_path))
    assert any(line.startswith("* 0123456789ab") and "not stored as a version" in line for line in listing)
    with pytest.raises(SystemExit, match="no fraud model"):
        cli("models", "list", "fraud", "--model-dir", str(tmp_path))


# -- from a topic, and parity with a worker -----------------------------------------------------

def test_training_from_a_topic_reads_its_retained_history(broker, cart_file, tmp_path):
    events, path = cart_file
    ordered = replay_order(events)
    records = [(e["user_id"].encode(), orjson.dumps(e)) for e in ordered]
    records[10:10] = [(b"u1", b"{nope"), (b"u2", None)]

    asyncio.run(produce(broker, CART.source_topic, records))
    env = {**os.environ, "BROKER_URL": broker.url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "train", "--pipeline", "cart", "--from-topic",
                           CART.source_topic, "--model-dir", str(tmp_path), "--rounds", ROUNDS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = version_of(proc.stdout.splitlines())
    meta = orjson.loads((tmp_path / "cart" / version / "meta.json").read_bytes())
    src = meta["source"]
    assert src["kind"] == "topic" and src["topic"] == CART.source_topic
    assert src["events"] == len(events), "every event up to the end, the last batch of each partition too"
    assert src["bad"] == 2 and src["bad_samples"][1].endswith("decode: record has no value")

    # the same features per event as from the file (a key's events share a partition, in order)
    from_file = recorded.build(recorded.read_file("cart", path, quiet=True), quiet=True)
    by_id = dict(zip((orjson.loads(r)["event_id"] for r in recorded.read_file("cart", path, quiet=True).raws),
                     map(tuple, from_file.rows)))
    since, until = ordered[len(ordered) // 4]["ts"], ordered[len(ordered) * 3 // 4]["ts"]
    rec = recorded.read_topic("cart", CART.source_topic, broker.url, since, until, quiet=True)
    assert len(rec.raws) == sum(since <= e["ts"] < until for e in events)
    assert rec.source["outside_window"] == len(events) - len(rec.raws)
    full = recorded.read_topic("cart", CART.source_topic, broker.url, quiet=True)
    rows = recorded.build(full, quiet=True).rows
    assert all(by_id[orjson.loads(r)["event_id"]] == tuple(row) for r, row in zip(full.raws, rows))


def test_a_worker_on_a_model_trained_from_a_file_publishes_the_training_features(broker, workers, cart_file,
                                                                                cart_model):
    """Parity: the worker's features for the file's events equal `scoring train`'s, bit for bit."""
    events, path = cart_file
    model_dir, version, _ = cart_model
    workers("w1", env={"MODEL_DIR": str(model_dir), "PIPELINES": "cart"})
    ordered = replay_order(events)
    records = [(None, b) for b, _ in BAD_LINES] + [(e["user_id"].encode(), orjson.dumps(e)) for e in ordered]

    asyncio.run(produce(broker, CART.source_topic, records))
    out = read_json(broker, CART.output_topic, len(events), key="event_id")
    by_id = {o["event_id"]: o for o in out}
    assert len(by_id) == len(out) == len(events)

    rec = recorded.read_file("cart", path, quiet=True)
    training = recorded.build(rec, quiet=True).rows
    ids = [orjson.loads(r)["event_id"] for r in rec.raws]
    assert ids == [e["event_id"] for e in ordered]
    online = np.array([by_id[i]["features"] for i in ids])
    assert np.array_equal(online, training), "worker features differ from `scoring train`'s"
    assert {o["model_version"] for o in out} == {version}
    scores = np.array([by_id[i]["score"] for i in ids])
    assert np.array_equal(scores, Scorer(model_dir / "cart", CART.feature_names).predict(training))
