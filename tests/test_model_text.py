"""A model from the control topic is checked as text before LightGBM or lleaves reads it: anyone who
can write the topic can forge one that hashes to its version. Before the check, a model whose first
`tree_sizes` entry was 999999999 made `lgb.Booster` read past its buffer: SIGSEGV in every worker,
again at every start."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.models import control, model_text, registry
from app.models.live import LiveModels
from app.models.scorer import Scorer
from app.pipelines import configured
from tests.harness import MODEL_DIR

CART = configured()["cart"]
REAL = (MODEL_DIR / "cart" / registry.MODEL).read_bytes()
STRUCTURE = (b"tree_sizes", b"num_leaves", b"split_feature", b"left_child", b"right_child")


def tiny_model() -> bytes:
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(300, 4)), rng.integers(0, 2, 300)
    booster = lgb.train({"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1},
                        lgb.Dataset(X, y), num_boost_round=3)
    return booster.model_to_string().encode()


TINY = tiny_model()


def forged_sizes(text: bytes) -> bytes:
    return re.sub(rb"tree_sizes=(\d+)", b"tree_sizes=999999999", text, count=1)


def test_the_models_training_writes_pass():
    for name in ("cart", "fraud"):
        model_text.check((MODEL_DIR / name / registry.MODEL).read_bytes())
    model_text.check(TINY)


@pytest.mark.parametrize("forge, why", [
    (forged_sizes, "tree_sizes do not match"),
    (lambda t: t.replace(b"\nsplit_feature=", b"\nsplit_feature=99 ", 1), "split_feature"),  # a count off
    (lambda t: re.sub(rb"\nsplit_feature=\d+", b"\nsplit_feature=99", t, count=1), "split on feature 99"),
    (lambda t: re.sub(rb"\nleft_child=-?\d+", b"\nleft_child=0", t, count=1), "has child 0"),
    (lambda t: re.sub(rb"\nright_child=-?\d+", b"\nright_child=-99", t, count=1), "has leaf"),
    (lambda t: t.replace(b"\nnum_cat=0", b"\nnum_cat=1", 1), "categorical"),
    (lambda t: t.replace(b"max_feature_idx=", b"max_feature_idx=x", 1), "max_feature_idx"),
    # found by a review of the first check: each passed it, and LightGBM looped in predict (the first
    # two) or died in Booster() and predict (the last two)
    (lambda t: re.sub(rb"\nleft_child=", b"\nleft_child=0 1\rleft_child=", t, count=1), "carriage return"),
    (lambda t: re.sub(rb"\nleft_child=(\d+)", rb"\nleft_child=0_\1", t, count=1), "not a list of numbers"),
    (lambda t: t.replace(b"num_tree_per_iteration=1", b"num_tree_per_iteration=0", 1), "num_tree_per_iteration"),
    (lambda t: t.replace(b"num_tree_per_iteration=1", b"num_tree_per_iteration=2000000000", 1),
     "num_tree_per_iteration"),
    (lambda t: re.sub(rb"\nnum_leaves=\d+", b"\nnum_leaves=31\nnum_leaves=4", t, count=1), "twice"),
])
def test_a_forged_model_is_refused_with_the_reason(forge, why):
    text = forge(REAL)
    if forge is not forged_sizes:  # sizes the forgery put off would be caught first: the trees' own checks
        text = re.sub(rb"\ntree_sizes=[^\n]*", b"", text)
    with pytest.raises(model_text.BadModel, match=why):
        model_text.check(text)


def test_a_forged_model_on_the_control_topic_is_refused_and_the_worker_keeps_its_model(tmp_path):
    """The reviewer's record, through the path a worker takes: before the check this test's process
    died in lgb.Booster (or the compile process's lleaves accepted it and the worker's Booster died)."""
    champion = Scorer(MODEL_DIR / "cart", CART.feature_names)
    live = LiveModels(CART, champion, tmp_path)
    text = forged_sizes(REAL).decode()
    key, value = control.encode("cart", "champion", text, {"features": list(CART.feature_names)}, [])
    promotion, why = control.parse(key, value, {"cart": CART})
    assert why is None, "it parses: its version is its text's hash, which a forger computes too"
    asyncio.run(live.apply(promotion))
    assert live.champion is champion
    assert "tree_sizes do not match" in live.refused[-1]["reason"]


def test_what_lightgbm_did_to_the_forged_model_before_the_check():
    """The check is there for a reason: LightGBM itself kills the process that loads this model."""
    code = ("import sys, lightgbm as lgb; lgb.Booster(model_str=sys.stdin.read())")
    run = subprocess.run([sys.executable, "-c", code], input=forged_sizes(REAL), capture_output=True, timeout=120)
    assert run.returncode != 0


@given(field=st.sampled_from(STRUCTURE), tree=st.integers(0, 2), at=st.integers(0, 8),
       value=st.one_of(st.integers(-12, 12), st.integers(-2**31, 2**31)), drop=st.booleans())
def test_any_structural_change_is_refused_or_loads_and_predicts(field, tree, at, value, drop):
    """One number of a tree's structure changed (or dropped): `check` refuses the model, or LightGBM
    loads it and predicts finite numbers. A change the check let through that LightGBM cannot read
    kills (or hangs) this test's process."""
    head, sep, rest = TINY.partition(b"\nTree=%d\n" % tree) if field != b"tree_sizes" else (b"", b"", TINY)
    line = re.search(rb"(^|\n)" + field + rb"=([^\n]*)", rest)
    numbers = line.group(2).split()
    i = at % len(numbers)
    numbers = numbers[:i] + numbers[i + 1:] if drop else numbers[:i] + [str(value).encode()] + numbers[i + 1:]
    text = head + sep + rest[:line.start(2)] + b" ".join(numbers) + rest[line.end(2):]
    try:
        model_text.check(text)
    except model_text.BadModel:
        return
    booster = lgb.Booster(model_str=text.decode())
    assert np.isfinite(booster.predict(np.random.default_rng(0).normal(size=(20, 4)), num_threads=1)).all()


def test_a_model_whose_compilation_does_not_end_is_refused(tmp_path, monkeypatch):
    """Found by a review of the check: the compile process had no time limit, and a model made to keep
    the compiler busy would have held model control, and a core, at every start."""
    from app.models import live as live_module

    champion = Scorer(MODEL_DIR / "cart", CART.feature_names)
    models = LiveModels(CART, champion, tmp_path)
    monkeypatch.setattr(live_module, "COMPILE_TIMEOUT_S", 0.01)
    key, value = control.encode("cart", "champion", TINY.decode(), {"features": []}, [])
    promotion, _ = control.parse(key, value, {"cart": CART})
    asyncio.run(models.apply(promotion))
    assert models.champion is champion and "took more than" in models.refused[-1]["reason"]
