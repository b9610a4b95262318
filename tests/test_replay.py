"""`scoring replay-dead-letters` against the embedded broker and a real worker: only into input
topics, each letter once unless `--again`, an event applied once however often it is replayed,
filters, `--dry-run`, and letters with forged or unreadable headers."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import orjson

from app.ops import replay
from tests.flows import FLOWS, cart_events
from tests.harness import ROOT, crc32_partition, latest_states, produce_records, read_json, read_topic


def run_replay(broker, dry_run=False, **choice) -> replay.Outcome:
    return asyncio.run(replay.replay(broker.bootstrap, "dead_letters", {"cart_events", "transactions"},
                                     replay.Choice(**choice), dry_run))


def test_replay_sends_each_letter_once_into_input_topics_only(broker, workers, tmp_path):
    flow = FLOWS["cart"]
    events = cart_events(6, 71)[:14]
    broken = [events[2], events[12]]  # of two users: their replays may come in either order
    assert broken[0][flow.key] != broken[1][flow.key]
    faults = tmp_path / "faults"
    faults.write_text("".join(f"score_poison:{e[flow.id]}\n" for e in broken))
    worker = workers("w1", env={"FAULT_FILE": str(faults), "PIPELINES": "cart"})
    asyncio.run(produce_records(broker, flow.source, [(e[flow.key].encode(), orjson.dumps(e), [], None)
                                                      for e in events]))
    read_topic(broker, "dead_letters", lambda rs: len(rs) >= 2, timeout=60)
    forged = [
        (b"k", b"steal", [("errors.topic", b"scoring-user_sessions-changelog"), ("errors.partition", b"0"),
                          ("errors.offset", b"1")], 0),
        (b"k", b"spoof", [("errors.topic", b"personalization_scores"), ("errors.partition", b"1"),
                          ("errors.offset", b"2")], 0),
        (b"k", b"junk", [("errors.topic", None), ("errors.partition", b"\xff"), ("errors.offset", b"x")], 0),
    ]
    asyncio.run(produce_records(broker, "dead_letters", forged))

    dry = run_replay(broker, dry_run=True, stage="score")
    assert len(dry.replayed) == 2 and dry.refused == 0 and "would replay 2" in dry.summary(True)
    everything = run_replay(broker, dry_run=True)
    assert (len(everything.replayed), everything.refused, everything.unreplayable) == (2, 2, 1)
    time.sleep(1)
    assert len(read_topic(broker, flow.source, timeout=3)) == len(events), "a dry run sends nothing"

    faults.write_text("")  # the fix
    first = broken[0]
    partition = next(r.partition for r in read_topic(broker, flow.source, timeout=5) if orjson.loads(r.value)[flow.id] == first[flow.id])
    one = run_replay(broker, topic="cart_events", partition=partition, stage="score")
    assert len(one.replayed) >= 1 and all(f"cart_events:{partition}:" in line for line in one.replayed)
    rest = run_replay(broker)
    assert len(one.replayed) + len(rest.replayed) == 2 and rest.refused == 2
    assert len(run_replay(broker).replayed) == 0, "each letter is replayed once"
    scores = read_json(broker, flow.output, len(events), key=flow.id)
    assert {s[flow.id] for s in scores} == {e[flow.id] for e in events}

    again = run_replay(broker, again=True)
    assert len(again.replayed) == 2, "--again sends them once more"
    time.sleep(4)  # the worker reads them, and writes its state behind
    counts = Counter(s[flow.id] for s in read_json(broker, flow.output, len(events), key=flow.id, timeout=5))
    assert max(counts.values()) == 1, "an event replayed twice is applied and scored once"
    states = latest_states(broker, flow.changelog(), {e[flow.key] for e in events})
    # a replayed event is applied when it comes back: after the other events of its key
    in_applied_order = [e for e in events if e not in broken] + broken
    assert states == flow.offline_states(in_applied_order), "and the state counts it once"
    assert worker.alive()


def test_the_command_line_filters_and_dry_run(broker):
    asyncio.run(produce_records(broker, "dead_letters", [
        (b"u1", b"{}", [("errors.topic", b"cart_events"), ("errors.partition", b"1"), ("errors.offset", b"5"),
                        ("errors.stage", b"validate")], crc32_partition(b"u1"))]))
    out = subprocess.run([sys.executable, "-m", "app.cli", "replay-dead-letters", "--dry-run", "--stage", "validate",
                          "--broker", broker.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cart_events:1:5" in out.stdout and "would replay 1 dead letter(s)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "app.cli", "replay-dead-letters", "--offsets", "9-2",
                          "--broker", broker.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--offsets" in bad.stderr


def test_a_forged_letter_claiming_a_lineage_does_not_take_the_real_letter_s_place():
    """Found by review: a letter of any failing record, claiming the lineage of a real one with a
    replay count of 999999999, superseded it; the real letter was never replayed."""
    from types import SimpleNamespace

    def letter(offset: int, value: bytes, count: bytes | None):
        headers = [("errors.stage", b"publish"), ("errors.topic", b"cart_events"), ("errors.partition", b"0"),
                   ("errors.offset", str(offset).encode())]
        if count is not None:
            headers += [("replay.of", b"cart_events:0:100"), ("replay.count", count)]
        return SimpleNamespace(headers=headers, value=value)

    letters = [(0, 1, letter(100, b'{"real": 1}', None)), (0, 2, letter(555, b'{"forged": 1}', b"999999999"))]
    outcome = replay.Outcome()
    chosen = replay.choose("dead_letters", letters, set(), {"cart_events"}, replay.Choice(), outcome)
    assert [record.value for _, _, record in chosen] == [b'{"real": 1}']
    assert outcome.at_limit == 1 and outcome.superseded == 0
