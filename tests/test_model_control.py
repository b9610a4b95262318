"""The model control topic and the label topic are untrusted input too: whatever bytes their records
carry, parsing refuses them with a reason and never raises; a promotion survives its round trip."""
from __future__ import annotations

import base64
import gzip
import os
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.models import control, registry
from app.models.quality import ShadowQuality
from app.pipelines import configured

PIPELINES = configured()
TEXT = "tree\nversion=v4\n" + "x" * 1000


def test_a_promotion_survives_its_round_trip():
    key, value = control.encode("cart", "champion", TEXT, {"features": ["a"]}, ["v1", "v0"], now_ms=5)
    promotion, why = control.parse(key, value, PIPELINES)
    assert why is None
    assert (promotion.pipeline, promotion.role, promotion.version, promotion.model_text, promotion.history,
            promotion.promoted_at) == ("cart", "champion", registry.version_of(TEXT), TEXT, ("v1", "v0"), 5)
    ended, why = control.parse(control.key_of("fraud", "challenger"), None, PIPELINES)
    assert why is None and ended.version is None


def test_what_cannot_be_a_promotion_is_refused_with_the_reason():
    key, value = control.encode("cart", "champion", TEXT, {}, [])
    body = orjson.loads(value)
    forged = orjson.dumps({**body, "model_gzip_base64": base64.b64encode(gzip.compress(b"other trees")).decode()})
    assert "does not hash to its version" in control.parse(key, forged, PIPELINES)[1]
    assert "names no pipeline" in control.parse(b"cart:boss", value, PIPELINES)[1]
    assert "cannot be removed" in control.parse(key, None, PIPELINES)[1]
    assert "not UTF-8" in control.parse(b"\xff", value, PIPELINES)[1]
    with pytest.raises(control.PromotionError, match="cannot carry it"):
        control.encode("cart", "champion", os.urandom(800_000).hex(), {}, [])  # gzip cannot shrink it enough


def test_a_record_that_unpacks_to_gigabytes_is_refused_without_unpacking_it():
    """Before: gzip.decompress unpacked whatever the record held on the event loop (1 MB of gzip of one
    repeated byte is a GB: a worker killed for its memory, again at every start)."""
    key, value = control.encode("cart", "champion", TEXT, {}, [])
    bomb = gzip.compress(b"\0" * (control.MAX_MODEL_TEXT_BYTES + 1))
    body = {**orjson.loads(value), "model_gzip_base64": base64.b64encode(bomb).decode()}
    assert "unpacks to more than" in control.parse(key, orjson.dumps(body), PIPELINES)[1]
    cut = {**body, "model_gzip_base64": base64.b64encode(gzip.compress(TEXT.encode())[:-9]).decode()}
    assert "cut short" in control.parse(key, orjson.dumps(cut), PIPELINES)[1]
    assert "more than 900,000" in control.parse(key, value + b" " * control.MAX_RECORD_BYTES, PIPELINES)[1]


@given(key=st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"cart:champion", b"fraud:challenger"])),
       value=st.one_of(st.none(), st.binary(max_size=400), st.builds(orjson.dumps, st.dictionaries(
           st.sampled_from(["version", "meta", "history", "model_gzip_base64", "promoted_at", "x"]),
           st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=30), st.lists(st.integers(0, 9), max_size=3)),
           max_size=6))))
def test_any_control_record_parses_or_is_refused_and_nothing_raises(key, value):
    promotion, why = control.parse(key, value, PIPELINES)
    assert (promotion is None) != (why is None)


@given(value=st.one_of(st.none(), st.binary(max_size=200), st.builds(orjson.dumps, st.dictionaries(
    st.sampled_from(["txn_id", "label", "x"]), st.one_of(st.none(), st.booleans(), st.integers(-2, 3),
                                                           st.floats(allow_nan=True), st.text(max_size=10)),
    max_size=3))))
def test_any_label_record_is_counted_and_nothing_raises(value):
    ShadowQuality(PIPELINES["fraud"]).label(value)


def test_both_models_are_judged_on_the_same_labelled_events_and_a_new_challenger_starts_afresh():
    quality = ShadowQuality(PIPELINES["fraud"])

    def scored(i, champion, challenger, version="c1"):
        return SimpleNamespace(value={"txn_id": f"t{i}"}, score=champion,
                               output={"model_version": "m0", "shadow": {"model_version": version, "score": challenger}})

    quality.record([scored(i, i / 10, 1 - i / 10) for i in range(10)])
    for i in range(10):
        quality.label(orjson.dumps({"txn_id": f"t{i}", "label": int(i >= 5)}))
    summary = quality.summary()
    assert summary["labelled"] == 10 and summary["champion_auc"] == 1.0 and summary["challenger_auc"] == 0.0
    quality.record([scored(99, 0.5, 0.5, version="c2")])
    assert quality.summary()["labelled"] == 0, "another challenger is judged on its own events"
