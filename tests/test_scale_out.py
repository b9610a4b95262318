"""Scale-out against the embedded broker with real worker processes: workers join under load, a
worker is SIGKILLed under load, and user lookups are routed to the owner whichever worker is asked.

Every test checks the same two invariants at the end: no valid event goes without an output, and the
state per user (last changelog value, after every source offset is committed) equals a crash-free
single-process fold of the same events (`Flow.offline_states`). Timings are printed, never asserted
(`pytest -s` shows them).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime

import orjson
from aiokafka.partitioner import murmur2

from tests.flows import FLOWS
from tests.harness import committed, latest_states, produce_events, read_topic, written_partition
from tests.test_web import get, wait_until

FLOW = FLOWS["cart"]
TABLE = FLOW.pipeline.table_name
PARTITIONS = 6  # spreads over three workers: two partitions each
ENV = {"TOPIC_PARTITIONS": str(PARTITIONS)}
ALL = set(range(PARTITIONS))


def partition(key: str) -> int:
    """Kafka's default partitioner, as the producer (and the processor) place a user."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


# -- steady load from a background thread ---------------------------------------------------------

class Load(threading.Thread):
    """Produces `events` (keyed by user, in order) in equal chunks spread over `seconds`."""

    def __init__(self, broker, events: list[dict], seconds: float, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.broker, self.events, self.interval = broker, events, interval
        n = max(1, int(seconds / interval))
        size = max(1, -(-len(events) // n))
        self.chunks = [events[i:i + size] for i in range(0, len(events), size)]
        self.sent_at: dict[str, float] = {}  # event id -> wall time its chunk was sent
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.chunks:
                t0 = time.time()
                produce_events(self.broker, FLOW.source, chunk, FLOW.key)
                for e in chunk:
                    self.sent_at[e[FLOW.id]] = t0
                time.sleep(max(0.0, self.interval - (time.time() - t0)))
        except BaseException as exc:  # re-raised in the test thread by finish()
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the load producer hung"
        if self.error:
            raise self.error


# -- what each worker says it owns ----------------------------------------------------------------

def table_view(worker) -> dict | None:
    """The worker's /tables/<table> (active and standby partitions), or None if not ready/reachable."""
    try:
        if get(worker.url, "/ready")[0] != 200:
            return None
        status, _, body = get(worker.url, f"/tables/{TABLE}")
    except OSError:
        return None
    return orjson.loads(body) if status == 200 else None


def ownership(ws) -> dict[str, tuple[set[int], set[int]]] | None:
    """name -> (active partitions, standby partitions) once all of `ws` are ready and the actives
    split every partition between them (disjoint, none missing, nobody idle); else None."""
    out = {}
    for w in ws:
        view = table_view(w)
        if view is None:
            return None
        out[w.name] = (set(view["active_partitions"]), set(view["standby_partitions"]))
    actives = [a for a, _ in out.values()]
    if any(not a for a in actives) or set().union(*actives) != ALL or sum(map(len, actives)) != PARTITIONS:
        return None
    return out


def settled(ws, timeout: float = 90, what: str = "partitions split over every worker"):
    """Ownership that holds on two polls in a row (one poll can catch a rebalance half way)."""
    def stable():
        first = ownership(ws)
        if first is None:
            return None
        time.sleep(0.5)
        return first if ownership(ws) == first else None
    return wait_until(stable, timeout=timeout, what=what)


# -- the end-of-test invariants -------------------------------------------------------------------

def outputs(broker, events: list[dict], timeout: float = 120) -> list[dict]:
    """Every output, once each event id has at least one (or the timeout passed)."""
    want = {e[FLOW.id] for e in events}
    seen: set[str] = set()

    def done(rs):
        for r in rs[done.n:]:
            seen.add(orjson.loads(r.value)[FLOW.id])
        done.n = len(rs)
        return want <= seen
    done.n = 0
    return [orjson.loads(r.value) for r in read_topic(broker, FLOW.output, done, timeout)]


def wait_all_committed(broker, events: list[dict], timeout: float = 120) -> None:
    """The group committed every source record: every event was acked, so its state write reached
    the changelog (the processor acks only after the changelog delivery is confirmed)."""
    per_partition = Counter(written_partition(e[FLOW.key].encode(), PARTITIONS) for e in events)

    last = {}

    def caught_up():
        last.update(committed(broker, "scoring", FLOW.source))
        return all((last.get(p) or 0) >= n for p, n in per_partition.items()) and last
    try:
        wait_until(caught_up, timeout=timeout, what="committed offsets at the end of every partition")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: committed {last}, records written {dict(per_partition)}") from None


def stop_all(ws, timeout: float = 30) -> None:
    """SIGTERM to every live worker at once (a clean stop each), then wait; kill on timeout."""
    live = [w for w in ws if w.alive()]
    for w in live:
        os.killpg(w.proc.pid, signal.SIGTERM)
    for w in live:
        try:
            w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            w.kill()


def diagnose(broker, ws, events: list[dict], missing: set[str]) -> None:
    """On a loss: where the missing events sit, what the group committed, who owns what, and the
    workers' warnings (printed; the assertion follows)."""
    source = read_topic(broker, FLOW.source, lambda rs: len(rs) >= len(events), timeout=30)
    where: dict[int, list[int]] = {}
    ends: Counter = Counter()
    for r in source:
        ends[r.partition] = max(ends[r.partition], r.offset + 1)
        if orjson.loads(r.value)[FLOW.id] in missing:
            where.setdefault(r.partition, []).append(r.offset)
    print("\nLOSS: missing offsets per partition:",
          {p: f"{min(o)}..{max(o)} ({len(o)})" for p, o in sorted(where.items())})
    print("LOSS: partition ends", dict(sorted(ends.items())),
          "committed", dict(sorted(committed(broker, "scoring", FLOW.source).items())))
    print("LOSS: ownership", {w.name: (table_view(w) or {}).get("active_partitions") for w in ws})
    for w in ws:
        for line in w.log().splitlines():
            if "WARNING" in line or "ERROR" in line or "CRITICAL" in line or "Setting newly" in line:
                print(f"LOSS: {w.name}: {line[:200]}")


def check_no_loss_and_state(broker, ws, events: list[dict], label: str) -> list[dict]:
    out = outputs(broker, events)
    ids = Counter(o[FLOW.id] for o in out)
    missing = {e[FLOW.id] for e in events} - set(ids)
    if missing:
        diagnose(broker, ws, events, missing)
    assert not missing, f"{len(missing)} events never scored, e.g. {sorted(missing)[:5]}"
    assert set(ids) == {e[FLOW.id] for e in events}, "outputs for events that were never produced"
    dead = [w.name for w in ws if not w.alive()]
    assert not dead, f"workers died: {dead}"
    wait_all_committed(broker, events)
    stop_all(ws)
    expected = FLOW.offline_states(events)
    got = latest_states(broker, FLOW.changelog(), set(expected))
    differ = sorted(k for k in expected if got.get(k) != expected[k])
    assert not differ, f"{len(differ)} users' state differs from the single-worker reference, e.g. {differ[:5]}"
    print(f"\n[{label}] {len(events)} events of {len(expected)} users: every one scored, "
          f"{sum(ids.values()) - len(ids)} duplicate outputs (replays after rebalance), state equal")
    return out


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[\w+\] (.*)$", re.M)


def first_log_time(worker, needle: str, after: float) -> float | None:
    """Wall time of the first line of the worker's log containing `needle` logged after `after`."""
    for stamp, text in LOG_LINE.findall(worker.log()):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t > after and needle in text:
            return t
    return None


def start_all(workers, names, env) -> list:
    ws = [workers(n, env=env, start=False) for n in names]
    for w in ws:
        w.start(wait_ready=False)
    for w in ws:
        w.wait_for("[^Worker]: Ready", timeout=90)
    return ws


# -- scale up -------------------------------------------------------------------------------------

def test_workers_joining_under_load_share_partitions_lose_nothing_and_agree_with_one_worker(broker, workers):
    events = FLOW.valid(120, 61)
    w1 = workers("w1", env=ENV)
    t0 = time.monotonic()
    load = Load(broker, events, seconds=20)
    load.start()
    try:
        time.sleep(3)
        w2 = workers("w2", env=ENV, start=False).start(wait_ready=False)
        time.sleep(4)  # w2 is still starting up (imports, model, group join): overlapping joins
        w3 = workers("w3", env=ENV, start=False).start(wait_ready=False)
        for w in (w2, w3):
            w.wait_for("[^Worker]: Ready", timeout=90)
            print(f"\n[scale-up] {w.name} ready {time.monotonic() - t0:.1f}s into the load", end="")
        owners = settled([w1, w2, w3])
        print(f"\n[scale-up] partitions split {time.monotonic() - t0:.1f}s into the load: "
              + ", ".join(f"{n}={sorted(a)}" for n, (a, _) in owners.items()))
    finally:
        load.finish()
    # Everyone still owns a share after the load (no worker was starved out by a late rebalance).
    owners = settled([w1, w2, w3], what="three-way split after the load")
    assert all(a for a, _ in owners.values())
    check_no_loss_and_state(broker, [w1, w2, w3], events, "scale-up")


# -- failover -------------------------------------------------------------------------------------

def test_sigkilled_worker_partitions_resume_on_the_others_with_standbys(broker, workers):
    env = {**ENV, "STANDBY_REPLICAS": "1"}
    w1, w2, w3 = start_all(workers, ["w1", "w2", "w3"], env)
    owners = settled([w1, w2, w3])
    standbys = set().union(*(s for _, s in owners.values()))
    assert standbys == ALL, f"STANDBY_REPLICAS=1: every partition needs a standby, got {owners}"
    for name, (active, standby) in owners.items():
        assert not active & standby, f"{name} is standby for its own active partitions"

    events = FLOW.valid(120, 62)
    load = Load(broker, events, seconds=20)
    load.start()
    try:
        time.sleep(6)
        victim = w2
        survivors = [w1, w3]
        owners = ownership([w1, w2, w3]) or owners
        lost = owners[victim.name][0]
        warm = {s.name: owners[s.name][1] & lost for s in survivors}
        t_kill = time.time()
        victim.kill()
        after = settled(survivors, timeout=60, what="survivors own every partition")
        t_owned = time.time()
    finally:
        load.finish()

    taken = {s.name: after[s.name][0] & lost for s in survivors}
    assert set().union(*taken.values()) == lost
    from_standby = {s.name: sorted(taken[s.name] & warm[s.name]) for s in survivors}

    out = check_no_loss_and_state(broker, [w1, w3], events, "failover")

    # When did the killed worker's partitions produce outputs again?
    kill_ms = t_kill * 1000
    resumed = sorted(o["scored_at"] for o in out if partition(o[FLOW.key]) in lost and o["scored_at"] > kill_ms)
    assert resumed, "no output on the killed worker's partitions after the kill"
    first_output = resumed[0] / 1000 - t_kill
    sent_after = [(o["scored_at"] / 1000 - load.sent_at[o[FLOW.id]]) for o in out
                  if partition(o[FLOW.key]) in lost and o["scored_at"] > kill_ms]
    print(f"[failover] killed {victim.name} owning partitions {sorted(lost)}; "
          f"taken over by {', '.join(f'{n}={sorted(p)}' for n, p in taken.items())} "
          f"(from a warm standby: {from_standby})")
    # The survivors' logs split it: the coordinator's verdict on the killed member (their heartbeat
    # is told "rebalancing"), then rejoin, recovery of the taken-over partitions, ready.
    noticed = [t for t in (first_log_time(s, "because it is rebalancing", t_kill) for s in survivors) if t]
    ready = [t for t in (first_log_time(s, "Worker ready", t_kill) for s in survivors) if t]
    if noticed and ready:
        print(f"[failover] kill -> group rebalancing: {min(noticed) - t_kill:.1f}s "
              f"(BROKER_SESSION_TIMEOUT=6s); -> survivors ready again: {max(ready) - t_kill:.1f}s")
    print(f"[failover] kill -> survivors own its partitions: {t_owned - t_kill:.1f}s; "
          f"kill -> first output on them: {first_output:.1f}s; "
          f"worst produce->score delay on them after the kill: {max(sent_after):.1f}s")


def standby_lags(worker) -> dict[str, float]:
    """The worker's scoring_standby_lag_records samples of the cart table: partition -> records."""
    _, _, body = get(worker.url, "/metrics")
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^scoring_standby_lag_records\{partition="(\d+)",topic="[^"]*user_sessions[^"]*"\} (\S+)$',
        body.decode(), re.M)}


def test_a_standby_copy_followed_in_bulk_takes_over_without_reading_the_changelog(broker, workers):
    """STANDBY_REPLICAS=1, two workers: each follows the other's changelog partitions with a consumer
    of its own (app/kafka/standby.py). Once the copies are caught up the owner is SIGKILLed: the
    survivor takes its partitions over without reading one changelog record (no restore) and scores
    those users' next events on the copy, which must hold every state exactly (the final states
    equal a single-worker fold)."""
    w1, w2 = start_all(workers, ["w1", "w2"], {**ENV, "STANDBY_REPLICAS": "1"})

    def split():
        views = [table_view(w) for w in (w1, w2)]
        if None in views:
            return None
        (a1, s1), (a2, s2) = ((set(v["active_partitions"]), set(v["standby_partitions"])) for v in views)
        return (a1, a2) if a1 | a2 == ALL and not a1 & a2 and a1 and a2 and s1 == a2 and s2 == a1 else None
    _, lost = wait_until(split, timeout=90, what="each worker the standby of the other's partitions")
    assert "following standby partitions in bulk" in w1.log(), "the survivor follows its standbys in bulk"

    events = FLOW.valid(60, 73)
    by_user: dict[str, list[dict]] = {}
    for e in events:
        by_user.setdefault(e[FLOW.key], []).append(e)
    first = [e for e in events if by_user[e[FLOW.key]].index(e) < len(by_user[e[FLOW.key]]) // 2]
    second = [e for e in events if e not in first]
    assert {partition(e[FLOW.key]) for e in second} & lost, "events for the taken-over partitions after the kill"
    produce_events(broker, FLOW.source, first, FLOW.key)
    outputs(broker, first)
    wait_all_committed(broker, first)  # every state of the first half delivered to the changelog

    def caught_up():  # twice in a row: a sample taken before the last changelog writes arrived is no proof
        lags = standby_lags(w1)
        if set(lags) != {str(p) for p in lost} or any(lags.values()):
            return None
        time.sleep(1.5)
        again = standby_lags(w1)
        return again if not any(again.values()) else None
    wait_until(caught_up, timeout=60, what="the survivor's standby copies caught up")

    t_kill = time.time()
    w2.kill()
    wait_until(lambda: (table_view(w1) or {}).get("active_partitions") == sorted(ALL) or None,
               timeout=60, what="the survivor owns every partition")
    # neither the bulk restore nor Faust's own recovery read anything
    for line in ("changelog records of", "Restoring state from changelog topics"):
        assert first_log_time(w1, line, t_kill) is None, f"the takeover read the changelog again ({line!r})"
    produce_events(broker, FLOW.source, second, FLOW.key)
    check_no_loss_and_state(broker, [w1], events, "standby takeover")


# -- lookups through every worker -----------------------------------------------------------------

def test_a_user_lookup_through_every_worker_gives_the_owners_state_under_load(broker, workers):
    ws = start_all(workers, ["w1", "w2", "w3"], ENV)
    owners = settled(ws)
    owner_of = {p: n for n, (active, _) in owners.items() for p in active}
    url_of = {w.name: w.url for w in ws}

    events = FLOW.valid(90, 63)
    users = sorted({e[FLOW.key] for e in events})
    quiet = set(users[::3])  # all their events first; no more arrive during the lookups
    quiet_events = [e for e in events if e[FLOW.key] in quiet]
    busy_events = [e for e in events if e[FLOW.key] not in quiet]
    produce_events(broker, FLOW.source, quiet_events, FLOW.key)
    outputs(broker, quiet_events, timeout=60)
    wait_all_committed(broker, quiet_events)  # their state is written
    expected_quiet = FLOW.offline_states(quiet_events)

    def lookup(w, user):
        status, _, body = get(w.url, f"/users/{user}/session")
        assert status in (200, 404), (w.name, user, status, body[:300])
        return orjson.loads(body) if status == 200 else None

    def progress(answer) -> int:
        return -1 if answer is None else sum(answer["applied_offsets"].values())

    load = Load(broker, busy_events, seconds=15)
    load.start()
    rounds = 0
    answered_by = set()
    try:
        while load.is_alive():
            rounds += 1
            for u in sorted(quiet):
                answers = [lookup(w, u) for w in ws]
                assert all(answers), (u, "a user with state was not found through some worker")
                want = url_of[owner_of[partition(u)]]
                assert {a["worker"] for a in answers} == {want}, (u, [a["worker"] for a in answers], want)
                assert all(a["state"] == expected_quiet[u] for a in answers), u
                assert len({orjson.dumps(a["applied_offsets"]) for a in answers}) == 1, u
                answered_by.add(want)
            for u in sorted(set(users) - quiet)[:10]:
                # Changing under load, but always answered by the owner, never going backwards.
                answers = [lookup(w, u) for w in ws]
                assert {a["worker"] for a in answers if a} <= {url_of[owner_of[partition(u)]]}, u
                steps = [progress(a) for a in answers]
                assert steps == sorted(steps), (u, "state went backwards between lookups", steps)
    finally:
        load.finish()
    assert answered_by == set(url_of.values()), "every worker answered, as owner, lookups sent to the others"
    assert ownership(ws) == owners, "no rebalance during the lookups"

    expected = FLOW.offline_states(events)
    outputs(broker, events)
    wait_all_committed(broker, events)
    for u in users:
        answers = [lookup(w, u) for w in ws]
        assert all(a and a["state"] == expected[u] for a in answers), u
    print(f"\n[lookup] {rounds} rounds of {len(quiet)} quiet + 10 busy users through 3 workers "
          f"during {len(busy_events)} events of load: every answer from the owner")
    check_no_loss_and_state(broker, ws, events, "lookup")
