"""Sample transactions for the fraud pipeline's tests: valid ones, known sequences, poison records.

`valid_events(n_keys, seed)` and `poison_transactions()` are what `tests.flows` needs to run the shared
failure tests over the fraud pipeline; the others build the known sequences of
tests/test_fraud_pipeline.py.
"""
from __future__ import annotations

import random

import orjson

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def txn(txn_id: str, card_id: str, ts: int, amount: float, merchant: str, *, mcc: str = "5411",
        country: str = "DE", currency: str = "EUR", channel: str = "pos", device: str | None = None) -> dict:
    t = {"txn_id": txn_id, "card_id": card_id, "ts": ts, "amount": amount, "currency": currency,
         "merchant_id": merchant, "mcc": mcc, "country": country, "channel": channel}
    if device is not None:
        t["device_id"] = device
    return t


def habits(card_id: str, n: int, start_ts: int, rng: random.Random) -> list[dict]:
    """A card holder's ordinary life: a few shops and one phone at home, usual amounts, about one
    purchase a day in the afternoon."""
    shops = [(f"{card_id}-shop{k}", mcc) for k, mcc in enumerate(("5411", "5812", "5541"))]
    device = f"{card_id}-phone"
    typical = rng.uniform(15, 60)
    out = []
    day = start_ts // DAY_MS
    for j in range(n):
        day += 1 if rng.random() < 0.8 else 2
        ts = day * DAY_MS + int(rng.uniform(13, 18) * HOUR_MS) + rng.randrange(1000)
        amount = round(typical * rng.uniform(0.6, 1.5), 2)
        if rng.random() < 0.25:
            out.append(txn(f"{card_id}-{j}", card_id, ts, amount, f"{card_id}-webshop", mcc="5942",
                           channel="ecom", device=device))
        else:
            merchant, mcc = rng.choice(shops)
            out.append(txn(f"{card_id}-{j}", card_id, ts, amount, merchant, mcc=mcc))
    return out


def valid_transactions(n_cards: int, n_per_card: int, start_ts: int = T0, seed: int = 0) -> list[dict]:
    """`n_cards` cards with `n_per_card` ordinary transactions each, interleaved in event-time
    order (the produce order). Ids are unique per seed: card `s<seed>-card<i>`, txn `<card>-<j>`."""
    rng = random.Random(seed)
    out = []
    for i in range(n_cards):
        out.extend(habits(f"s{seed}-card{i}", n_per_card, start_ts, rng))
    out.sort(key=lambda t: (t["ts"], t["txn_id"]))
    return out


def valid_events(n_keys: int, seed: int) -> list[dict]:
    """For `tests.flows`: (n_keys, seed) -> events in produce order."""
    return valid_transactions(n_keys, 12, T0, seed)


def card_testing_burst(card_id: str, start_ts: int, n: int = 15, gap_ms: int = 20_000) -> list[dict]:
    """Small amounts (< 5) at a new online merchant each, from a device the card never used, seconds apart."""
    rng = random.Random(card_id)
    return [txn(f"{card_id}-test{k}", card_id, start_ts + k * gap_ms, round(rng.uniform(0.5, 4.99), 2),
                f"tester-merchant-{k}", mcc="5968", channel="ecom", device="unknown-device")
            for k in range(n)]


GOOD = txn("p-good", "poison-card", T0, 12.5, "m1", device="d1")


def _j(**over) -> bytes:
    return orjson.dumps({**GOOD, **over})


def poison_transactions() -> list[tuple[str, bytes | None, bytes | None]]:
    """(description, key, value) of transactions that can never succeed: bad fields specific to
    the transaction schema. Every value is distinct (tests find dead letters by value)."""
    missing = {k: v for k, v in GOOD.items() if k != "merchant_id"}
    return [
        ("currency lowercase", b"poison-card", _j(txn_id="p-cur1", currency="eur")),
        ("currency too long", b"poison-card", _j(txn_id="p-cur2", currency="EURO")),
        ("currency not a string", b"poison-card", _j(txn_id="p-cur3", currency=978)),
        ("mcc not 4 digits", b"poison-card", _j(txn_id="p-mcc1", mcc="541")),
        ("mcc with a letter", b"poison-card", _j(txn_id="p-mcc2", mcc="54a1")),
        ("mcc a number", b"poison-card", _j(txn_id="p-mcc3", mcc=5411)),
        ("zero amount", b"poison-card", _j(txn_id="p-amt1", amount=0)),
        ("negative amount", b"poison-card", _j(txn_id="p-amt2", amount=-12.5)),
        ("amount a string", b"poison-card", _j(txn_id="p-amt3", amount="12.50")),
        ("unknown channel", b"poison-card", _j(txn_id="p-chan1", channel="web")),
        ("channel uppercase", b"poison-card", _j(txn_id="p-chan2", channel="POS")),
        ("country alpha-3", b"poison-card", _j(txn_id="p-ctry1", country="DEU")),
        ("country lowercase", b"poison-card", _j(txn_id="p-ctry2", country="de")),
        ("empty device id", b"poison-card", _j(txn_id="p-dev", device_id="")),
        ("missing merchant", b"poison-card", orjson.dumps({**missing, "txn_id": "p-missing"})),
        ("timestamp in seconds", b"poison-card", _j(txn_id="p-ts", ts=1_700_000_000)),
        ("not json", None, b'{"txn_id": "p-broken", "card_id": '),
    ]
