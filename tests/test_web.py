"""The worker's web API against real workers on the embedded broker: every endpoint, its errors,
the bearer token, and key lookups routed to the owner of the key's partition."""
from __future__ import annotations

import asyncio
import http.client
import re
import time
import urllib.parse
from types import SimpleNamespace

import orjson
import pytest
from aiokafka.partitioner import murmur2

from tests.flows import FLOWS
from tests.harness import MODEL_DIR, produce, produce_events, read_json

TOKEN = "s3cret-token"


def get(base: str, path: str, token: str | None = None, headers: dict | None = None):
    """GET without following redirects: (status, headers, body bytes)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def get_json(base: str, path: str, token: str | None = None, status: int = 200):
    code, headers, body = get(base, path, token)
    assert code == status, (path, code, body[:500])
    assert headers["content-type"].startswith("application/json"), (path, headers)
    return orjson.loads(body)


def wait_until(fn, timeout: float = 30, what: str = "condition"):
    """Poll `fn` until it returns a truthy value (the wait is for the system, not the assertion)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


def partition(key: str, partitions: int = 4) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def users_on_every_partition(prefix: str, per_partition: int = 2) -> list[str]:
    users, counts, i = [], {p: 0 for p in range(4)}, 0
    while min(counts.values()) < per_partition:
        u = f"{prefix}{i}"
        if counts[partition(u)] < per_partition:
            counts[partition(u)] += 1
            users.append(u)
        i += 1
    return users


def cart_event(i: int, user: str, ts: int, kind: str = "product_view") -> dict:
    e = {"event_id": f"ev-{user}-{i}", "user_id": user, "ts": ts, "type": kind, "category": "books",
         "price": 10.0 + i, "quantity": 1}
    if kind != "page_view":
        e["product_id"] = f"p{i % 7}"
    return e


# -- one worker, token required: every endpoint, the 4xx cases, the token ---------------------------

def test_every_endpoint_with_token(broker, workers):
    w = workers("w1", env={"WEB_TOKEN": TOKEN})
    base = w.url

    # the open endpoints
    assert get_json(base, "/health") == {"status": "ok"}
    assert get(base, "/ready")[0] == 401, "readiness is behind the token like every endpoint but two"
    ready = wait_until(lambda: get(base, "/ready", TOKEN)[0] == 200, what="/ready 200")
    assert ready
    code, headers, body = get(base, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    code, headers, page = get(base, "/dashboard")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b"<svg" in page and b'const AUTH_REQUIRED = "true" === "true"' in page
    code, headers, _ = get(base, "/")
    assert code in (301, 302, 307, 308) and headers["location"] == "/dashboard"

    # everything else needs the token: missing, wrong, other scheme -> 401 JSON
    protected = ["/stats", "/tables", "/tables/user_sessions", "/dead-letters", "/model",
                 "/users/anyone/session", "/state/cart/anyone", "/cards/any/state",
                 "/table/", "/router/"]  # the last two are Faust's own routes
    for path in protected:
        for bad in (None, "wrong-token", ""):
            code, headers, body = get(base, path, token=bad)
            assert code == 401, (path, bad, code, body[:200])
            assert orjson.loads(body)["error"] and "bearer" in headers["www-authenticate"].lower()
        code, _, body = get(base, path, headers={"Authorization": f"Basic {TOKEN}"})
        assert code == 401, (path, "basic scheme")
    for path in protected[:5]:
        assert get(base, path, TOKEN)[0] == 200, path
    # a header of any bytes is a 401, never a 500 (non-ASCII gave a plain 500)
    for odd in ("Bearer caf\u00e9", b"Bearer \xff\xfe\x80", "Bearer \u00e9" + TOKEN, b"\xc3\x28 x"):
        code, headers, body = get(base, "/stats", headers={"Authorization": odd})
        assert code == 401 and orjson.loads(body)["error"], (odd, code, body[:200])
    # Faust's own table views read any key unchecked: they are off (the routed views answer)
    code, _, body = get(base, "/table/user_sessions/", TOKEN)
    assert code == 404 and orjson.loads(body)["error"], (code, body[:200])

    # data: events for every pipeline (generic over the pipelines that exist), plus a poison record
    now = int(time.time() * 1000)
    users = [f"web-u{i}" for i in range(6)]
    cart = [cart_event(i, u, now - 60_000 + i * 1000, "add_to_cart" if i % 3 == 0 else "product_view")
            for i, u in enumerate(users * 3)]
    produce_events(broker, "cart_events", cart, "user_id")
    others = {}
    for name, flow in FLOWS.items():
        if name == "cart":
            continue
        events = flow.valid(3, 7)
        others[name] = (flow, events)
        produce_events(broker, flow.source, events, flow.key)
    asyncio.run(produce(broker, "cart_events", [(b"web-bad", b"{not json")]))
    read_json(broker, "personalization_scores", len(cart), key="event_id")
    for name, (flow, events) in others.items():
        read_json(broker, flow.output, len(events), key=flow.id)

    # a user's live session, equal to the offline fold of its events
    expected = FLOWS["cart"].offline_states(cart)
    for u in users:
        body = get_json(base, f"/users/{u}/session", TOKEN)
        assert body["user_id"] == u and body["pipeline"] == "cart"
        assert body["state"] == expected[u]
        assert body["state"]["events"] == 3 and body["state"]["adds"] == sum(
            1 for e in cart if e["user_id"] == u and e["type"] == "add_to_cart")
        assert body["partition"] == partition(u)
        assert body["worker"] == base
        assert body["model_version"]
        feats = body["features_now"]
        assert list(feats) == list(FLOWS["cart"].pipeline.feature_names)
        assert feats["session_events"] == 3.0 and feats["cart_items"] == expected[u]["cart_items"]
        assert isinstance(body["recent_scores"], list)
        assert body["recent_scores"], "the processor feeds record_scores"
        for s in body["recent_scores"]:
            assert 0.0 <= s["score"] <= 1.0 and s["event_id"].startswith(f"ev-{u}-")
        assert get_json(base, f"/state/cart/{u}", TOKEN)["state"] == expected[u]

    # the other pipelines through the generic route (and the card route for fraud)
    for name, (flow, events) in others.items():
        states = flow.offline_states(events)
        key = sorted(states)[0]
        body = get_json(base, f"/state/{name}/{urllib.parse.quote(key, safe='')}", TOKEN)
        assert body["state"] == states[key] and body[flow.key] == key
        if name == "fraud":
            assert get_json(base, f"/cards/{urllib.parse.quote(key, safe='')}/state", TOKEN)["state"] == states[key]
    if "fraud" in FLOWS:
        assert get_json(base, "/cards/no-such-card/state", TOKEN, status=404)["error"] == "unknown card"
    else:
        assert get_json(base, "/cards/no-such-card/state", TOKEN, status=404)["error"]

    # 404 and 400, each a JSON error, never a stack trace
    assert get_json(base, "/users/nobody-here/session", TOKEN, status=404) == {
        "error": "unknown user", "user_id": "nobody-here"}
    for bad in ("a%00b", "tab%09in", "new%0Aline", "x" * 257, "del%7F"):
        err = get_json(base, f"/users/{bad}/session", TOKEN, status=400)
        assert err["error"].startswith("malformed user_id")
        err = get_json(base, f"/state/cart/{bad}", TOKEN, status=400)
        assert err["error"].startswith("malformed key")
    assert get_json(base, "/users/" + "x" * 256 + "/session", TOKEN, status=404)["error"] == "unknown user"
    assert get_json(base, "/state/nope/u1", TOKEN, status=404)["error"] == "unknown pipeline"
    assert get_json(base, "/tables/nope", TOKEN, status=404)["error"] == "unknown table"
    assert get_json(base, "/no/such/route", TOKEN, status=404)["error"]
    for path in ("/users/nobody/session", "/no/such/route", "/users/a%00b/session"):
        assert b"Traceback" not in get(base, path, TOKEN)[2]
    for odd in ("%FF", "%C3%28", "..%2F..%2Fetc", "%25", "%20", "caf%C3%A9"):
        code, _, body = get(base, f"/users/{odd}/session", TOKEN)
        assert code in (400, 404) and orjson.loads(body)["error"], (odd, code, body[:200])

    # tables: keys held here and partitions owned (a single worker owns all four); the local store
    # counts a key once its state is written, at most STATE_FLUSH_MS after its output
    def tables_now():
        return {t["name"]: t for t in get_json(base, "/tables", TOKEN)["tables"]}

    tables = wait_until(lambda: (t := tables_now())["user_sessions"]["keys"] == len(users) and t,
                        timeout=10, what="every user's state in the local store")
    sessions = tables["user_sessions"]
    assert sessions["keys"] == len(users) and sessions["keys_exact"]
    assert sessions["active_partitions"] == [0, 1, 2, 3]
    assert sum(sessions["keys_by_partition"].values()) == len(users)
    assert "dead_letter_stats" in tables
    detail = get_json(base, "/tables/user_sessions", TOKEN)
    assert set(detail["sample_keys"]) == set(users)
    assert detail["hosts"] == {base: {"scoring-user_sessions-changelog": [0, 1, 2, 3]}}

    # dead letters: the poison record, by stage and exception, with a sample
    dead = wait_until(lambda: (d := get_json(base, "/dead-letters", TOKEN))["total"] >= 1 and d,
                      what="dead letter counted")
    assert dead["total"] == 1 and dead["by_stage"] == {"decode": 1}
    assert dead["by_reason"][0]["stage"] == "decode" and dead["by_reason"][0]["count"] == 1
    assert dead["recent"][0]["value"] == "{not json" and dead["recent"][0]["topic"] == "cart_events"

    # model
    model = get_json(base, "/model", TOKEN)["pipelines"]
    meta = orjson.loads((MODEL_DIR / "cart" / "meta.json").read_bytes())
    assert model["cart"]["version"] == meta["version"]
    assert model["cart"]["features"] == list(FLOWS["cart"].pipeline.feature_names)
    assert model["cart"]["metrics"] == meta["metrics"] and model["cart"]["loaded_at"] > 0
    assert set(model) == set(FLOWS)

    # stats for the dashboard: cumulative counters and buckets
    stats = get_json(base, "/stats", TOKEN)
    c = stats["pipelines"]["cart"]
    assert c["events_in"] == len(cart) + 1 and c["scored"] == len(cart)
    assert c["dead_letters"] == {"decode": 1}
    assert c["score_buckets"][-1] == ["+Inf", len(cart)]
    assert c["latency_buckets"][-1] == ["+Inf", len(cart)]
    assert 0 < c["latency_p50"] <= c["latency_p99"]
    assert stats["ready"] is True and stats["rebalances"] >= 1
    assert stats["ownership"][base]["cart_events"] == [0, 1, 2, 3]
    assert {(r["topic"], r["partition"]) for r in stats["lag"]} >= {("cart_events", p) for p in range(4)}
    assert all(r["lag"] is None or r["lag"] >= 0 for r in stats["lag"])
    assert stats["dead_letter_table"]["total"] == 1

    # Prometheus text: gauges this module fills
    text = get(base, "/metrics")[2].decode()
    assert f'scoring_table_keys{{table="user_sessions"}} {float(len(users))}' in text
    assert 'scoring_consumer_lag_records{partition="0",topic="cart_events"}' in text
    rebalances = re.search(r"^scoring_rebalances_total (\S+)$", text, re.M)
    assert rebalances and float(rebalances.group(1)) >= 1
    assert f'scoring_scored_total{{pipeline="cart"}} {float(len(cart))}' in text


# -- two workers: a lookup through either worker gets the owner's answer ---------------------------

def test_lookup_is_routed_to_the_owner(broker, workers):
    w1 = workers("w1")
    w2 = workers("w2")

    def both_own_partitions():
        owners = []
        for w in (w1, w2):
            if get(w.url, "/ready")[0] != 200:
                return False
            owners.append(get_json(w.url, "/stats")["ownership"])
        return (all(len(o) == 2 for o in owners) and owners[0] == owners[1]
                and all(o[w.url].get("cart_events") for o in owners for w in (w1, w2)) and owners[0])

    ownership = wait_until(both_own_partitions, timeout=60, what="both workers own cart partitions")
    owner_of = {p: w for w in (w1, w2) for p in ownership[w.url]["cart_events"]}
    assert sorted(owner_of) == [0, 1, 2, 3]

    users = users_on_every_partition("route-u")
    now = int(time.time() * 1000)
    events = [cart_event(i, u, now - 30_000 + i) for i, u in enumerate(users * 2)]
    produce_events(broker, "cart_events", events, "user_id")
    read_json(broker, "personalization_scores", len(events), key="event_id")
    expected = FLOWS["cart"].offline_states(events)

    answered_by = set()
    for u in users:
        a = get_json(w1.url, f"/users/{u}/session")
        b = get_json(w2.url, f"/users/{u}/session")
        owner = owner_of[partition(u)]
        assert a["worker"] == b["worker"] == owner.url, (u, a["worker"], b["worker"], owner.url)
        assert a["state"] == b["state"] == expected[u]
        assert a["partition"] == b["partition"] == partition(u)
        answered_by.add(a["worker"])
        # the generic route is forwarded the same way; unknown keys are a 404 from the owner
        assert get_json(w2.url, f"/state/cart/{u}")["worker"] == owner.url
    assert answered_by == {w1.url, w2.url}, "each worker answered for some users forwarded by the other"
    for w in (w1, w2):
        assert get_json(w.url, "/users/nobody-at-all/session", status=404)["error"] == "unknown user"
        # no token configured: every endpoint is open
        for path in ("/stats", "/tables", "/dead-letters", "/model"):
            assert get(w.url, path)[0] == 200
    # each worker counts only the keys of its own partitions (once written: STATE_FLUSH_MS)
    def held():
        return [sum(t["keys"] for t in get_json(w.url, "/tables")["tables"] if t["name"] == "user_sessions")
                for w in (w1, w2)]

    counts = wait_until(lambda: sum(h := held()) == len(users) and h, timeout=10, what="every key counted")
    assert all(counts)


# -- the recent-scores ring (in process: no broker needed) -----------------------------------------

def test_record_scores_is_bounded_and_newest_first(monkeypatch):
    from app.web import recent

    def scored(key, i, **extra):
        body = {"event_id": f"e{i}", "user_id": key, "score": i / 100, "event_ts": 1_700_000_000_000 + i,
                "model_version": "m1", "scored_at": 1_700_000_000_100 + i, "type": "page_view", **extra}
        return SimpleNamespace(key=key, encoded=orjson.dumps(body))

    monkeypatch.setattr(recent, "KEYS", 3)
    ring = recent.RecentScores("event_id")
    items = sorted((scored(f"k{i % 3}", i) for i in range(40)), key=lambda it: it.key)  # by key, as fed
    ring.record(items)
    assert list(ring._ring) == ["k0", "k1", "k2"]
    got = ring.of("k0")
    assert [g["event_id"] for g in got] == [f"e{i}" for i in range(39, 11, -3)], "newest first, bounded"
    assert len(got) == recent.PER_KEY
    assert got[0] == {"event_id": "e39", "score": 0.39, "event_ts": 1_700_000_000_039, "model_version": "m1",
                      "recorded_at": 1_700_000_000_139, "type": "page_view"}
    assert all(len(entries) < 2 * recent.PER_KEY for entries in ring._ring.values())
    # a key scored again becomes the most recent; a new key pushes out the least recently scored one
    ring.record([scored("k0", 40)])
    assert list(ring._ring) == ["k1", "k2", "k0"]
    ring.record([scored("k9", 41, decision="review", reasons=[{"feature": "amount"}])])
    assert list(ring._ring) == ["k2", "k0", "k9"]
    assert ring.of("k1") == []
    assert ring.of("k9")[0]["decision"] == "review"
    assert ring.of("k9")[0]["reasons"] == [{"feature": "amount"}]


def test_quantile_from_cumulative_buckets():
    from app.web.stats import quantile

    buckets = [[0.01, 0], [0.1, 50], [1.0, 100], ["+Inf", 100]]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.25) == pytest.approx(0.055)
    assert quantile(buckets, 0.99) == pytest.approx(0.982)
    assert quantile([[1.0, 0], ["+Inf", 0]], 0.5) is None
    assert quantile([[1.0, 1], ["+Inf", 10]], 0.99) == 1.0  # beyond the last bound: a lower bound


def test_keys_are_counted_exactly_in_small_stores_and_estimated_in_large_ones(tmp_path):
    import rocksdict

    from app.kafka.store import key_counts

    dbs = {}
    for p, n in ((0, 30), (1, 20)):
        dbs[p] = rocksdict.Rdict(str(tmp_path / f"p{p}"), options=rocksdict.Options(raw_mode=True))
        for i in range(n):
            dbs[p][b"k%d" % i] = b"v"
        dbs[p][b"__faust\x00offset__"] = b"7"  # Faust's own key: not a table key
    store = SimpleNamespace(_dbs=dbs, _visible_keys=lambda db: (k for k in db.keys() if not k.startswith(b"__faust")))
    table = SimpleNamespace(data=store)
    assert key_counts(table, [0, 1], 20_000) == {"keys": 50, "keys_exact": True, "keys_by_partition": {"0": 30, "1": 20}}
    estimated = key_counts(table, [0, 1], 10)
    assert not estimated["keys_exact"] and estimated["keys"] >= 50  # RocksDB's estimate, Faust's key included
    for db in dbs.values():
        db.close()


def test_key_counts_are_scanned_at_most_once_a_second_per_table(monkeypatch):
    from types import SimpleNamespace

    from faust.types import TP

    from app.web import tables

    scans = []
    monkeypatch.setattr(tables, "key_counts", lambda table, partitions, exact: scans.append(partitions) or {"keys": len(scans)})
    monkeypatch.setattr(tables, "assigned", lambda app, kind="actives": {TP("t-changelog", 0), TP("t-changelog", 1),
                                                                         TP("other", 2)})
    counts = tables.KeyCounts(app=None)
    table = SimpleNamespace(name="t", changelog_topic=SimpleNamespace(get_topic_name=lambda: "t-changelog"))
    assert [counts(table)["keys"] for _ in range(50)] == [1] * 50, "requests do not choose the scan rate"
    assert scans == [[0, 1]], "the partitions of the table this worker holds"
    monkeypatch.setattr(tables, "REFRESH_MIN_S", 0.0)
    assert counts(table)["keys"] == 2
