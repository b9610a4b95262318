"""Hostile producers against real `faust -A app worker` processes on the embedded broker.

Every kind of hostile record mixed into valid streams of both pipelines, keyed by both partitioners
and unkeyed: every valid event scored once, every hostile one scored or dead-lettered, no worker
exit. And a record that kills the worker process: set aside after two deaths, the crash loop ends.
"""
from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter

import orjson

from app.pipeline.deadletters import Letter
from tests.flows import FLOWS, cart_events
from tests.fraud_fixtures import valid_transactions
from tests.harness import crc32_partition, produce_records, read_json, read_topic
from tests.hostile import RawName


def _valid(flow, events: list[dict]) -> list[tuple]:
    """Valid events keyed as murmur2 (aiokafka, Java), CRC32 (librdkafka) and not at all producers would."""
    out = []
    for i, e in enumerate(events):
        key = e[flow.key].encode()
        if i % 3 == 0:
            out.append((key, orjson.dumps(e), [], None))
        elif i % 3 == 1:
            out.append((key, orjson.dumps(e), [], crc32_partition(key)))
        else:
            out.append((None, orjson.dumps(e), [], None))
    return out


def _hostile(flow, template: dict) -> tuple[list[tuple], list[tuple]]:
    """(records that must be scored despite their headers or key, records that must be dead letters)."""
    def ev(n: int) -> bytes:
        return orjson.dumps({**template, flow.id: f"h{n}-{template[flow.id]}"})

    key = template[flow.key].encode()
    scored = [
        (key, ev(1), [("origin.offset", b"abc")], None),
        (key, ev(2), [("origin.topic", flow.source.encode()), ("origin.partition", b"0"),
                      ("origin.offset", b"1000000000000000000")], None),
        (key, ev(3), [("origin.offset", None), ("trace", None)], None),
        (key, ev(4), [(RawName(b"\xff\xfe"), b"x"), ("ok", b"\xc3\x28")], None),
        (key, ev(5), [("replay.of", b"nonsense"), ("replay.count", b"-1")], None),
        (key, ev(6), [("errors.topic", b"scoring-user_sessions-changelog"), ("errors.stage", b"\xff")], None),
        (b"\xff\xfe\xfd", ev(7), [], None),                                  # a key that is not UTF-8
        (b"someone-else", ev(8), [], None),                                   # another entity's key
    ]
    dead = [
        (key, b'{"a": ' * 5000 + b"1" + b"}" * 5000, [], None),             # RecursionError in the decoder
        (key, b"\xff\xfe not utf-8", [], None),
        (key, None, [], None),
        (key, b"x" * 1_200_000, [("trace", b"big")], None),                 # larger than a letter may be
        (None, orjson.dumps({**template, "ts": "yesterday"}), [(RawName(b"\xc0"), None)], None),
        (key, b'{"' + flow.key.encode() + b'": "' + b"\xed\xa0\x80" + b'"}', [], None),  # a UTF-8 surrogate
    ]
    return scored, dead


def test_hostile_records_in_valid_streams_of_both_pipelines_stop_nothing(broker, workers):
    worker = workers("w1")
    expected_ids, dead_count = {}, 0
    for flow, events in ((FLOWS["cart"], cart_events(4, 61)[:30]),
                         (FLOWS["fraud"], valid_transactions(3, 8, seed=62))):
        scored, dead = _hostile(flow, events[0])
        records = _valid(flow, events)
        # hostile records in the middle of the stream: what comes after them must still be scored
        mixed = records[:len(records) // 2] + scored + dead + records[len(records) // 2:]
        asyncio.run(produce_records(broker, flow.source, mixed))
        expected_ids[flow] = {e[flow.id] for e in events} | {orjson.loads(v)[flow.id] for _, v, _, _ in scored}
        dead_count += len(dead)

    for flow, ids in expected_ids.items():
        outputs = read_json(broker, flow.output, len(ids), key=flow.id, timeout=90)
        counts = Counter(o[flow.id] for o in outputs)
        assert set(counts) == ids, f"{flow.name}: missing {ids - set(counts)}"
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= dead_count, timeout=60)
    time.sleep(2)  # anything more that was going to come
    for flow, ids in expected_ids.items():
        counts = Counter(o[flow.id] for o in read_json(broker, flow.output, len(ids), key=flow.id))
        assert max(counts.values()) == 1, f"{flow.name}: scored twice: {[i for i, n in counts.items() if n > 1]}"
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= dead_count, timeout=10)
    assert len(letters) == dead_count
    parsed = [Letter.parse(r.headers) for r in letters]
    assert all(p.stage in ("decode", "validate") for p in parsed), [(p.stage, p.message) for p in parsed]
    big = next(r for r in letters if r.value and r.value.startswith(b"xxxx"))
    assert Letter.parse(big.headers).truncated == "value" and dict(big.headers)["trace"] == b"big"
    assert worker.alive(), worker.log()[-3000:]

    # The dead-letter topic is written by anyone too. Before: a digit that str.isdigit() takes and
    # int() does not restarted the counting agent on that letter for ever; a 200 kB message made a
    # statistics record the changelog refused for good.
    forged = [(None, b"v", [("errors.stage", b"decode"), ("errors.partition", "\u00b2".encode()),
                            ("errors.ts", "\u0663".encode())], 0),
              (None, b"v", [("errors.stage", b"decode"), ("errors.message", "\U0001F600".encode() * 50_000)], 0)]
    asyncio.run(produce_records(broker, "dead_letters", forged))

    def total() -> int:
        with urllib.request.urlopen(f"{worker.url}/dead-letters", timeout=10) as resp:
            return orjson.loads(resp.read())["total"]
    deadline = time.monotonic() + 60
    while total() < dead_count + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert total() == dead_count + 2, "every letter counted, the forged ones too"
    assert worker.alive() and "CRITICAL" not in worker.log(), worker.log()[-3000:]


def test_a_record_that_kills_the_worker_is_set_aside_after_two_deaths(broker, workers, tmp_path):
    flow = FLOWS["cart"]
    events = cart_events(3, 63)[:12]
    killer = events[5][flow.id]
    faults = tmp_path / "faults"
    faults.write_text(f"crash:{killer}\n")
    data = tmp_path / "data-crashy"
    env = {"FAULT_FILE": str(faults), "PIPELINES": "cart"}
    worker = workers("crashy", env=env, data_dir=data)
    asyncio.run(produce_records(broker, flow.source, [(e[flow.key].encode(), orjson.dumps(e), [], None)
                                                      for e in events]))
    deaths, deadline = 0, time.monotonic() + 240
    while time.monotonic() < deadline:
        if not worker.alive():  # with its batch (unless it was alone in it), then twice alone
            deaths += 1
            assert deaths <= 3, "set aside after two deaths alone"
            worker.start(wait_ready=False)
        elif read_topic(broker, "dead_letters", lambda rs: len(rs) >= 1, timeout=1):
            break
    assert 2 <= deaths <= 3, deaths
    letters = read_topic(broker, "dead_letters", lambda rs: len(rs) >= 1, timeout=90)
    letter = Letter.parse(letters[0].headers)
    assert (letter.stage, letter.exception, letters[0].value) == ("quarantine", "PoisonPill", orjson.dumps(events[5]))
    outputs = read_json(broker, flow.output, len(events) - 1, key=flow.id, timeout=60)
    assert {o[flow.id] for o in outputs} == {e[flow.id] for e in events} - {killer}
    assert worker.alive()
    assert "handled one at a time" in worker.log() or "handled one at a time" in (tmp_path / "logs" / "crashy.log").read_text()
