"""Per-user shopping session state and its recency features: pure functions, no Faust.

`apply(state, event)` folds one cart event into the state and returns a new state;
`features(state, event)` reads the state *after* the event was applied. The agent and the training
job call exactly these two functions, so online and offline features are the same bits.

Time is the event's own timestamp (epoch ms), never the wall clock. Events of one user are folded
in arrival order. An event older than the latest one seen ("late") still counts, but its time is
clamped to the latest seen, so clocks never run backwards and every delta is >= 0; replaying the
same input in the same order gives the same features.

State is a small dict of counters, clocks and decayed sums: its size does not grow with the number
of events a user sends (distinct categories are capped at MAX_CATEGORIES).
"""
from __future__ import annotations

import math

EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start", "purchase")
TYPE_CODE = {t: i for i, t in enumerate(EVENT_TYPES)}

MAX_CATEGORIES = 16
# Half-lives of the decayed activity, in seconds: minutes, hours, days.
HALF_LIVES_S = (300.0, 3600.0, 86400.0)
NEVER = -1.0  # value of a "seconds since X" feature when X never happened

FEATURE_NAMES = (
    "event_type",
    "price",
    "secs_since_prev_event",
    "secs_since_session_start",
    "secs_since_last_add",
    "session_events",
    "session_page_views",
    "session_product_views",
    "session_adds",
    "session_removes",
    "session_checkouts",
    "cart_items",
    "cart_value",
    "distinct_categories",
    "activity_5m",
    "activity_1h",
    "activity_1d",
    "secs_since_last_purchase",
    "purchases_total",
    "sessions_total",
)
# What a nightly batch job would know: no session recency. The baseline model uses only these.
BASELINE_FEATURES = ("event_type", "price", "purchases_total", "sessions_total")

_SESSION_COUNTERS = ("events", "page_views", "product_views", "adds", "removes", "checkouts")
_COUNTER_OF = {
    "page_view": "page_views",
    "product_view": "product_views",
    "add_to_cart": "adds",
    "remove_from_cart": "removes",
    "checkout_start": "checkouts",
}


def new_state() -> dict:
    return {
        "session_id": None,
        "session_start": 0,
        "last_ts": None,   # latest event time seen (ms)
        "prev_ts": None,   # effective time of the event before the latest
        **{c: 0 for c in _SESSION_COUNTERS},
        "cart_items": 0,
        "cart_value": 0.0,
        "categories": [],
        "last_add_ts": None,
        "activity": [0.0] * len(HALF_LIVES_S),
        "last_purchase_ts": None,
        "purchases_total": 0,
        "sessions_total": 0,
    }


def _start_session(state: dict, user_id: str, ts: int) -> None:
    state["session_id"] = f"{user_id}:{ts}"
    state["session_start"] = ts
    for c in _SESSION_COUNTERS:
        state[c] = 0
    state["cart_items"] = 0
    state["cart_value"] = 0.0
    state["categories"] = []
    state["last_add_ts"] = None
    state["sessions_total"] += 1


def apply(state: dict, event: dict, session_gap_s: float) -> dict:
    """Return the state after `event` (validated cart event dict). `state` is not modified."""
    s = {**state}  # lists are replaced, never mutated, so the copy can share them
    last = s["last_ts"]
    ts = event["ts"] if last is None else max(event["ts"], last)
    if last is None or (ts - last) / 1000.0 > session_gap_s:
        _start_session(s, event["user_id"], ts)
    s["prev_ts"] = last
    s["last_ts"] = ts

    dt_s = 0.0 if last is None else (ts - last) / 1000.0
    s["activity"] = [a * math.pow(0.5, dt_s / h) + 1.0 for a, h in zip(s["activity"], HALF_LIVES_S)]

    kind = event["type"]
    s["events"] += 1
    counter = _COUNTER_OF.get(kind)
    if counter:
        s[counter] += 1
    amount = event["price"] * event["quantity"]
    if kind == "add_to_cart":
        s["cart_items"] += event["quantity"]
        s["cart_value"] += amount
        s["last_add_ts"] = ts
    elif kind == "remove_from_cart":
        s["cart_items"] = max(0, s["cart_items"] - event["quantity"])
        s["cart_value"] = max(0.0, s["cart_value"] - amount)
    elif kind == "purchase":
        s["purchases_total"] += 1
        s["last_purchase_ts"] = ts
        s["cart_items"] = 0
        s["cart_value"] = 0.0
    category = event.get("category")
    if category and category not in s["categories"] and len(s["categories"]) < MAX_CATEGORIES:
        s["categories"] = [*s["categories"], category]
    return s


def _since(now: int, then: int | None) -> float:
    return NEVER if then is None else (now - then) / 1000.0


def features(state: dict, event: dict) -> tuple[float, ...]:
    """Feature vector for `event`, read from the state after the event was applied."""
    now = state["last_ts"]
    prev = state["prev_ts"]
    return (
        float(TYPE_CODE[event["type"]]),
        float(event["price"]),
        NEVER if prev is None else (now - prev) / 1000.0,
        (now - state["session_start"]) / 1000.0,
        _since(now, state["last_add_ts"]),
        float(state["events"]),
        float(state["page_views"]),
        float(state["product_views"]),
        float(state["adds"]),
        float(state["removes"]),
        float(state["checkouts"]),
        float(state["cart_items"]),
        float(state["cart_value"]),
        float(len(state["categories"])),
        *state["activity"],
        _since(now, state["last_purchase_ts"]),
        float(state["purchases_total"]),
        float(state["sessions_total"]),
    )
