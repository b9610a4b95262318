"""Seeded simulation of card holders and the fraud committed with their cards.

Each card holder has habits: a home country (and its currency), a handful of regular merchants, one
or two devices for online shopping, a typical amount (log-normal around a personal median), a
preferred time of day and a rate of a few transactions per day. Legitimate life adds noise that
looks a little like fraud: an occasional new merchant, a big legitimate purchase, a new phone, a
trip abroad (new country, new merchants, other currency), a shopping spree of several purchases
within half an hour, and habitual small amounts (coffee) for some holders.

Fraud comes in three patterns, injected after a card has some history (each transaction carries
`_label` = 1 and `_pattern`):
- card testing: a burst of many small amounts (< 5) at new online merchants, seconds apart, usually from
  a device the card never used, sometimes followed by a large purchase once a test went through;
- account takeover: a new device, often from a new country, buys expensive goods online, several
  times within a few hours;
- high-value outlier: one or two purchases many times the card's typical amount at a new merchant.

`simulate` gives a history sorted by event time for training; `live` an endless stream for the
generator, stamped with the current time.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Iterator

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000

# (country, currency, weight of card holders living there)
HOMES = (("US", "USD", 30), ("GB", "GBP", 12), ("DE", "EUR", 12), ("FR", "EUR", 10), ("ES", "EUR", 6),
         ("IT", "EUR", 5), ("NL", "EUR", 4), ("CA", "CAD", 6), ("AU", "AUD", 4), ("JP", "JPY", 3),
         ("BR", "BRL", 3), ("MX", "MXN", 2), ("IN", "INR", 3))
CURRENCY = {c: cur for c, cur, _ in HOMES} | {"RU": "RUB", "NG": "NGN", "RO": "RON", "UA": "UAH",
                                              "VN": "VND", "ID": "IDR", "TH": "THB", "TR": "TRY"}
FRAUD_COUNTRIES = ("RU", "NG", "RO", "UA", "VN", "ID", "BR", "TR", "TH", "MX", "IN", "US", "GB")
TRAVEL_COUNTRIES = tuple(c for c, _, _ in HOMES) + ("TH", "TR")

# Merchant categories (ISO 18245) by use.
EVERYDAY_MCC = ("5411", "5812", "5541", "5311", "5651", "5912", "5999", "4121")
ONLINE_MCC = ("5942", "5732", "5816", "5968", "4899", "5999", "5311", "4829", "5944")
COFFEE_MCC = "5814"
ATM_MCC = "6011"
BIG_MCC = ("5732", "5944", "4511", "7011", "5712", "5045")
TESTING_MCC = ("5816", "5968", "5999", "8398", "4899")
TAKEOVER_MCC = ("5732", "5944", "5816", "4829", "5045")


class Card:
    """A card holder's habits."""

    def __init__(self, rng: random.Random, index: int) -> None:
        self.id = f"card{index:06d}"
        homes = [h for h in HOMES]
        self.home, self.currency, _ = rng.choices(homes, weights=[w for _, _, w in homes])[0]
        self.rate_per_day = min(8.0, max(0.25, rng.lognormvariate(math.log(1.4), 0.6)))
        self.log_amount = rng.gauss(math.log(35.0), 0.6)
        self.amount_sigma = rng.uniform(0.35, 0.85)
        self.hour = rng.gauss(14.0, 3.0)
        self.hour_spread = rng.uniform(1.5, 4.0)
        self.ecom_share = rng.betavariate(2, 4)
        self.atm_share = rng.uniform(0.0, 0.08)
        self.coffee = rng.random() < 0.2
        self.gamer = rng.random() < 0.1
        self.digital = (f"m-web-app{rng.randrange(5)}", "5816")
        self.pos_merchants = [(f"m-{self.home}-{rng.randrange(40_000)}", rng.choice(EVERYDAY_MCC))
                              for _ in range(rng.randint(2, 7))]
        self.ecom_merchants = [(f"m-web-{rng.randrange(20_000)}", rng.choice(ONLINE_MCC))
                               for _ in range(rng.randint(1, 4))]
        self.coffee_shop = (f"m-{self.home}-cafe{rng.randrange(5_000)}", COFFEE_MCC)
        self.devices = [f"dev-{index}-{k}" for k in range(rng.randint(1, 2))]
        self.seq = 0
        self.trip: tuple[int, str] | None = None  # (until ts, country)

    def txn(self, ts: int, amount: float, merchant: tuple[str, str], country: str, channel: str,
            device: str | None, label: int = 0, pattern: str = "legit") -> dict:
        self.seq += 1
        t = {"txn_id": f"{self.id}-{self.seq}", "card_id": self.id, "ts": ts,
             "amount": round(max(0.01, amount), 2), "currency": CURRENCY.get(country, "USD"),
             "merchant_id": merchant[0], "mcc": merchant[1], "country": country, "channel": channel}
        if device is not None:
            t["device_id"] = device
        t["_label"] = label
        t["_pattern"] = pattern
        return t

    def next_time(self, rng: random.Random, after: int) -> int:
        """Next legitimate activity: a gap drawn from the card's rate, at the card's usual hour."""
        ts = after + int(rng.expovariate(self.rate_per_day) * DAY_MS)
        day = ts // DAY_MS
        hour = (self.hour + rng.gauss(0, self.hour_spread)) % 24
        ts = day * DAY_MS + int(hour * HOUR_MS)
        return max(ts, after + 60_000)

    def typical(self, rng: random.Random) -> float:
        return rng.lognormvariate(self.log_amount, self.amount_sigma)

    # -- legitimate behaviour -------------------------------------------------------------------

    def legit(self, rng: random.Random, ts: int) -> list[dict]:
        if self.trip and ts > self.trip[0]:
            self.trip = None
        if self.trip is None and rng.random() < 0.01:
            country = rng.choice([c for c in TRAVEL_COUNTRIES if c != self.home])
            self.trip = (ts + int(rng.uniform(2, 8) * DAY_MS), country)
        if rng.random() < 0.04:
            return self.spree(rng, ts)
        if self.gamer and rng.random() < 0.3:
            return self.app_store(rng, ts)
        return [self.one(rng, ts)]

    def one(self, rng: random.Random, ts: int) -> dict:
        r = rng.random()
        if self.trip is not None:
            country = self.trip[1]
            if r < 0.75:  # abroad: shops and ATMs there, never seen before
                if r < 0.1:
                    return self.txn(ts, rng.choice((50, 100, 200)), (f"m-{country}-atm{rng.randrange(999)}", ATM_MCC),
                                    country, "atm", None)
                return self.txn(ts, self.typical(rng) * 1.3,
                                (f"m-{country}-{rng.randrange(40_000)}", rng.choice(EVERYDAY_MCC + ("7011", "4121"))),
                                country, "pos", None)
            # otherwise online shopping, from the usual devices, while abroad
            return self.ecom(rng, ts)
        if self.coffee and r < 0.25:
            return self.txn(ts, rng.uniform(2.2, 6.5), self.coffee_shop, self.home, "pos", None)
        if rng.random() < 0.01:  # a big legitimate purchase, usually somewhere new
            merchant = (f"m-{self.home}-{rng.randrange(40_000)}", rng.choice(BIG_MCC))
            channel = rng.choice(("pos", "ecom"))
            return self.txn(ts, self.typical(rng) * rng.uniform(4, 25), merchant, self.home, channel,
                            rng.choice(self.devices) if channel == "ecom" else None)
        r = rng.random()
        if r < self.atm_share:
            return self.txn(ts, rng.choice((20, 40, 50, 100, 200)), (f"m-{self.home}-atm{rng.randrange(50)}", ATM_MCC),
                            self.home, "atm", None)
        if r < self.atm_share + self.ecom_share:
            return self.ecom(rng, ts)
        if rng.random() < 0.1:
            merchant = (f"m-{self.home}-{rng.randrange(40_000)}", rng.choice(EVERYDAY_MCC))
            if rng.random() < 0.3:
                self.pos_merchants = (self.pos_merchants + [merchant])[-10:]
        else:
            merchant = rng.choice(self.pos_merchants)
        return self.txn(ts, self.typical(rng), merchant, self.home, "pos", None)

    def ecom(self, rng: random.Random, ts: int) -> dict:
        if rng.random() < 0.005:  # a new phone
            self.devices = (self.devices + [f"{self.devices[0]}-new{self.seq}"])[-3:]
        # Mostly the newest device; now and then a one-off one (a work laptop, a friend's phone).
        device = f"dev-once-{rng.randrange(10**9)}" if rng.random() < 0.03 else (
            self.devices[-1] if rng.random() < 0.7 else rng.choice(self.devices))
        country = self.home
        if rng.random() < 0.02:  # a small donation or a trial fee somewhere new: looks like a card test
            merchant = (f"m-web-{rng.randrange(20_000)}", rng.choice(("8398", "5968", "5816")))
            return self.txn(ts, rng.uniform(1, 5), merchant, country, "ecom", device)
        if rng.random() < 0.15:
            merchant = (f"m-web-{rng.randrange(20_000)}", rng.choice(ONLINE_MCC))
            if rng.random() < 0.3:
                self.ecom_merchants = (self.ecom_merchants + [merchant])[-6:]
            if rng.random() < 0.3:  # a shop abroad
                country = rng.choice(TRAVEL_COUNTRIES)
        else:
            merchant = rng.choice(self.ecom_merchants)
        return self.txn(ts, self.typical(rng), merchant, country, "ecom", device)

    def app_store(self, rng: random.Random, ts: int) -> list[dict]:
        """A few small in-app purchases within minutes at one digital merchant: legitimate small amounts."""
        merchant = self.digital
        out = []
        for _ in range(rng.randint(1, 6)):
            out.append(self.txn(ts, rng.choice((0.99, 1.99, 2.99, 4.99)), merchant, self.home, "ecom", self.devices[-1]))
            ts += int(rng.expovariate(1 / 90.0) * 1000) + 5000
        return out

    def spree(self, rng: random.Random, ts: int) -> list[dict]:
        """Several purchases within half an hour (a mall, a market): legitimate velocity."""
        out = []
        for _ in range(rng.randint(3, 7)):
            out.append(self.one(rng, ts))
            ts += int(rng.uniform(1, 8) * 60_000)
        return out

    # -- fraud ----------------------------------------------------------------------------------

    def fraud(self, rng: random.Random, ts: int) -> list[dict]:
        ts = (ts // DAY_MS) * DAY_MS + int(rng.uniform(0, 24) * HOUR_MS)  # any time of day
        r = rng.random()
        if r < 0.45:
            return self.card_testing(rng, ts)
        if r < 0.75:
            return self.takeover(rng, ts)
        return self.high_value(rng, ts)

    def card_testing(self, rng: random.Random, ts: int) -> list[dict]:
        device = f"fraud-dev-{rng.randrange(10**9)}" if rng.random() < 0.7 else None
        country = rng.choice((self.home,) * 4 + FRAUD_COUNTRIES)
        # Some testers spread merchants, some hammer a few; some are fast, some pace themselves.
        merchants = [(f"m-web-t{rng.randrange(100_000)}", rng.choice(TESTING_MCC)) for _ in range(rng.randint(1, 25))]
        gap_s = rng.choice((10.0, 30.0, 120.0, 400.0))
        out = []
        for _ in range(rng.randint(2, 25)):
            out.append(self.txn(ts, rng.uniform(0.5, 4.99), rng.choice(merchants), country, "ecom", device, 1,
                                "card_testing"))
            ts += int(rng.expovariate(1 / gap_s) * 1000) + 1000
        if rng.random() < 0.4:  # cash-out once the card is known to work
            for _ in range(rng.randint(1, 2)):
                ts += int(rng.uniform(1, 20) * 60_000)
                merchant = (f"m-web-{rng.randrange(20_000)}", rng.choice(TAKEOVER_MCC))
                out.append(self.txn(ts, rng.uniform(150, 1500), merchant, country, "ecom", device, 1, "card_testing"))
        return out

    def takeover(self, rng: random.Random, ts: int) -> list[dict]:
        device = f"fraud-dev-{rng.randrange(10**9)}"
        # Through a proxy in the holder's own country, or from abroad.
        country = self.home if rng.random() < 0.3 else rng.choice([c for c in FRAUD_COUNTRIES if c != self.home])
        out = []
        for _ in range(rng.randint(1, 6)):
            merchant = (f"m-web-{rng.randrange(20_000)}", rng.choice(TAKEOVER_MCC + ONLINE_MCC))
            amount = math.exp(self.log_amount) * rng.uniform(1, 15)
            out.append(self.txn(ts, amount, merchant, country, "ecom", device, 1, "takeover"))
            ts += int(rng.uniform(2, 40) * 60_000)
        return out

    def high_value(self, rng: random.Random, ts: int) -> list[dict]:
        out = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            merchant = (f"m-{self.home}-{rng.randrange(40_000)}", rng.choice(BIG_MCC))
            channel = "pos" if rng.random() < 0.6 else "ecom"
            amount = math.exp(self.log_amount) * rng.uniform(5, 40)
            out.append(self.txn(ts, amount, merchant, self.home, channel,
                                None if channel == "pos" else rng.choice(self.devices), 1, "high_value"))
            ts += int(rng.uniform(5, 90) * 60_000)
        return out


FRAUD_PER_DAY = 0.005  # chance per card per day of a fraud episode, once the card has history
WARM_UP_TXNS = 5


def _episodes(rng: random.Random, card: Card, start_ms: int) -> Iterator[list[dict]]:
    """The card's life as episodes (a legitimate visit, a spree, a fraud attack), in time order."""
    ts = card.next_time(rng, start_ms - DAY_MS // 2)
    while True:
        legit = card.legit(rng, ts)
        yield legit
        nxt = card.next_time(rng, legit[-1]["ts"])
        # Fraud strikes between legitimate activity, at a rate per elapsed day.
        days = (nxt - legit[-1]["ts"]) / DAY_MS
        if card.seq >= WARM_UP_TXNS and rng.random() < 1 - math.exp(-FRAUD_PER_DAY * days):
            at = legit[-1]["ts"] + int(rng.random() * (nxt - legit[-1]["ts"]))
            attack = card.fraud(rng, max(at, legit[-1]["ts"] + 60_000))
            yield attack
            nxt = max(nxt, attack[-1]["ts"] + 60_000)
        ts = nxt


def simulate(n_cards: int, days: float, seed: int, start_ms: int = START_MS,
             progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """All transactions of `n_cards` over `days`, sorted by event time (ties by txn id)."""
    rng = random.Random(seed)
    end = start_ms + int(days * DAY_MS)
    out: list[dict] = []
    for i in range(n_cards):
        card = Card(rng, i)
        for episode in _episodes(rng, card, start_ms):
            if episode[0]["ts"] >= end:
                break
            out.extend(t for t in episode if start_ms <= t["ts"] < end)
        if progress and (i + 1) % max(1, n_cards // 20) == 0:
            progress(i + 1, n_cards)
    out.sort(key=lambda t: (t["ts"], t["txn_id"]))
    return out


def live(n_users: int, seed: int, now_ms: Callable[[], int]) -> Iterator[dict]:
    """Endless transaction stream for the generator, `n_users` cards, stamped with `now_ms()`.

    Cards are picked at random; a card in the middle of a multi-transaction episode (a spree, a
    card-testing burst) is picked more often, so bursts look like bursts. A card's transactions
    stay in order. Labels are not sent.
    """
    rng = random.Random(seed)
    cards = [Card(rng, i) for i in range(n_users)]
    lives = [_episodes(rng, c, START_MS) for c in cards]
    pending: dict[int, list[dict]] = {}
    while True:
        busy = [u for u, q in pending.items() if q]
        u = rng.choice(busy) if busy and rng.random() < 0.5 else rng.randrange(n_users)
        if not pending.get(u):
            pending[u] = list(next(lives[u]))
        t = pending[u].pop(0)
        t.pop("_label", None)
        t.pop("_pattern", None)
        t["ts"] = now_ms()
        yield t
