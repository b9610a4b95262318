"""Hand-computed cases for the per-card transaction state and its fraud features (pure functions)."""
from __future__ import annotations

import copy
import math
import random

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import card as c

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC


def tx(i, t_s, amount=20.0, merchant="m1", country="DE", channel="pos", device=None, mcc="5411", card="c1"):
    t = {"txn_id": f"t{i}", "card_id": card, "ts": T0 + int(t_s * 1000), "amount": amount, "currency": "EUR",
         "merchant_id": merchant, "mcc": mcc, "country": country, "channel": channel}
    if device is not None:
        t["device_id"] = device
    return t


def run(txns, state=None):
    state = state or c.new_state()
    out = []
    for t in txns:
        state = c.apply(state, t)
        out.append(dict(zip(c.FEATURE_NAMES, c.features(state, t))))
    return state, out


def test_feature_vector_matches_names():
    state, [f] = run([tx(0, 0)])
    assert len(c.features(state, tx(0, 0))) == len(c.FEATURE_NAMES) == len(set(c.FEATURE_NAMES))
    assert all(isinstance(v, float) for v in c.features(state, tx(0, 0)))
    assert c.VELOCITY_FEATURES == ("txn_count_1m", "txn_amount_1m", "txn_count_10m", "txn_amount_10m",
                                   "txn_count_1h", "txn_amount_1h", "txn_count_1d", "txn_amount_1d")


def test_first_transaction():
    _, [f] = run([tx(0, 0, 42.5, mcc="5812", channel="ecom", device="d1")])
    assert f["amount"] == 42.5
    assert f["channel"] == 0.0 and f["mcc"] == 5812.0
    assert f["hour_of_day"] == 22.0  # T0 is 22:13 UTC
    assert f["secs_since_prev_txn"] == c.NEVER
    for w in ("1m", "10m", "1h", "1d"):
        assert f[f"txn_count_{w}"] == 1.0 and f[f"txn_amount_{w}"] == 42.5
    assert f["small_share_10m"] == 0.0
    assert (f["distinct_merchants_1d"], f["distinct_countries_1d"], f["distinct_devices_1d"]) == (1, 1, 1)
    assert (f["new_merchant"], f["new_country"], f["new_device"], f["has_device"]) == (1, 1, 1, 1)
    assert f["country_changed"] == 0.0 and f["secs_since_other_country"] == c.NEVER
    assert f["amount_z"] == 0.0 and f["amount_ratio"] == 1.0
    assert f["hour_share"] == c.NEVER
    assert f["txns_total"] == 1.0


def test_velocity_windows_from_the_ring():
    # ages relative to the last transaction (t=4000 s): 4000, 3500, 3000, 700, 400, 30, 0 seconds
    times = (0, 500, 1000, 3300, 3600, 3970, 4000)
    amounts = (100.0, 1.0, 2.0, 3.0, 4.0, 7.0, 10.0)
    _, fs = run([tx(i, t, a) for i, (t, a) in enumerate(zip(times, amounts))])
    f = fs[-1]
    assert f["secs_since_prev_txn"] == 30.0
    assert (f["txn_count_1m"], f["txn_amount_1m"]) == (2.0, 17.0)          # 0 s, 30 s
    assert (f["txn_count_10m"], f["txn_amount_10m"]) == (3.0, 21.0)        # + 400 s
    assert (f["txn_count_1h"], f["txn_amount_1h"]) == (6.0, 27.0)          # + 700, 3000, 3500 s; not 4000 s
    # window edges are exclusive: exactly 60 s old is outside the minute
    _, fs = run([tx(0, 0), tx(1, 60)])
    assert fs[-1]["txn_count_1m"] == 1.0 and fs[-1]["txn_count_10m"] == 2.0


def test_day_window_is_an_exponentially_decayed_sum():
    _, fs = run([tx(0, 0, 10.0), tx(1, 43_200, 30.0), tx(2, 86_400 + 43_200, 5.0)])
    f = fs[1]
    assert f["txn_count_1d"] == pytest.approx(math.exp(-0.5) + 1)
    assert f["txn_amount_1d"] == pytest.approx(10 * math.exp(-0.5) + 30)
    f = fs[2]
    assert f["txn_count_1d"] == pytest.approx(math.exp(-1.5) + math.exp(-1.0) + 1)
    assert f["txn_amount_1d"] == pytest.approx(10 * math.exp(-1.5) + 30 * math.exp(-1.0) + 5)
    # steady rate: one transaction an hour for a long time -> about 24 in "the last day"
    _, fs = run([tx(i, 3600 * i) for i in range(24 * 10)])
    q = math.exp(-1 / 24)
    assert fs[-1]["txn_count_1d"] == pytest.approx((1 - q ** 240) / (1 - q), rel=1e-9)  # geometric series
    assert 24 <= fs[-1]["txn_count_1d"] <= 25


def _velocity_by_walking_back(state: dict) -> tuple:
    """The velocity features by their definition: from the newest ring entry back to the widest window."""
    now, counts, sums, small = state["last_ts"], [0, 0, 0], [0.0, 0.0, 0.0], 0
    for ts, a in zip(reversed(state["ring_ts"]), reversed(state["ring_amount"])):
        age = now - ts
        if age >= c.WINDOWS_MS[2]:
            break
        for w in range(3):
            if age < c.WINDOWS_MS[w]:
                counts[w] += 1
                sums[w] += a
        small += age < c.WINDOWS_MS[1] and a < c.SMALL_AMOUNT
    return counts[0], sums[0], counts[1], sums[1], counts[2], sums[2], small / counts[1]


# ms between transactions; sums of the sampled ones fall exactly on the windows' edges
_GAPS_MS = st.sampled_from([0, 1, 20_000, 30_000, 59_999, 60_000, 300_000, 1_800_000]) | st.integers(0, 4_000_000)


@given(st.lists(st.tuples(_GAPS_MS, st.floats(0.01, 1e7)), min_size=1, max_size=150))
def test_velocity_is_what_a_walk_back_through_the_ring_gives_bit_for_bit(txns):
    state, t_ms = c.new_state(), 0
    for i, (gap, amount) in enumerate(txns):
        t_ms += gap
        txn = {**tx(i, 0, amount), "ts": T0 + t_ms}
        state = c.apply(state, txn)
        f = dict(zip(c.FEATURE_NAMES, c.features(state, txn)))
        assert (f["txn_count_1m"], f["txn_amount_1m"], f["txn_count_10m"], f["txn_amount_10m"], f["txn_count_1h"],
                f["txn_amount_1h"], f["small_share_10m"]) == _velocity_by_walking_back(state)


def test_card_testing_share_of_small_amounts_in_ten_minutes():
    txns = [tx(0, 0, 3.0), tx(1, 100, 50.0), tx(2, 700, 4.99), tx(3, 750, 5.0), tx(4, 760, 0.5)]
    _, fs = run(txns)
    # at t=760: within 10 min are t=700 (4.99), 750 (5.0: not small), 760 (0.5); t=100 is 660 s old
    assert fs[-1]["small_share_10m"] == pytest.approx(2 / 3)
    assert fs[1]["small_share_10m"] == 0.5
    assert fs[0]["small_share_10m"] == 1.0


def test_distinct_in_the_last_day_and_first_seen():
    txns = [tx(0, 0, merchant="m1", country="DE", device="d1", channel="ecom"),
            tx(1, 60, merchant="m2", country="DE", device="d1", channel="ecom"),
            tx(2, 120, merchant="m1", country="FR"),                       # no device
            tx(3, 86_400 + 90, merchant="m3", country="DE", device="d2", channel="ecom")]
    _, fs = run(txns)
    assert [f["new_merchant"] for f in fs] == [1, 1, 0, 1]
    assert [f["new_country"] for f in fs] == [1, 0, 1, 0]
    assert [f["new_device"] for f in fs] == [1, 0, 0, 1]
    assert [f["has_device"] for f in fs] == [1, 1, 0, 1]
    assert [f["distinct_merchants_1d"] for f in fs] == [1, 2, 2, 2]  # at the end: m3, m1 (seen at 120 s)
    assert [f["distinct_countries_1d"] for f in fs] == [1, 1, 2, 2]  # DE, FR (120 s: 86 370 s ago)
    assert [f["distinct_devices_1d"] for f in fs] == [1, 1, 1, 1]    # d1 last seen 86 340 s ago -> out


def test_country_change_and_its_speed():
    txns = [tx(0, 0, country="DE"), tx(1, 600, country="DE"), tx(2, 900, country="US"),
            tx(3, 1000, country="US"), tx(4, 5000, country="DE")]
    _, fs = run(txns)
    assert [f["country_changed"] for f in fs] == [0, 0, 1, 0, 1]
    # seconds since the card was last used in any other country
    assert [f["secs_since_other_country"] for f in fs] == [c.NEVER, c.NEVER, 300.0, 400.0, 4000.0]


def test_amount_against_the_cards_habit():
    amounts = [10.0, 20.0, 40.0]
    state, fs = run([tx(i, 100 * i, a) for i, a in enumerate(amounts)])
    logs = [math.log(a) for a in amounts]
    # second: one prior amount, no spread yet
    assert fs[1]["amount_z"] == 0.0
    assert fs[1]["amount_ratio"] == pytest.approx(2.0)
    # third: mean and sample std of log(10), log(20)
    mean = (logs[0] + logs[1]) / 2
    std = math.sqrt(((logs[0] - mean) ** 2 + (logs[1] - mean) ** 2) / 1)
    assert fs[2]["amount_z"] == pytest.approx((logs[2] - mean) / std)
    assert fs[2]["amount_ratio"] == pytest.approx(40 / math.sqrt(200))
    # Welford state equals the direct computation
    assert state["n"] == 3
    assert state["log_mean"] == pytest.approx(sum(logs) / 3)
    assert state["log_m2"] == pytest.approx(sum((x - sum(logs) / 3) ** 2 for x in logs))
    # constant amounts: the spread is floored, so z stays finite
    _, fs = run([tx(i, 100 * i, 10.0) for i in range(5)] + [tx(5, 600, 100.0)])
    assert fs[-1]["amount_z"] == pytest.approx(math.log(10) / c.MIN_LOG_STD)
    # an absurd amount against a tiny habit: ratio clamped, no overflow
    _, fs = run([tx(0, 0, 1e-300), tx(1, 1, 1e7)])
    assert fs[-1]["amount_ratio"] == pytest.approx(math.exp(c.MAX_LOG_RATIO))


def test_hour_of_day_habit():
    day = 86_400
    # T0 is 22:13 UTC; three days at 22h, then one at 23h, one at 10h
    txns = [tx(0, 0), tx(1, day), tx(2, 2 * day), tx(3, 3 * day + 3600), tx(4, 4 * day + 12 * 3600)]
    _, fs = run(txns)
    assert [f["hour_of_day"] for f in fs] == [22, 22, 22, 23, 10]
    assert fs[1]["hour_share"] == 1.0
    assert fs[3]["hour_share"] == 1.0       # 22h is next to 23h
    assert fs[4]["hour_share"] == 0.0       # 10h: never near
    _, fs = run([tx(0, 0), tx(1, 12 * 3600), tx(2, day)])
    assert fs[2]["hour_share"] == 0.5


def test_apply_is_pure():
    state, _ = run([tx(i, 10 * i, 3.0, merchant=f"m{i}", device=f"d{i}") for i in range(5)])
    before = copy.deepcopy(state)
    c.apply(state, tx(9, 100, 7.0, merchant="mx", country="US", device="dx"))
    assert state == before


def test_out_of_order_transaction_is_clamped_to_the_latest_seen():
    txns = [tx(0, 0), tx(1, 100), tx(2, 40, 9.0, merchant="m2")]  # the last one is 60 s late
    state, fs = run(txns)
    f = fs[-1]
    assert state["last_ts"] == T0 + 100_000 and state["prev_ts"] == T0 + 100_000
    assert f["secs_since_prev_txn"] == 0.0   # clamped: never negative
    assert f["txn_count_1m"] == 2.0 and f["txn_amount_1m"] == 29.0  # counted at the latest time
    assert state["ring_ts"] == sorted(state["ring_ts"])
    assert state["merchants"]["m2"] == T0 + 100_000
    assert f["txn_count_1d"] == pytest.approx(math.exp(-100 / 86_400) + 1 + 1)
    # a much later event afterwards sees normal deltas again
    _, fs2 = run([tx(3, 160)], state)
    assert fs2[0]["secs_since_prev_txn"] == 60.0


def test_same_input_same_features_including_json_round_trip():
    """The worker stores the state as orjson between batches; the features must not change."""
    rng = random.Random(3)
    txns = [tx(i, i * rng.uniform(1, 900), round(rng.lognormvariate(3, 1), 2), merchant=f"m{rng.randrange(50)}",
               country=rng.choice("DE FR US".split()), device=rng.choice([None, "d1", "d2"]),
               channel=rng.choice(c.CHANNELS)) for i in range(300)]
    _, direct = run(txns)
    state, via_json = c.new_state(), []
    for t in txns:
        state = orjson.loads(orjson.dumps(c.apply(orjson.loads(orjson.dumps(state)), t)))
        via_json.append(c.features(state, t))
    assert [tuple(f.values()) for f in direct] == via_json


def test_state_stays_bounded_over_10k_transactions():
    rng = random.Random(1)
    state = c.new_state()
    sizes = []
    for i in range(10_000):
        t = tx(i, i * 30 + rng.randrange(-100, 100), round(rng.uniform(0.5, 500), 2),
               merchant=f"m{rng.randrange(10**6)}", country=f"{chr(65 + rng.randrange(26))}{chr(65 + rng.randrange(26))}",
               device=f"d{rng.randrange(10**6)}", channel="ecom")
        state = c.apply(state, t)
        c.features(state, t)
        if i % 1000 == 999:
            sizes.append(len(orjson.dumps(state)))
    assert len(state["ring_ts"]) == len(state["ring_amount"]) == c.RING_SIZE
    assert len(state["merchants"]) == c.MAX_MERCHANTS
    assert len(state["countries"]) <= c.MAX_COUNTRIES and len(state["devices"]) == c.MAX_DEVICES
    assert len(state["hours"]) == 24
    assert max(sizes) < 6000 and max(sizes) - min(sizes) < 200, sizes  # flat, not growing
    assert state["n"] == 10_000


def test_velocity_saturates_at_the_ring_size():
    _, fs = run([tx(i, i * 0.5, 1.0, merchant=f"m{i}") for i in range(100)])  # 100 in 50 s
    f = fs[-1]
    assert f["txn_count_1m"] == f["txn_count_10m"] == f["txn_count_1h"] == c.RING_SIZE
    assert f["txn_amount_1m"] == c.RING_SIZE * 1.0
    assert f["txn_count_1d"] == pytest.approx(sum(math.exp(-0.5 * k / 86_400) for k in range(100)))
    assert f["distinct_merchants_1d"] == c.MAX_MERCHANTS
    assert f["small_share_10m"] == 1.0


def test_eviction_keeps_the_most_recently_seen():
    txns = [tx(i, i, merchant=f"m{i}") for i in range(c.MAX_MERCHANTS + 3)]
    state, _ = run(txns)
    assert sorted(state["merchants"], key=lambda m: int(m[1:])) == [f"m{i}" for i in range(3, c.MAX_MERCHANTS + 3)]
    # the evicted m0 counts as new again; m3 (still kept) does not
    _, fs = run([tx(99, 100, merchant="m0"), tx(100, 101, merchant="m4")], state)
    assert fs[0]["new_merchant"] == 1.0 and fs[1]["new_merchant"] == 0.0
    # all at the same clamped time: the current value is never the one evicted
    state, fs = run([tx(i, 0, merchant=f"z{i}") for i in range(c.MAX_MERCHANTS + 5)])
    assert f"z{c.MAX_MERCHANTS + 4}" in state["merchants"]
