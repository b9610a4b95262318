"""Personalization pipeline end to end: real broker, real worker, offline == online."""
from __future__ import annotations

import numpy as np

from app.kafka.partitioner import key_hash
from app.models.scorer import Scorer
from app.pipelines import configured
from tests.flows import FLOWS
from tests.harness import MODEL_DIR, committed, latest_states, produce_events, read_json, written_partition
from training import cart_sim
from training.train import replay

CART = configured()["cart"]


def sample_events(n_users=40, days=3, seed=11):
    return [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(n_users, days, seed)]


def test_one_score_per_event_with_offline_features_and_predictions(broker, workers):
    events = sample_events()
    assert len(events) > 300
    workers("w1")
    produce_events(broker, "cart_events", events, "user_id")
    out = read_json(broker, "personalization_scores", len(events), key="event_id")

    by_id = {}
    for o in out:
        assert o["event_id"] not in by_id, "crash-free run: exactly one output per event"
        by_id[o["event_id"]] = o
    assert set(by_id) == {e["event_id"] for e in events}

    offline = replay(CART, events)
    online = np.array([by_id[e["event_id"]]["features"] for e in events])
    assert np.array_equal(online, offline), "worker features differ from the training code path"

    scorer = Scorer(MODEL_DIR / "cart", CART.feature_names)
    expected = scorer.predict(offline)
    got = np.array([by_id[e["event_id"]]["score"] for e in events])
    assert np.array_equal(got, expected)
    # the compiled trees the worker scores with are LightGBM's model (training evaluated that one)
    assert np.allclose(got, scorer.booster.predict(offline), rtol=0, atol=1e-12)

    for e in events:
        o = by_id[e["event_id"]]
        assert o["user_id"] == e["user_id"] and o["event_ts"] == e["ts"]
        assert o["model_version"] == scorer.version and 0 <= o["score"] <= 1
        assert o["session_id"].startswith(e["user_id"] + ":")
    # every event of one session carries the same session id, a new session a new one
    sessions = {}
    for e in events:
        sessions.setdefault(by_id[e["event_id"]]["session_id"], set()).add(e["user_id"])
    assert all(len(users) == 1 for users in sessions.values())
    assert len(sessions) > len({e["user_id"] for e in events})


def test_events_without_key_are_repartitioned_by_user(broker, workers):
    events = sample_events(n_users=10, seed=5)
    workers("w1")
    produce_events(broker, "cart_events", events, key_field=None)
    out = read_json(broker, "personalization_scores", len(events), key="event_id")
    assert sorted(o["event_id"] for o in out) == sorted(e["event_id"] for e in events)
    # a user's events met one state (one partition) whatever partition the producer chose
    totals = {}
    for o in out:
        n = o["features"][CART.feature_names.index("sessions_total")]
        totals[o["user_id"]] = max(totals.get(o["user_id"], 0), n)
    expected = {u: len({o["session_id"] for o in out if o["user_id"] == u}) for u in totals}
    assert totals == expected


def test_a_clean_stop_writes_the_state_left_unwritten_and_commits_every_offset(broker, workers):
    """State is written behind; a stop (SIGTERM) must not leave it, or the offsets, behind."""
    events = sample_events(n_users=12, seed=3)
    w = workers("w1", env={"STATE_FLUSH_MS": "600000", "STATE_FLUSH_EVENTS": "1000000"})
    produce_events(broker, "cart_events", events, "user_id")
    read_json(broker, "personalization_scores", len(events), key="event_id")
    w.stop()
    expected = FLOWS["cart"].offline_states(events)
    assert latest_states(broker, FLOWS["cart"].changelog(), set(expected)) == expected
    ends, hops = {p: 0 for p in range(4)}, {p: 0 for p in range(4)}
    for e in events:
        key = e["user_id"].encode()
        written = written_partition(key)
        ends[written] += 1
        if written != key_hash(key) % 4:  # CRC32 put it elsewhere: one hop
            hops[key_hash(key) % 4] += 1
    assert committed(broker, "scoring", "cart_events") == {p: n or None for p, n in ends.items()}  # None: empty
    assert sum(hops.values()) > 0, "some keys took the hop"
    assert committed(broker, "scoring", "scoring-cart_events-by-user_id") == {p: n or None for p, n in hops.items()}


def test_a_worker_runs_only_the_pipelines_it_is_given(broker, workers):
    from tests.test_web import get_json

    w = workers("w1", env={"PIPELINES": "cart"})
    events = sample_events(n_users=5, seed=9)
    produce_events(broker, "cart_events", events, "user_id")
    assert len(read_json(broker, "personalization_scores", len(events), key="event_id")) == len(events)
    tables = {t["name"] for t in get_json(w.url, "/tables")["tables"]}
    assert "user_sessions" in tables and "card_state" not in tables
    assert get_json(w.url, "/cards/c1/state", status=404)["error"] == "no fraud pipeline on this deployment"
    assert "transactions" not in {t for o in get_json(w.url, "/stats")["ownership"].values() for t in o}

    bad = workers("w2", env={"PIPELINES": "cart,nope"}, start=False)
    bad.start(wait_ready=False)
    assert bad.proc.wait(60) != 0
    assert "configuration error: PIPELINES='cart,nope'" in bad.log()
