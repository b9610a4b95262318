"""Failure semantics against the real broker and real worker processes, for every pipeline.

Nothing valid is lost, nothing poisonous blocks the stream, nothing is counted twice.
"""
from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.flows import FLOWS, Flow
from tests.harness import committed, latest_states, produce, produce_events, read_json, read_topic

every_flow = pytest.mark.parametrize("flow", list(FLOWS.values()), ids=list(FLOWS))


def headers_of(record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def source_coordinates(broker, topic: str, n: int) -> dict[bytes | None, tuple[int, int]]:
    """value bytes -> (partition, offset) as the broker stored them."""
    return {r.value: (r.partition, r.offset) for r in read_topic(broker, topic, lambda rs: len(rs) >= n)}


def fault(path: Path, *rules: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{r}\n" for r in rules))
    tmp.replace(path)  # atomic: the worker never reads half a file


@every_flow
def test_poison_goes_to_dead_letters_untouched_and_valid_events_are_scored_once(flow: Flow, broker, workers,
                                                                              tmp_path):
    faults = tmp_path / "faults"
    valid = flow.valid(8, 3)
    rejected_by_model = valid[len(valid) // 2]
    fault(faults, f"score_poison:{rejected_by_model[flow.id]}")
    worker = workers("w1", env={"FAULT_FILE": str(faults)})

    poison = flow.poison()
    mixed: list[tuple[bytes | None, bytes | None]] = []
    for i, e in enumerate(valid):
        mixed.append((e[flow.key].encode(), orjson.dumps(e)))
        if i % 3 == 0 and poison:
            _, key, value = poison.pop()
            mixed.append((key, value))
    asyncio.run(produce(broker, flow.source, mixed))
    expected_poison = flow.poison()
    n_letters = len(expected_poison) + 1

    scores = read_json(broker, flow.output, len(valid) - 1, key=flow.id)
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= n_letters, timeout=60)
    assert worker.alive(), "a poison event must not take the worker down"

    ids = Counter(s[flow.id] for s in scores)
    assert set(ids) == {e[flow.id] for e in valid} - {rejected_by_model[flow.id]}
    assert max(ids.values()) == 1

    assert len(letters) == n_letters
    coords = source_coordinates(broker, flow.source, len(mixed))
    by_value = {r.value: r for r in letters}
    for desc, key, value in expected_poison:
        letter = by_value[value]
        assert letter.key == key, desc
        h = headers_of(letter)
        assert h["errors.stage"] in ("decode", "validate"), desc
        assert h["errors.exception"] == "Poison" and h["errors.message"], desc
        assert h["errors.topic"] == flow.source
        assert (int(h["errors.partition"]), int(h["errors.offset"])) == coords[value], desc
        assert h["errors.attempts"] == "1" and int(h["errors.ts"]) > 0
    model_letter = by_value[orjson.dumps(rejected_by_model)]
    h = headers_of(model_letter)
    assert h["errors.stage"] == "score" and h["errors.exception"] == "ValueError"
    assert model_letter.key == rejected_by_model[flow.key].encode()


@every_flow
def test_transient_failures_are_retried_then_dead_lettered_never_skipped(flow: Flow, broker, workers, tmp_path):
    faults = tmp_path / "faults"
    fault(faults, f"score:{flow.name}")
    workers("w1", env={"FAULT_FILE": str(faults), "RETRY_ATTEMPTS": "3", "RETRY_BASE_MS": "20"})

    doomed = flow.valid(3, 21)[:20]
    produce_events(broker, flow.source, doomed, flow.key)
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= len(doomed), timeout=60)
    assert sorted(r.value for r in letters) == sorted(orjson.dumps(e) for e in doomed)
    for r in letters:
        h = headers_of(r)
        assert (h["errors.stage"], h["errors.exception"], h["errors.attempts"]) == ("score", "Transient", "3")

    fault(faults)  # the dependency is back
    later = flow.valid(3, 22)[:20]
    produce_events(broker, flow.source, later, flow.key)
    scores = read_json(broker, flow.output, len(later), key=flow.id)
    assert {s[flow.id] for s in scores} == {e[flow.id] for e in later}


@every_flow
def test_transient_failure_within_budget_is_retried_in_place(flow: Flow, broker, workers, tmp_path):
    faults = tmp_path / "faults"
    fault(faults, f"score:{flow.name}")
    workers("w1", env={"FAULT_FILE": str(faults), "RETRY_ATTEMPTS": "200", "RETRY_BASE_MS": "20",
                       "RETRY_MAX_MS": "100"})
    events = flow.valid(3, 23)[:30]
    produce_events(broker, flow.source, events, flow.key)
    assert read_json(broker, flow.output, 1, timeout=3) == [], "nothing may pass while scoring fails"
    fault(faults)
    scores = read_json(broker, flow.output, len(events), key=flow.id)
    assert {s[flow.id] for s in scores} == {e[flow.id] for e in events}
    assert read_topic(broker, "dead_letters", timeout=2) == []


def _committed_total(broker, group: str, topic: str) -> int:
    return sum(o or 0 for o in committed(broker, group, topic).values())


@every_flow
def test_failed_publish_holds_the_offset_until_the_output_is_acknowledged(flow: Flow, broker, workers, tmp_path):
    faults = tmp_path / "faults"
    worker = workers("w1", env={"FAULT_FILE": str(faults), "RETRY_ATTEMPTS": "1000", "RETRY_BASE_MS": "50",
                                "RETRY_MAX_MS": "200", "COMMIT_INTERVAL_S": "0.5"})
    warmup = flow.valid(2, 31)[:10]
    produce_events(broker, flow.source, warmup, flow.key)
    read_json(broker, flow.output, len(warmup), key=flow.id)
    deadline = time.monotonic() + 20
    while _committed_total(broker, "scoring", flow.source) < len(warmup) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _committed_total(broker, "scoring", flow.source) == len(warmup)

    fault(faults, f"publish:{flow.output}")
    # ids of their own: the simulator's ids repeat across seeds, and an output of a warm-up event
    # must not pass for the held event's
    held = [{**e, flow.id: f"held-{e[flow.id]}"} for e in flow.valid(2, 32)[:10]]
    produce_events(broker, flow.source, held, flow.key)
    time.sleep(3)  # several commit intervals pass while the publish keeps failing
    assert _committed_total(broker, "scoring", flow.source) == len(warmup), "offset committed before publish"
    assert len(read_json(broker, flow.output, len(warmup) + 1, timeout=2)) == len(warmup)

    fault(faults)
    scores = read_json(broker, flow.output, len(warmup) + len(held), key=flow.id)
    assert {e[flow.id] for e in held} <= {s[flow.id] for s in scores}
    deadline = time.monotonic() + 20
    while _committed_total(broker, "scoring", flow.source) < len(warmup) + len(held) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _committed_total(broker, "scoring", flow.source) == len(warmup) + len(held)
    assert worker.alive()


def test_failed_changelog_write_holds_the_offset_until_the_state_is_acknowledged(broker, workers, tmp_path):
    """The state's changelog, not the output, fails: outputs go out, offsets stay, the state is rewritten."""
    flow = FLOWS["cart"]
    faults = tmp_path / "faults"
    workers("w1", env={"FAULT_FILE": str(faults), "RETRY_BASE_MS": "50", "RETRY_MAX_MS": "200",
                       "COMMIT_INTERVAL_S": "0.5"})
    warmup = flow.valid(2, 34)[:10]
    produce_events(broker, flow.source, warmup, flow.key)
    read_json(broker, flow.output, len(warmup), key=flow.id)
    deadline = time.monotonic() + 20
    while _committed_total(broker, "scoring", flow.source) < len(warmup) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _committed_total(broker, "scoring", flow.source) == len(warmup)

    fault(faults, f"publish:{flow.changelog()}")
    held = [{**e, flow.id: f"held-{e[flow.id]}"} for e in flow.valid(2, 35)[:10]]  # distinct ids, as above
    produce_events(broker, flow.source, held, flow.key)
    scores = read_json(broker, flow.output, len(warmup) + len(held), key=flow.id)
    assert {e[flow.id] for e in held} <= {s[flow.id] for s in scores}, "outputs are published before the state"
    time.sleep(3)  # several commit intervals pass while the changelog keeps failing
    assert _committed_total(broker, "scoring", flow.source) == len(warmup), "offset committed before the state"

    fault(faults)
    deadline = time.monotonic() + 20
    while _committed_total(broker, "scoring", flow.source) < len(warmup) + len(held) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _committed_total(broker, "scoring", flow.source) == len(warmup) + len(held)
    latest = {}
    for r in read_topic(broker, flow.changelog(), timeout=5):
        latest[r.key.decode()] = orjson.loads(r.value)
    expected = flow.offline_states(warmup + held)
    assert {k: latest[k]["state"] for k in expected} == expected, "the rewritten state is the whole fold"


@every_flow
def test_publish_failure_past_the_budget_becomes_a_dead_letter(flow: Flow, broker, workers, tmp_path):
    faults = tmp_path / "faults"
    fault(faults, f"publish:{flow.output}")
    workers("w1", env={"FAULT_FILE": str(faults), "RETRY_ATTEMPTS": "2", "RETRY_BASE_MS": "20"})
    events = flow.valid(2, 33)[:10]
    produce_events(broker, flow.source, events, flow.key)
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= len(events), timeout=60)
    assert sorted(r.value for r in letters) == sorted(orjson.dumps(e) for e in events)
    assert {(headers_of(r)["errors.stage"], headers_of(r)["errors.attempts"]) for r in letters} == {("publish", "2")}


def test_without_the_gate_a_failed_publish_loses_the_event(broker, workers, tmp_path):
    """Control: the same fault under a naive Faust agent (`await topic.send()`): committed, never scored.
    Stock Faust's behaviour does not depend on the pipeline: one run, on cart events."""
    flow = FLOWS["cart"]
    faults = tmp_path / "faults"
    fault(faults, "publish:naive_scores")
    workers("naive", env={"FAULT_FILE": str(faults), "COMMIT_INTERVAL_S": "0.5"}, app="tests.naive_app")
    events = flow.valid(2, 34)[:10]
    produce_events(broker, flow.source, events, flow.key)
    deadline = time.monotonic() + 30
    while _committed_total(broker, "naive", flow.source) < len(events) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _committed_total(broker, "naive", flow.source) == len(events), "stock Faust commits anyway"
    fault(faults)
    time.sleep(2)
    assert read_json(broker, "naive_scores", 1, timeout=3) == [], "and the outputs are gone for good"


def replay(broker, flow: Flow, **choice):
    """`scoring replay-dead-letters`; (letters replayed, skipped at the replay limit)."""
    from app.ops import replay

    out = asyncio.run(replay.replay(broker.bootstrap, "dead_letters", {flow.source}, replay.Choice(**choice), dry_run=False))
    return len(out.replayed), out.at_limit


@every_flow
def test_replayed_dead_letters_are_scored_after_the_fix(flow: Flow, broker, workers, tmp_path):
    faults = tmp_path / "faults"
    events = flow.valid(2, 41)[:12]
    broken = events[::4]
    fault(faults, *(f"score_poison:{e[flow.id]}" for e in broken))
    workers("w1", env={"FAULT_FILE": str(faults)})
    produce_events(broker, flow.source, events, flow.key)
    read_topic(broker, "dead_letters", lambda rs: len(rs) >= len(broken), timeout=60)
    first = read_json(broker, flow.output, len(events) - len(broken), key=flow.id)
    assert {s[flow.id] for s in first} == {e[flow.id] for e in events} - {e[flow.id] for e in broken}

    # A replay while still broken fails again, and the replay limit stops the next round.
    assert replay(broker, flow, stage="score", max_replays=1) == (len(broken), 0)
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= 2 * len(broken), timeout=60)
    again = [headers_of(r) for r in letters if "replay.count" in headers_of(r)]
    assert sorted(h["replay.count"] for h in again) == ["1"] * len(broken)
    assert {h["errors.stage"] for h in again} == {"score"}
    assert replay(broker, flow, stage="score", max_replays=1) == (0, len(broken))

    fault(faults)  # the fix
    assert replay(broker, flow, stage="score", max_replays=2) == (len(broken), 0)
    scores = read_json(broker, flow.output, len(events), key=flow.id)
    assert {s[flow.id] for s in scores} == {e[flow.id] for e in events}
    assert replay(broker, flow, stage="score", max_replays=2) == (0, 0), "each letter is replayed once"


# Each pipeline once, one with its store kept and one with it wiped: the short crash soak
# (tests/test_chaos.py) kills workers of both pipelines with and without wipes besides.
@pytest.mark.parametrize("flow, wipe", [(FLOWS["cart"], False), (FLOWS["fraud"], True)],
                         ids=["keep-store-cart", "wipe-store-fraud"])
def test_sigkill_at_random_moments_loses_nothing_and_counts_nothing_twice(flow: Flow, wipe, broker, workers,
                                                                         tmp_path):
    rng = random.Random(1234 + wipe)
    events = flow.valid(60, 51)
    data_dir = tmp_path / "data-crash"
    worker = workers("crash", data_dir=data_dir)

    def producer():
        # steady flow, keyed, in order: about 25 s of traffic
        chunk = max(1, len(events) // 50)
        for i in range(0, len(events), chunk):
            produce_events(broker, flow.source, events[i:i + chunk], flow.key)
            time.sleep(0.5)
    t = threading.Thread(target=producer)
    t.start()
    kills = 0
    try:
        for _ in range(3):
            time.sleep(rng.uniform(2, 6))
            worker.kill()
            kills += 1
            if wipe:
                shutil.rmtree(data_dir, ignore_errors=True)
            worker.start()
    finally:
        t.join()
    out = read_json(broker, flow.output, len(events), key=flow.id, timeout=120)
    ids = Counter(o[flow.id] for o in out)
    missing = {e[flow.id] for e in events} - set(ids)
    if missing:  # say where the lost events were, for whoever reads the failure
        src = read_topic(broker, flow.source, lambda rs: len(rs) >= len(events))
        for r in src:
            v = orjson.loads(r.value)
            if v[flow.id] in missing:
                print("MISSING", v[flow.id], v[flow.key], r.partition, r.offset)
        print("COMMITTED", committed(broker, "scoring", flow.source))
        latest = {}
        for r in read_topic(broker, flow.changelog(), timeout=5):
            if r.key and r.value:
                latest[r.key.decode()] = orjson.loads(r.value)
        for r in src:
            v = orjson.loads(r.value)
            if v[flow.id] in missing:
                print("APPLIED", v[flow.key], latest.get(v[flow.key], {}).get("applied"))
        print("LOG", worker.log_path)
    assert set(ids) == {e[flow.id] for e in events}, "an event was lost"
    duplicates = sum(ids.values()) - len(ids)
    print(f"\n{flow.name} {'wipe' if wipe else 'keep'}: {kills} SIGKILLs, {len(events)} events, "
          f"{duplicates} duplicate outputs")

    expected = flow.offline_states(events)
    worker.stop()  # a clean stop flushes the changelog
    got = latest_states(broker, flow.changelog(), set(expected))
    assert got == expected, "state differs from a crash-free replay (lost or double-counted)"
