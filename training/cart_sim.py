"""Seeded simulation of shoppers: sessions of browsing, adding and removing, checkout, purchase or
abandonment. Each user has a latent propensity; each session an intent drawn around it. Intent
drives what the user does (adds, speed, checkout), and whether the session converts, so the live
session carries the signal that a nightly profile cannot.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Iterator

CATEGORIES = ("books", "electronics", "fashion", "home", "toys", "sports", "beauty", "garden",
              "grocery", "music", "games", "auto")
DAY_MS = 86_400_000


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def session(rng: random.Random, user_id: str, start_ms: int, propensity: float, seq: int) -> list[dict]:
    """One session's events; each event carries `_label`: a purchase follows later in the session."""
    intent = _sigmoid(math.log(propensity / (1 - propensity)) + rng.gauss(0, 1.2))
    favourite = rng.sample(CATEGORIES, 3)
    ts = start_ms
    events: list[dict] = []
    cart: list[tuple[str, str, float, int]] = []
    checkout = False

    def emit(kind: str, product=None, category=None, price=0.0, quantity=1) -> None:
        e = {"event_id": f"{user_id}-{seq}-{len(events)}", "user_id": user_id, "ts": ts, "type": kind,
             "category": category or rng.choice(favourite), "price": round(price, 2), "quantity": quantity}
        if product is not None:
            e["product_id"] = product
        events.append(e)

    emit("page_view")
    for _ in range(60):  # bounded session length
        # Engaged shoppers move faster; gaps in event time, seconds.
        ts += int(1000 * rng.expovariate(1.0 / (8 + 50 * (1 - intent))))
        r = rng.random()
        if checkout:
            if r < 0.35 + 0.6 * intent:
                emit("purchase", "cart", "checkout", sum(p * q for _, _, p, q in cart), 1)
                break
            if r < 0.8:
                break  # abandoned at checkout
            checkout = False
        leave = 0.06 + 0.25 * (1 - intent) * (1 if not cart else 0.5)
        if r < leave:
            break
        r = rng.random()
        if cart and r < 0.05 + 0.2 * intent * min(len(cart), 3) / 3:
            checkout = True
            emit("checkout_start", "cart", "checkout", sum(p * q for _, _, p, q in cart), 1)
        elif r < 0.5:
            category = rng.choice(favourite) if rng.random() < 0.7 else rng.choice(CATEGORIES)
            product = f"p{rng.randrange(5000)}"
            price = rng.lognormvariate(3.2, 0.8)
            emit("product_view", product, category, price)
            if rng.random() < 0.1 + 0.45 * intent:
                ts += int(1000 * rng.expovariate(1 / 6))
                q = 1 if rng.random() < 0.85 else rng.randint(2, 4)
                cart.append((product, category, round(price, 2), q))
                emit("add_to_cart", product, category, price, q)
        elif r < 0.62 and cart:
            product, category, price, q = cart.pop(rng.randrange(len(cart)))
            emit("remove_from_cart", product, category, price, q)
        else:
            emit("page_view")
    converted_at = next((i for i, e in enumerate(events) if e["type"] == "purchase"), None)
    for i, e in enumerate(events):
        e["_label"] = int(converted_at is not None and i < converted_at)
    return events


def simulate(n_users: int, days: float, seed: int, start_ms: int = 1_700_000_000_000,
             progress=None) -> list[dict]:
    """All events of `n_users` over `days`, sorted by event time (ties by event id)."""
    rng = random.Random(seed)
    events: list[dict] = []
    for u in range(n_users):
        user_id = f"u{u}"
        propensity = min(0.95, max(0.02, rng.betavariate(1.5, 6)))
        n_sessions = 1 + int(rng.expovariate(1 / (days * 0.6)))
        starts = sorted(start_ms + int(rng.random() * days * DAY_MS) for _ in range(n_sessions))
        for seq, start in enumerate(starts):
            events.extend(session(rng, user_id, start, propensity, seq))
        if progress and (u + 1) % max(1, n_users // 20) == 0:
            progress(u + 1, n_users)
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    return events


def live(n_users: int, seed: int, now_ms, zipf: float = 0.0) -> Iterator[dict]:
    """Endless event stream for the generator: sessions of random users interleaved, stamped with
    the current time when emitted (a user's events stay in order). Users are picked uniformly, or
    with `zipf` > 0 as real shops see them: user k about k**-zipf as often as user 1."""
    rng = random.Random(seed)
    propensity = [min(0.95, max(0.02, rng.betavariate(1.5, 6))) for _ in range(n_users)]
    if zipf > 0:
        cumulative = list(itertools.accumulate((k + 1) ** -zipf for k in range(n_users)))
        users = range(n_users)

        def pick() -> int:
            return rng.choices(users, cum_weights=cumulative)[0]
    else:
        def pick() -> int:
            return rng.randrange(n_users)
    active: dict[int, list[dict]] = {}
    seq = 0
    while True:
        u = pick()
        if not active.get(u):
            seq += 1
            active[u] = session(rng, f"u{u}", 0, propensity[u], seq)
        e = active[u].pop(0)
        e.pop("_label", None)
        e["ts"] = now_ms()
        yield e
