"""Hand-computed cases for the cart session state and its features (pure functions)."""
from __future__ import annotations

import math

import pytest

from domain import session as s

GAP = 1800.0
T0 = 1_700_000_000_000


def ev(i, t_s, kind="product_view", price=10.0, qty=1, category="books", user="u1"):
    e = {"event_id": f"e{i}", "user_id": user, "ts": T0 + int(t_s * 1000), "type": kind,
         "category": category, "price": price, "quantity": qty}
    if kind != "page_view":
        e["product_id"] = "p1"
    return e


def run(events):
    state = s.new_state()
    out = []
    for e in events:
        state = s.apply(state, e, GAP)
        out.append(dict(zip(s.FEATURE_NAMES, s.features(state, e))))
    return state, out


def test_first_event_starts_a_session():
    state, [f] = run([ev(0, 0, "page_view", price=0.0)])
    assert state["session_id"] == f"u1:{T0}"
    assert f["secs_since_prev_event"] == s.NEVER
    assert f["secs_since_session_start"] == 0.0
    assert f["session_events"] == 1 and f["session_page_views"] == 1
    assert f["sessions_total"] == 1
    assert f["activity_5m"] == f["activity_1h"] == f["activity_1d"] == 1.0


def test_counts_cart_and_recency():
    events = [ev(0, 0, "page_view", 0.0), ev(1, 10, "product_view", 20.0),
              ev(2, 15, "add_to_cart", 20.0, 2, "toys"), ev(3, 45, "add_to_cart", 5.0, 1),
              ev(4, 60, "remove_from_cart", 20.0, 1, "toys")]
    state, fs = run(events)
    f = fs[-1]
    assert f["secs_since_prev_event"] == 15.0
    assert f["secs_since_session_start"] == 60.0
    assert f["secs_since_last_add"] == 15.0
    assert (f["session_adds"], f["session_removes"], f["session_product_views"]) == (2, 1, 1)
    assert f["cart_items"] == 2 and f["cart_value"] == pytest.approx(25.0)
    assert f["distinct_categories"] == 2
    assert fs[2]["secs_since_last_add"] == 0.0 and fs[1]["secs_since_last_add"] == s.NEVER


def test_decayed_activity_arithmetic():
    _, fs = run([ev(0, 0), ev(1, 300)])  # one 5-minute half-life later
    f = fs[-1]
    assert f["activity_5m"] == pytest.approx(1.5)
    assert f["activity_1h"] == pytest.approx(1 + 0.5 ** (300 / 3600))
    assert f["activity_1d"] == pytest.approx(1 + 0.5 ** (300 / 86400))


def test_session_boundary_after_gap_of_inactivity():
    events = [ev(0, 0, "add_to_cart"), ev(1, GAP, "product_view"), ev(2, 2 * GAP + 1, "page_view", 0.0)]
    state, fs = run(events)
    assert fs[1]["sessions_total"] == 1, "exactly the gap: same session"
    assert fs[2]["sessions_total"] == 2
    assert fs[2]["session_events"] == 1 and fs[2]["cart_items"] == 0 and fs[2]["secs_since_last_add"] == s.NEVER
    assert fs[2]["secs_since_prev_event"] == GAP + 1, "gap to previous event spans sessions"
    assert state["session_id"] == f"u1:{T0 + int((2 * GAP + 1) * 1000)}"


def test_purchase_counts_and_empties_cart():
    _, fs = run([ev(0, 0, "add_to_cart", 30.0), ev(1, 20, "checkout_start", 30.0), ev(2, 40, "purchase", 30.0),
                 ev(3, 100, "page_view", 0.0)])
    assert fs[2]["purchases_total"] == 1 and fs[2]["cart_items"] == 0 and fs[2]["cart_value"] == 0.0
    assert fs[3]["secs_since_last_purchase"] == 60.0
    assert fs[1]["session_checkouts"] == 1


def test_out_of_order_event_is_counted_at_latest_time():
    _, fs = run([ev(0, 100), ev(1, 50, "add_to_cart")])  # arrives late by 50 s
    f = fs[-1]
    assert f["secs_since_prev_event"] == 0.0, "clock never runs backwards"
    assert f["secs_since_last_add"] == 0.0
    assert f["session_adds"] == 1 and f["session_events"] == 2
    assert f["activity_5m"] == 2.0


def test_apply_does_not_mutate_its_input():
    state = s.new_state()
    before = repr(state)
    s.apply(state, ev(0, 0, "add_to_cart"), GAP)
    assert repr(state) == before


def test_state_stays_bounded():
    state = s.new_state()
    size0 = None
    for i in range(5000):
        state = s.apply(state, ev(i, i * 5, "add_to_cart", 1.0, 1, f"c{i}"), GAP)
        if i == 100:
            size0 = len(repr(state))
    assert len(state["categories"]) == s.MAX_CATEGORIES
    assert len(repr(state)) <= size0 + 20  # only digits of counters grow
    assert all(math.isfinite(x) for x in s.features(state, ev(0, 0)))


def test_replay_gives_identical_features():
    events = [ev(i, i * 7.5, ("page_view", "product_view", "add_to_cart")[i % 3], 3.3 * i) for i in range(50)]
    assert run(events)[1] == run(events)[1]
