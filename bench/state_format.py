"""What a cheaper state record would save per user (issue 18): the table's record codec side by side.

  python -m bench.state_format [--users 5000]     (about 10 s)

Every user a 1M-users drain touches costs one decode of its stored record and, at each state write,
one encode. Records here are real ones: simulated Zipf-like shoppers folded with the pipeline's own
`apply`, with the offsets the fold keeps. Three forms, each encoded and decoded back to what the
code working on it needs:
- today: a JSON object with field names, decoded to the dicts the domain works on (`app.kafka.store`'s
  own encode and decode, with their checks);
- a JSON array in the fields' order, turned back into those dicts (a smaller changelog, same domain);
- a `msgspec.Struct` as a JSON array, decoded and type-checked to structs, not dicts: what a domain
  written on structs instead of dicts would get.
Prints bytes per record and microseconds per encode and decode (best of five passes, per record).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import msgspec
import orjson

from app.kafka.store import GatedTable, _decode
from app.pipeline.fold import record_of
from app.pipelines import configured
from bench.common import say, simulated
from domain import session

FIELDS = tuple(session.new_state())


class SessionState(msgspec.Struct, array_like=True):
    session_id: str | None
    session_start: int
    last_ts: int | None
    prev_ts: int | None
    events: int
    page_views: int
    product_views: int
    adds: int
    removes: int
    checkouts: int
    cart_items: int
    cart_value: float
    categories: list[str]
    last_add_ts: int | None
    activity: list[float]
    last_purchase_ts: int | None
    purchases_total: int
    sessions_total: int


class StateRecord(msgspec.Struct, array_like=True):
    state: SessionState
    applied: dict[str, int]


def records(users: int) -> list[dict]:
    """Each user's record after its events (Zipf-like: a few users with many, most with one or two)."""
    cart = configured()["cart"]
    states: dict[str, dict] = {}
    for offset, e in enumerate(simulated("cart", users * 4, users, 7, "s", zipf=1.0)):
        before = states.get(e["user_id"])
        state = cart.apply(cart.new_state() if before is None else before["state"], e)
        states[e["user_id"]] = record_of(state, {"cart_events:0": offset}, [])
    return list(states.values())


def as_array(record: dict) -> bytes:
    state = record["state"]
    return orjson.dumps([[state[f] for f in FIELDS], record["applied"]])


def from_array(raw: bytes) -> dict:
    values, applied = orjson.loads(raw)
    return {"state": dict(zip(FIELDS, values)), "applied": applied}


def best_us(fn: Callable, items: list) -> float:
    """Microseconds per item, best of five passes."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=5000,
                   help="shoppers simulated (Zipf-like: about 3,200 of them have events)")
    args = p.parse_args()
    say(f"folding the events of {args.users:,} simulated shoppers")
    recs = records(args.users)
    structs = [StateRecord(SessionState(**r["state"]), r["applied"]) for r in recs]
    encoder, decoder = msgspec.json.Encoder(), msgspec.json.Decoder(StateRecord)
    forms = [
        ("JSON object, dicts (today)", recs, GatedTable.encode, _decode),
        ("JSON array, dicts", recs, as_array, from_array),
        ("msgspec Struct as JSON array, structs", structs, encoder.encode, decoder.decode),
    ]
    print(f"{len(recs):,} records\n")
    print("| form | bytes per record | encode, us | decode, us | both, us |\n|---|---|---|---|---|")
    for name, values, encode, decode in forms:
        raws = [encode(v) for v in values]
        assert all(decode(raw) == v for raw, v in zip(raws[:100], values)), name  # the form round-trips
        enc, dec = best_us(encode, values), best_us(decode, raws)
        size = sum(map(len, raws)) / len(raws)
        print(f"| {name} | {size:.0f} | {enc:.2f} | {dec:.2f} | {enc + dec:.2f} |")


if __name__ == "__main__":
    main()
