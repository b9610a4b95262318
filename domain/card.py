"""Per-card transaction state and its fraud features: pure functions, no Faust.

`apply(state, txn)` folds one validated transaction into the card's state and returns a new state
(the input is not modified); `features(state, txn)` reads the state *after* the transaction was
applied. The agent and the training job call exactly these two functions, so online and offline
features are the same bits. The state is plain JSON (str keys, ints, floats, lists, dicts) and
survives the orjson round trip through the table unchanged.

Time is the transaction's own timestamp (epoch ms), never the wall clock. Transactions of one card
are folded in arrival order. A transaction older than the latest one seen ("late") still counts,
but its time is clamped to the latest seen (the policy of `domain.session`): clocks never run
backwards, every age and delta is >= 0, a late transaction lands in the newest slot of every window,
and replaying the same input in the same order gives the same features.

Every feature describes the card *including* the current transaction ("3 transactions in the last
minute" counts this one). The "new merchant / country / device", "amount vs the card's habit" and
"hour of day vs the card's habit" facts compare the transaction with the state *before* it; `apply`
computes them and keeps them under `state["txn"]` for `features` to read.

Bounded state, and the approximations that buys (the size of the state never grows with the number
of transactions a card makes):
- Velocity over 1 min, 10 min and 1 h comes from a ring of the last RING_SIZE (64) transaction
  times and amounts. It is exact as long as fewer than 64 transactions fall in the window; beyond
  that the count saturates at 64 (and the amount covers the latest 64), which already marks a burst.
- The 1-day velocity is an exponentially decayed count / amount with time constant 1 day:
  sum over past transactions of exp(-age / 1 day). For a steady rate it equals the true count of
  the last day; a burst counts fully at once and fades smoothly (weight 0.37 after a day) instead
  of falling off a cliff after exactly 24 h.
- Merchants, countries and devices are kept as capped maps value -> last-seen time (32 merchants,
  16 countries, 16 devices); when full, the least recently seen entry is evicted. "Distinct in the
  last day" counts the entries seen within the last 24 h (so it saturates at the cap), and "new"
  means "not among the most recently seen <cap> values": a merchant last used 33 merchants ago
  counts as new again.
- The amount habit is a Welford mean / variance of log(amount) over the card's whole history
  (three numbers); log because amounts are multiplicative (a 10x outlier is 10x at any scale).
- The hour-of-day habit is a 24-bucket histogram of counts.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from itertools import accumulate

CHANNELS = ("ecom", "pos", "atm")
CHANNEL_CODE = {c: i for i, c in enumerate(CHANNELS)}

RING_SIZE = 64
MAX_MERCHANTS = 32
MAX_COUNTRIES = 16
MAX_DEVICES = 16
WINDOWS_MS = (60_000, 600_000, 3_600_000)  # 1 min, 10 min, 1 h (from the ring)
DAY_MS = 86_400_000
DAY_S = 86_400.0  # time constant of the decayed day window
HOUR_MS = 3_600_000
SMALL_AMOUNT = 5.0  # "card testing" amounts are below this
MIN_LOG_STD = 0.25  # floor of the log-amount spread, so a card with constant amounts has no infinite z
MAX_LOG_RATIO = 30.0  # amount_ratio is at most e^30
NEVER = -1.0  # value of a "seconds since X" or "share" feature when X never happened

FEATURE_NAMES = (
    "amount",
    "channel",
    "mcc",
    "hour_of_day",
    "secs_since_prev_txn",
    "txn_count_1m",
    "txn_amount_1m",
    "txn_count_10m",
    "txn_amount_10m",
    "txn_count_1h",
    "txn_amount_1h",
    "txn_count_1d",
    "txn_amount_1d",
    "small_share_10m",
    "distinct_merchants_1d",
    "distinct_countries_1d",
    "distinct_devices_1d",
    "new_merchant",
    "new_country",
    "new_device",
    "has_device",
    "country_changed",
    "secs_since_other_country",
    "amount_z",
    "amount_ratio",
    "hour_share",
    "txns_total",
)
# Velocity features, for reasons and tests.
VELOCITY_FEATURES = tuple(n for n in FEATURE_NAMES if n.startswith("txn_count_") or n.startswith("txn_amount_"))


def new_state() -> dict:
    return {
        "last_ts": None,   # latest transaction time seen (ms)
        "prev_ts": None,   # effective time of the transaction before the latest
        "prev_country": None,
        "ring_ts": [],     # effective times of the last RING_SIZE transactions (non-decreasing)
        "ring_amount": [],  # their amounts
        "day_count": 0.0,  # decayed count / amount, time constant DAY_S, as of last_ts
        "day_amount": 0.0,
        "merchants": {},   # merchant_id -> last-seen ts, at most MAX_MERCHANTS
        "countries": {},   # country -> last-seen ts, at most MAX_COUNTRIES
        "devices": {},     # device_id -> last-seen ts, at most MAX_DEVICES
        "n": 0,            # transactions folded
        "log_mean": 0.0,   # Welford over log(amount)
        "log_m2": 0.0,
        "hours": [0] * 24,  # transactions per hour of day (UTC, effective time)
        "txn": None,       # facts about the latest transaction relative to the state before it
    }


def _seen(table: dict, value: str, ts: int, cap: int) -> dict:
    """A copy of `table` with `value` seen at `ts`; evicts the least recently seen beyond `cap`."""
    out = dict(table)
    out[value] = ts
    if len(out) > cap:
        # Oldest last-seen first, ties by value: independent of dict order. Never the current value.
        victim = min((k for k in out if k != value), key=lambda k: (out[k], k))
        del out[victim]
    return out


def _hour(ts: int) -> int:
    return (ts // HOUR_MS) % 24


def apply(state: dict, txn: dict) -> dict:
    """Return the state after `txn` (a validated transaction dict). `state` is not modified."""
    last = state["last_ts"]
    ts = txn["ts"] if last is None else max(txn["ts"], last)
    amount = txn["amount"]
    merchant, country, device = txn["merchant_id"], txn["country"], txn.get("device_id")
    dt_s = 0.0 if last is None else (ts - last) / 1000.0

    # Facts relative to the state before this transaction.
    countries = state["countries"]
    others = [t for c, t in countries.items() if c != country]
    n, mean, m2 = state["n"], state["log_mean"], state["log_m2"]
    x = math.log(amount)
    if n >= 2:
        z = (x - mean) / max(math.sqrt(m2 / (n - 1)), MIN_LOG_STD)
    else:
        z = 0.0
    hour = _hour(ts)
    hours = state["hours"]
    near = hours[(hour - 1) % 24] + hours[hour] + hours[(hour + 1) % 24]
    facts = {
        "new_merchant": merchant not in state["merchants"],
        "new_country": country not in countries,
        "new_device": device is not None and device not in state["devices"],
        "country_changed": state["prev_country"] is not None and state["prev_country"] != country,
        "other_country_ts": max(others) if others else None,
        "amount_z": z,
        # Clamped so that an absurd amount against a tiny habit cannot overflow.
        "amount_ratio": math.exp(min(x - mean, MAX_LOG_RATIO)) if n >= 1 else 1.0,
        "hour_share": near / n if n >= 1 else NEVER,
    }

    # Welford update of log(amount).
    n1 = n + 1
    d = x - mean
    mean1 = mean + d / n1
    decay = math.exp(-dt_s / DAY_S)
    new_hours = list(hours)
    new_hours[hour] += 1
    return {
        "last_ts": ts,
        "prev_ts": last,
        "prev_country": country,
        "ring_ts": state["ring_ts"][-(RING_SIZE - 1):] + [ts],
        "ring_amount": state["ring_amount"][-(RING_SIZE - 1):] + [amount],
        "day_count": state["day_count"] * decay + 1.0,
        "day_amount": state["day_amount"] * decay + amount,
        "merchants": _seen(state["merchants"], merchant, ts, MAX_MERCHANTS),
        "countries": _seen(countries, country, ts, MAX_COUNTRIES),
        "devices": state["devices"] if device is None else _seen(state["devices"], device, ts, MAX_DEVICES),
        "n": n1,
        "log_mean": mean1,
        "log_m2": m2 + d * (x - mean1),
        "hours": new_hours,
        "txn": facts,
    }


def _distinct_since(table: dict, now: int) -> float:
    return float(sum(1 for t in table.values() if now - t < DAY_MS))


def features(state: dict, txn: dict) -> tuple[float, ...]:
    """Feature vector for `txn`, read from the state after it was applied."""
    now = state["last_ts"]
    prev = state["prev_ts"]
    facts = state["txn"]

    # Velocity from the ring. Its times never decrease, so a window holds the newest entries, those
    # after the last time outside it (now - ts < w <=> ts > now - w), found by bisection; the sums add
    # the amounts newest first, as a walk back from the newest entry would (the same bits).
    ring_ts, ring_amount = state["ring_ts"], state["ring_amount"]
    counts = [len(ring_ts) - bisect_right(ring_ts, now - w) for w in WINDOWS_MS]
    running = list(accumulate(reversed(ring_amount[len(ring_amount) - counts[2]:]), initial=0.0))
    sums = [running[n] for n in counts]
    small_10m = sum(1 for a in ring_amount[len(ring_amount) - counts[1]:] if a < SMALL_AMOUNT)

    other_ts = facts["other_country_ts"]
    return (
        float(txn["amount"]),
        float(CHANNEL_CODE[txn["channel"]]),
        float(int(txn["mcc"])),
        float(_hour(now)),
        NEVER if prev is None else (now - prev) / 1000.0,
        float(counts[0]),
        sums[0],
        float(counts[1]),
        sums[1],
        float(counts[2]),
        sums[2],
        float(state["day_count"]),
        float(state["day_amount"]),
        small_10m / counts[1],
        _distinct_since(state["merchants"], now),
        _distinct_since(state["countries"], now),
        _distinct_since(state["devices"], now),
        float(facts["new_merchant"]),
        float(facts["new_country"]),
        float(facts["new_device"]),
        float("device_id" in txn),
        float(facts["country_changed"]),
        NEVER if other_ts is None else (now - other_ts) / 1000.0,
        float(facts["amount_z"]),
        float(facts["amount_ratio"]),
        float(facts["hour_share"]),
        float(state["n"]),
    )
