"""Hostile input through the real processor (both pipelines, real RocksDB tables, a producer that
records what it is given): no record, key, header or replay can stop the stream or count twice.

Property-based tests drive generated records of every kind through decode, admission, state,
scoring and the gate; the numbered tests pin each defect of issue 13 that was found by hand.
`make fuzz` runs the properties with many more examples (HYPOTHESIS_PROFILE=fuzz).
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dev.inprocess import AckingProducer, build
from app.kafka.records import read_batch
from app.pipeline import deadletters
from app.pipeline.deadletters import Letter
from tests import hostile
from tests.hostile import ConsumerRecord, cart_event, transaction

DEAD_LETTERS = "dead_letters"


class RecordingProducer(AckingProducer):
    """Acknowledges every batch at once and keeps its records; `refuse(topic, records)` may return an
    exception to fail a batch with instead."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.sent: list[tuple[str, int, object]] = []
        self.refuse = None

    async def send_batch(self, batch, topic, partition):
        records = list(read_batch(batch._build()))
        error = self.refuse(topic, records) if self.refuse else None
        if error is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(error)
            return fut
        self.sent += [(topic, partition, r) for r in records]
        return await super().send_batch(SizedBatch(len(records)), topic, partition)

    def to(self, topic: str, since: int = 0) -> list:
        return [r for t, _, r in self.sent[since:] if t == topic]


class SizedBatch:
    def __init__(self, n: int) -> None:
        self.n = n

    def record_count(self) -> int:
        return self.n


class Batch:
    def __init__(self, records, generation=1) -> None:
        self.records, self.generation, self.acked = records, generation, False

    def ack(self, owned=None) -> None:
        self.acked = True


@pytest.fixture
def processors(tmp_path):
    """pipeline name -> the processor of a fresh worker (real RocksDB tables under tmp_path), every
    worker sending through one recording producer (`processors.producer`); keywords are settings."""
    producer = RecordingProducer(4)
    built = []

    def make(name: str, **settings):
        service = build(tmp_path / f"w{len(built)}", producer,
                        **{"state_flush_events": 1000, "state_flush_ms": 60_000, **settings})
        built.append(service)
        return service.pipelines[name].processor

    make.producer = producer
    return make


_offsets = itertools.count(1_000_000)


def run(processor, records, **kw) -> Batch:
    batch = Batch(records)

    async def go():
        await processor.handle(batch, **kw)
        await processor.writer.drain()

    asyncio.run(go())
    return batch


def keyed(pipeline: str, event: dict, offset: int, headers=(), key: bytes | None = ...) -> ConsumerRecord:
    """`event` on its state key's partition, keyed as a shop using Kafka's default partitioner would."""
    from app.kafka.partitioner import key_hash

    field, topic = ("user_id", "cart_events") if pipeline == "cart" else ("card_id", "transactions")
    k = event[field].encode()
    return ConsumerRecord(topic, key_hash(k) % 4, offset, k if key is ... else key, orjson.dumps(event), list(headers))


def duplicates(processor) -> float:
    return processor.m.duplicates._value.get()


# -- properties --------------------------------------------------------------------------------------

def per_pipeline(**strategies):
    """A hypothesis property of both pipelines, on a processor fixture shared by the examples."""
    def wrap(test):
        test = given(**strategies)(test)
        test = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                               HealthCheck.data_too_large])(test)
        return pytest.mark.parametrize("pipeline", ["cart", "fraud"])(test)
    return wrap


@per_pipeline(data=st.data())
def test_any_record_yields_an_output_a_hop_or_a_dead_letter_and_nothing_raises(processors, pipeline, data):
    processor = processors(pipeline) if pipeline not in getattr(processors, "cache", {}) else processors.cache[pipeline]
    processors.cache = {**getattr(processors, "cache", {}), pipeline: processor}
    pipe, producer = processor.pipeline, processors.producer
    drawn = data.draw(hostile.records(pipeline, pipe.source_topic, processor.pipeline.repartition_topic))
    records = [ConsumerRecord(topic, partition, next(_offsets), key, value, headers)
               for topic, partition, key, value, headers in drawn]
    since, dups = len(producer.sent), duplicates(processor)

    batch = run(processor, records)

    outputs = producer.to(pipe.output_topic, since)
    hops = producer.to(processor.pipeline.repartition_topic, since)
    letters = producer.to(DEAD_LETTERS, since)
    assert batch.acked
    assert len(outputs) + len(hops) + len(letters) + duplicates(processor) - dups == len(records)
    coordinates = {(r.topic, r.partition, r.offset) for r in records}
    for letter in letters:
        parsed = Letter.parse(letter.headers)
        assert parsed.stage and parsed.exception, parsed
        if parsed.topic == pipe.source_topic and (parsed.topic, parsed.partition, parsed.offset) not in coordinates:
            # a hop record's letter names the record the producer wrote (its origin headers)
            assert any(r.topic == processor.pipeline.repartition_topic for r in records)
        assert len(letter.value or b"") + len(letter.key or b"") <= processor.dead_letter_max_bytes
    for out in outputs:
        body = orjson.loads(out.value)
        assert 0.0 <= body["score"] <= 1.0 and len(body["features"]) == len(pipe.feature_names)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=hostile.values("cart") | hostile.values("fraud"))
def test_decode_raises_only_poison_for_any_value(raw):
    """The codec's own contract, below the processor's catch-all: a value fails as `Poison` with a
    stage, whatever its bytes, except the recursion that msgspec raises on deep nesting."""
    from app.errors import Poison
    from app.pipeline.codec import decode
    from app.pipelines import configured

    for pipe in configured().values():
        try:
            event = decode(raw, pipe.schema, 65536, pipe.check)
        except Poison as exc:
            assert exc.stage in ("decode", "validate")
        except RecursionError:
            assert raw.count(b"[") + raw.count(b"{") > 500
        else:
            assert isinstance(event[pipe.key_field], str) and isinstance(event["ts"], int)


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
                     | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_stored = st.one_of(
    st.binary(max_size=120),  # not JSON, or any JSON at all
    _json.map(orjson.dumps),
    # the envelope this worker writes, with any part of it replaced
    st.fixed_dictionaries({"state": _json | st.just({}), "applied": _json | st.just({"cart_events": 3})},
                          optional={"replayed": _json}).map(orjson.dumps),
)
_keys = itertools.count()


class Deep(int):
    """A value nested this many lists deep: more than orjson writes, so it is spliced into the bytes."""


def _dumps(record: dict) -> bytes:
    deep = {k: v for k, v in record["state"].items() if isinstance(v, Deep)}
    raw = orjson.dumps({**record, "state": {**record["state"], **{k: "__deep__" for k in deep}}})
    for depth in deep.values():
        raw = raw.replace(b'"__deep__"', b"[" * depth + b"1" + b"]" * depth, 1)
    return raw


def _valid_record(pipe, event: dict) -> dict:
    from app.pipeline.codec import decode

    return {"state": pipe.apply(pipe.new_state(), decode(orjson.dumps(event), pipe.schema, 65536, pipe.check)),
            "applied": {}}


# (which field of a valid state, its new value); st.none: the field removed. Short lists of numbers
# and values nested too deep for the encoder are what got past the record's checks before.
# Integers at the edges of 64 bits: orjson reads up to 2**64 - 1 and writes no more (a counter there,
# plus one, made the state's write raise and the worker exit).
_changed_fields = st.tuples(st.integers(0, 99), st.one_of(
    _json, st.integers(251, 400).map(Deep), st.just(st.none),
    st.lists(st.floats(-1e6, 1e6) | st.integers(-10, 10), max_size=4),
    st.integers(2**64 - 3, 2**64 - 1), st.integers(-2**63, -2**63 + 2)))


@per_pipeline(stored=_stored)
def test_any_stored_state_record_leaves_its_events_scored_or_dead_letters_and_nothing_raises(processors, pipeline,
                                                                                             stored):
    """A table is restored from its changelog, which anyone who can write the topic can write: whatever
    a key's stored record holds (any bytes, any JSON, the envelope with any part replaced, or, in
    the test below, a valid record with one field of its state changed), its events are scored or
    become dead letters, once each, and the other keys of the batch are scored as usual."""
    _stored_record_case(processors, pipeline, stored)


@per_pipeline(changed=_changed_fields)
def test_a_valid_state_record_with_any_field_changed_leaves_its_events_scored_or_dead_letters(processors, pipeline,
                                                                                               changed):
    _stored_record_case(processors, pipeline, changed)


def _stored_record_case(processors, pipeline: str, stored) -> None:
    processor = processors(pipeline) if pipeline not in getattr(processors, "cache", {}) else processors.cache[pipeline]
    processors.cache = {**getattr(processors, "cache", {}), pipeline: processor}
    pipe, producer = processor.pipeline, processors.producer
    n = next(_keys)
    make = cart_event if pipeline == "cart" else transaction
    bad, good = make(3 * n, f"bad{n}"), make(3 * n + 1, f"good{n}")
    records = [keyed(pipeline, e, next(_offsets)) for e in (bad, good, {**bad, pipe.id_field: f"x{n}"})]
    if isinstance(stored, tuple):  # a record this worker writes, with one field of its state changed
        record = _valid_record(pipe, make(3 * n + 2, f"bad{n}"))
        field, value = stored
        name = sorted(record["state"])[field % len(record["state"])]
        if value is st.none:
            del record["state"][name]
        else:
            record["state"][name] = value
        stored = _dumps(record)
    processor.writer.table.data._db_for_partition(records[0].partition)[records[0].key] = stored
    since = len(producer.sent)

    batch = run(processor, records)

    assert batch.acked
    outputs = [orjson.loads(r.value)[pipe.id_field] for r in producer.to(pipe.output_topic, since)]
    letters = [Letter.parse(r.headers) for r in producer.to(DEAD_LETTERS, since)]
    assert good[pipe.id_field] in outputs, "the other key is scored"
    assert len(outputs) + len(letters) == len(records), (outputs, letters)
    assert all(letter.stage in ("state", "features", "score", "output") for letter in letters), letters


# -- the defects, one by one ----------------------------------------------------------------------

def test_1_deeply_nested_json_is_a_dead_letter_and_the_next_event_is_scored(processors):
    processor = processors("cart")
    producer = processors.producer
    deep = b'{"a": ' * 5000 + b'1' + b'}' * 5000  # under MAX_EVENT_BYTES, so it reaches the decoder
    records = [ConsumerRecord("cart_events", 0, 10, b"u1", deep, []), keyed("cart", cart_event(1, "u1"), 11)]
    run(processor, records)
    letter, = producer.to(DEAD_LETTERS)
    parsed = Letter.parse(letter.headers)
    assert (parsed.stage, parsed.exception, parsed.offset) == ("decode", "RecursionError", 10)
    assert [orjson.loads(o.value)["event_id"] for o in producer.to("personalization_scores")] == ["e1"]


@pytest.mark.parametrize("forged", [
    [("origin.offset", b"abc")], [("origin.offset", None)], [("origin.topic", b"\xff")],
    [("origin.topic", b"cart_events"), ("origin.partition", b"0"), ("origin.offset", b"1000000000000000000")],
])
def test_2_origin_headers_on_an_input_topic_are_ignored(processors, forged):
    """Read there, they crashed the worker (a malformed one) or made every later event of the key a
    duplicate (a large offset: fraud scoring switched off for a card)."""
    processor = processors("fraud")
    first = keyed("fraud", transaction(1, "c1"), 5, headers=forged)
    later = keyed("fraud", transaction(2, "c1"), 6)
    run(processor, [first])
    run(processor, [later])
    scored = [orjson.loads(o.value)["txn_id"] for o in processors.producer.to("fraud_decisions")]
    assert scored == ["t1", "t2"] and not processors.producer.to(DEAD_LETTERS)


@pytest.mark.parametrize("origin", [[], [("origin.topic", b"transactions"), ("origin.partition", b"x"),
                                         ("origin.offset", b"1")],
                                    [("origin.topic", b"fraud_decisions"), ("origin.partition", b"0"),
                                     ("origin.offset", b"1")]])
def test_2_a_repartitioned_record_with_a_missing_or_malformed_origin_is_a_dead_letter(processors, origin):
    processor = processors("fraud")
    rec = keyed("fraud", transaction(1, "c1"), 3, headers=origin)
    rec = rec._replace(topic=processor.pipeline.repartition_topic)
    run(processor, [rec, keyed("fraud", transaction(2, "c1"), 4)])
    letter, = processors.producer.to(DEAD_LETTERS)
    assert Letter.parse(letter.headers).stage == "headers"
    assert [orjson.loads(o.value)["txn_id"] for o in processors.producer.to("fraud_decisions")] == ["t2"]


def test_3_a_letter_too_large_for_the_broker_is_cut_to_fit_with_its_size_and_checksum(processors):
    processor = processors("cart", dead_letter_max_bytes=100_000)
    huge = b'{"event_id": "' + b"x" * 1_500_000 + b'"}'
    run(processor, [ConsumerRecord("cart_events", 1, 7, b"u1", huge, [("trace", b"t-1")])])
    letter, = processors.producer.to(DEAD_LETTERS)
    h = deadletters.header_map(letter.headers)
    assert len(letter.value) < 100_000 and huge.startswith(letter.value)
    assert h[deadletters.VALUE_SIZE] == str(len(huge)) and h[deadletters.TRUNCATED] == "value"
    assert h[deadletters.VALUE_SHA256] == hashlib.sha256(huge).hexdigest()
    assert h["trace"] == "t-1", "the record's own headers are kept"
    assert Letter.parse(letter.headers).problem, "a cut letter is not replayable"


def test_3_a_letter_refused_for_good_is_shrunk_once_then_the_process_fails_instead_of_retrying_forever(processors):
    from aiokafka.errors import MessageSizeTooLargeError

    from app.pipeline.publish import Unpublishable

    processor = processors("cart")
    producer = processors.producer
    calls = []

    def refuse(topic, records):
        if topic == DEAD_LETTERS:
            calls.append(len(records[0].value or b""))
            if records[0].value:
                return MessageSizeTooLargeError("as the broker's message.max.bytes")
        return None

    producer.refuse = refuse
    run(processor, [ConsumerRecord("cart_events", 1, 7, b"u1", b"not json" * 100, [])])
    assert calls == [800, 0], "refused once whole, then sent as headers only"
    letter, = producer.to(DEAD_LETTERS)
    assert deadletters.header_map(letter.headers)[deadletters.VALUE_SIZE] == "800"

    producer.refuse = lambda topic, records: MessageSizeTooLargeError("always") if topic == DEAD_LETTERS else None
    with pytest.raises(Unpublishable):
        run(processor, [ConsumerRecord("cart_events", 1, 8, b"u1", b"not json", [])])


def test_3_an_output_refused_for_good_is_not_retried(processors):
    from aiokafka.errors import InvalidTopicError

    processor = processors("cart")
    producer = processors.producer
    tries = []

    def refuse(topic, records):
        if topic == "personalization_scores":
            tries.append(1)
            return InvalidTopicError("refused")
        return None

    producer.refuse = refuse
    run(processor, [keyed("cart", cart_event(1, "u1"), 3)])
    assert len(tries) == 1, "not retried"
    letter, = producer.to(DEAD_LETTERS)
    assert Letter.parse(letter.headers).stage == "publish"


def test_6_dead_letter_statistics_take_any_headers():
    from domain import dead_letter_stats as stats

    current = stats.new_stats()
    for i, headers in enumerate([[("errors.stage", None)], [("errors.ts", b"\xff")], [("errors.offset", b"abc")],
                                 [], [("\udcff", b"x"), ("errors.exception", b"\xc3\x28")],
                                 # digits that str.isdigit() takes and int() refuses (before: ValueError,
                                 # the agent restarted on the same letter forever)
                                 [("errors.partition", "²".encode()), ("errors.ts", "٣".encode()),
                                  ("errors.offset", "１".encode()), ("replay.of", "cart_events:²:1".encode())]]):
        current = stats.apply(current, i, Letter.parse(headers), None)
    merged = stats.merge([current])
    assert merged["total"] == 6 and len(merged["recent"]) == 6


_text = st.text(min_size=0, max_size=400)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=10)
@given(letters=st.lists(st.tuples(_text, _text, _text, _text, st.binary(max_size=300)), min_size=1, max_size=8),
       big=st.booleans())
def test_dead_letter_statistics_stay_a_record_the_changelog_takes_whatever_the_letters_say(letters, big):
    """Found by review: one letter with a 200 kB message made a 1.2 MB statistics record, and the
    changelog refused it for good; distinct exception names grew the counts without bound."""
    from app.kafka.store import MAX_RECORD_BYTES
    from app.pipeline.codec import encode
    from domain import dead_letter_stats as stats

    current = stats.new_stats()
    for i in range(300):
        stage, exception, message, topic, value = letters[i % len(letters)]
        if big:  # distinct reasons, and texts of what JSON writes longest (a control character: 6 bytes)
            exception, message = f"{exception}{i}" + "\x01" * 200, message + "\U0001F600" * 50_000
            stage, topic = stage + "\x01" * 300, topic + "\x01" * 300
        headers = [("errors.stage", stage.encode("utf-8", "replace")), ("errors.exception", exception.encode("utf-8", "replace")),
                   ("errors.message", message.encode("utf-8", "replace")), ("errors.topic", topic.encode("utf-8", "replace")),
                   ("errors.attempts", message.encode("utf-8", "replace"))]
        current = stats.apply(current, i, Letter.parse(headers), value)
    raw = encode(current)
    assert len(raw) <= MAX_RECORD_BYTES // 3 and stats.readable(orjson.loads(raw))
    assert stats.merge([current])["total"] == 300


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stored=_json | st.fixed_dictionaries({"counts": _json, "recent": _json, "applied": _json})
       | st.fixed_dictionaries({"counts": st.dictionaries(st.text(max_size=6).map(lambda t: t + "|e"), st.integers(0, 9)),
                                "recent": st.lists(st.dictionaries(st.text(max_size=4), _json, max_size=3), max_size=3),
                                "applied": st.integers(-2, 2**63 - 1)})
       | st.fixed_dictionaries({"counts": st.dictionaries(st.sampled_from(["a|b", "?|?"]), st.integers(2**62, 2**64 - 1)),
                                "recent": st.just([]), "applied": st.integers(-1, 5)}))
def test_stored_dead_letter_statistics_are_read_only_when_they_can_be(stored):
    """The dead-letter agent counts anew on a stored record `readable` refuses (before: the agent
    raised on it); whatever it accepts, a letter can be folded in and the web view merge it."""
    from app.pipeline.codec import encode
    from domain import dead_letter_stats as stats

    if stats.readable(stored):
        folded = stats.apply(stored, 2**62, Letter.parse([]), b"x")
        encode(folded)  # writable (before: a count of 2**64 - 1 plus one was not)
        merged = stats.merge([folded])
        assert merged["total"] == sum(stored["counts"].values()) + (1 if stored["applied"] < 2**62 else 0)


def test_7_the_intake_is_bounded_by_bytes_as_well_as_records():
    from collections import namedtuple

    from app.kafka.intake import RecordSink

    Rec = namedtuple("Rec", "offset key value")
    consumer = type("C", (), {"flow_active": True})()

    async def main():
        sink = RecordSink(capacity=10_000, capacity_bytes=1_000_000)
        await sink.put(consumer, "tp", [Rec(0, None, b"x" * 600_000)])
        await sink.put(consumer, "tp", [Rec(1, None, b"x" * 600_000)])  # taken: the sink was under its bound
        blocked = asyncio.ensure_future(sink.put(consumer, "tp", [Rec(2, None, b"x" * 10)]))
        await asyncio.sleep(0.05)
        assert not blocked.done() and sink.size == 2, "1.2 MB waiting: the fetcher is held"
        await sink.take(1)
        await asyncio.sleep(0.01)
        assert blocked.done() and sink.bytes == 600_010

    asyncio.run(main())


# -- suspected, confirmed and fixed -----------------------------------------------------------------

def test_a_stored_state_record_that_is_not_json_makes_its_events_dead_letters_and_stays(processors):
    """Before: the worker exited on the first event of such a key, and again after every restart."""
    processor = processors("cart")
    producer = processors.producer
    record = keyed("cart", cart_event(1, "mangled"), next(_offsets))
    db = processor.writer.table.data._db_for_partition(record.partition)
    db[record.key] = b"\x00 not a state"
    since = len(producer.sent)

    assert run(processor, [record]).acked
    letter, = (Letter.parse(r.headers) for r in producer.to(DEAD_LETTERS, since))
    assert (letter.stage, letter.exception) == ("state", "CorruptState") and "not JSON" in letter.message, letter
    assert db[record.key] == b"\x00 not a state", "the record stays as it was, for an operator to look at"
    assert not producer.to("personalization_scores", since)


@pytest.mark.parametrize("pipeline, edges", [("cart", None), ("fraud", None),
                                              ("fraud", {"n": 2**64 - 1, "log_mean": -1e308})])
def test_a_stored_counter_at_the_edge_of_64_bits_is_written_back_and_the_worker_goes_on(processors, pipeline, edges):
    """Found by review: every integer of a valid state at 2**64 - 1; the event's fold added one, and
    orjson refused to write the state back: the write raised, the worker exited, at every restart.
    And (a review of the first fix) a card's count past 64 bits with its mean at -1e308: the standard
    library's JSON wrote -Infinity, which the next batch's read of the key could not parse."""
    processor = processors(pipeline)
    make = cart_event if pipeline == "cart" else transaction
    record = keyed(pipeline, make(1, "edge"), next(_offsets))
    stored = _valid_record(processor.pipeline, make(0, "edge"))
    stored["state"] = ({**stored["state"], **edges} if edges else
                       {k: 2**64 - 1 if type(v) is int else v for k, v in stored["state"].items()})
    db = processor.writer.table.data._db_for_partition(record.partition)
    db[record.key] = orjson.dumps(stored)
    since = len(processors.producer.sent)

    assert run(processor, [record]).acked
    assert run(processor, [keyed(pipeline, make(2, "edge"), next(_offsets))]).acked  # reads what the first wrote
    assert len(processors.producer.to(processor.pipeline.output_topic, since)) + \
        len(processors.producer.to(DEAD_LETTERS, since)) == 2


def test_a_stored_state_record_larger_than_any_state_is_a_dead_letter(processors):
    """Found by review: a 480 kB record (an extra field of numbers written as 1e5) was written back
    as 1,080,388 bytes, more than the changelog takes: the write failed for good, the worker exited."""
    processor = processors("cart")
    record = keyed("cart", cart_event(1, "huge"), next(_offsets))
    stored = _valid_record(processor.pipeline, cart_event(0, "huge"))
    raw = _dumps(stored).replace(b'"state":{', b'"state":{"padding":[' + b",".join([b"1e5"] * 60_000) + b"],", 1)
    db = processor.writer.table.data._db_for_partition(record.partition)
    db[record.key] = raw
    since = len(processors.producer.sent)

    assert run(processor, [record]).acked
    letter, = (Letter.parse(r.headers) for r in processors.producer.to(DEAD_LETTERS, since))
    assert letter.stage == "state" and "more than a state record's" in letter.message, letter
    assert db[record.key] == raw


def test_a_hop_record_on_another_partition_than_its_key_s_goes_to_the_key_s(processors):
    """Found by review: a forged hop record for u1 on the wrong partition was folded onto u1's state
    read there (none: a fresh one), then written, and u1's history on its own partition was
    replaced by it the next time the key was read from that cache."""
    from app.pipeline.lineage import origin_headers

    processor = processors("cart")
    hop_topic = processor.pipeline.repartition_topic
    right = keyed("cart", cart_event(1, "u-hop"), 1)
    run(processor, [keyed("cart", cart_event(i, "u-hop"), i) for i in range(1, 6)])
    wrong = (right.partition + 1) % 4
    since = len(processors.producer.sent)
    forged = ConsumerRecord(hop_topic, wrong, 0, right.key, orjson.dumps(cart_event(50, "u-hop")),
                            origin_headers(("cart_events", right.partition, 50)))
    run(processor, [forged])
    sent, = processors.producer.to(hop_topic, since)
    assert [p for t, p, _ in processors.producer.sent[since:] if t == hop_topic] == [right.partition]
    assert dict(sent.headers)["origin.offset"] == b"50", "its origin kept"
    assert processor.read("u-hop")["state"]["events"] == 5, "nothing folded on another partition"
    run(processor, [ConsumerRecord(hop_topic, right.partition, 1, sent.key, sent.value, sent.headers)])
    assert processor.read("u-hop")["state"]["events"] == 6


def test_keys_are_routed_right_when_their_cache_is_cleared_within_a_batch(processors, monkeypatch):
    """The routes of a batch's new keys are computed together and the cache is cleared when they
    would overfill it: the keys cached before that (here one on a wrong partition) and those cached
    after it are all still routed by their own hash, and the cache stays within its bound."""
    from app.kafka.partitioner import key_hash
    from app.pipeline import processor as processor_module

    monkeypatch.setattr(processor_module, "ROUTES_MAX", 4)
    processor = processors("cart")
    hop_topic = processor.pipeline.repartition_topic
    run(processor, [keyed("cart", cart_event(i, f"route{i}"), i) for i in range(3)])  # three keys cached
    misplaced = keyed("cart", cart_event(10, "route0"), 10)
    misplaced = misplaced._replace(partition=(misplaced.partition + 1) % 4)
    since = len(processors.producer.sent)

    run(processor, [keyed("cart", cart_event(i, f"route{i % 6}"), i) for i in range(11, 17)] + [misplaced])

    def partition(key: bytes) -> int:
        return key_hash(key) % 4

    outputs = [(p, r) for t, p, r in processors.producer.sent[since:] if t == "personalization_scores"]
    assert sorted(orjson.loads(r.value)["event_id"] for _, r in outputs) == [f"e{i}" for i in range(11, 17)]
    assert all(p == partition(r.key) for p, r in outputs), "each output on its key's partition"
    hops = [(p, r) for t, p, r in processors.producer.sent[since:] if t == hop_topic]
    assert [(p, r.key) for p, r in hops] == [(partition(b"route0"), b"route0")]
    assert len(processor._routes) <= 4


def test_forged_origin_partitions_cannot_grow_a_key_s_record_without_bound(processors):
    """Found by review: every distinct origin.partition on the hop added a stream to the key's record
    (20,000 of them: 980 kB, more than the changelog takes; the worker exited on the write)."""
    from app.pipeline.fold import STREAMS_MAX
    from app.pipeline.lineage import origin_headers

    processor = processors("cart")
    hop_topic = processor.pipeline.repartition_topic
    base = keyed("cart", cart_event(0, "u-streams"), 0)
    forged = [ConsumerRecord(hop_topic, base.partition, i, base.key, orjson.dumps(cart_event(i, "u-streams")),
                             origin_headers(("cart_events", 100 + i, 1))) for i in range(STREAMS_MAX + 10)]
    since = len(processors.producer.sent)
    assert run(processor, forged).acked
    letters = [Letter.parse(r.headers) for r in processors.producer.to(DEAD_LETTERS, since)]
    assert len(letters) == 10 and {x.stage for x in letters} == {"headers"}
    assert len(processor.read("u-streams")["applied"]) == STREAMS_MAX


@pytest.mark.parametrize("change", ["nested 300 deep", "activity empty", "null"])
def test_a_stored_state_record_of_the_wrong_shape_is_a_dead_letter_not_an_exception(processors, change):
    """Found by review: each of these passed the record's checks and then raised out of the batch,
    a 300-deep value when the state was written back (orjson writes 254 levels), an empty `activity`
    list in numpy (17 features instead of 20), JSON null as a fresh state over the record."""
    processor = processors("cart")
    producer = processors.producer
    record = keyed("cart", cart_event(1, f"shape-{change}"), next(_offsets))
    stored = _valid_record(processor.pipeline, cart_event(0, f"shape-{change}"))
    if change == "nested 300 deep":
        stored["state"]["extra"] = Deep(300)
    elif change == "activity empty":
        stored["state"]["activity"] = []
    stored = b"null" if change == "null" else _dumps(stored)
    db = processor.writer.table.data._db_for_partition(record.partition)
    db[record.key] = stored
    since = len(producer.sent)

    assert run(processor, [record]).acked
    letter, = (Letter.parse(r.headers) for r in producer.to(DEAD_LETTERS, since))
    assert letter.stage in ("state", "features"), letter
    assert db[record.key] == stored, "the record stays as it was"


@pytest.mark.parametrize("sibling", [False, True])
@pytest.mark.parametrize("past", [0, 1])
def test_a_stored_record_nested_past_what_its_write_back_takes_is_refused_even_in_its_fewest_bytes(past, sibling):
    """The store counts brackets only in records longer than twice the depth it refuses (nested d
    deep, JSON takes at least 2d bytes): the shortest record one level too deep is still refused,
    the one at the limit is read. With an empty list beside the nesting, the brackets outnumber the
    limit and the depth itself is measured: the same answers."""
    from app.kafka.store import MAX_DEPTH, Undecodable, _decode

    depth = MAX_DEPTH + past
    nested = b"[" * (depth - 1) + b"]" * (depth - 1)
    value = _decode(b"[" + nested + (b",[]" if sibling else b"") + b"]")
    assert isinstance(value, Undecodable) == bool(past), value[:80]


def test_later_events_of_a_key_are_not_featurised_on_an_event_the_model_rejected(processors, tmp_path):
    from tests.flows import FLOWS

    rules = tmp_path / "faults"
    rules.write_text("score_poison:e2\n")
    processor = processors("cart", fault_file=str(rules))
    events = [cart_event(1, "u1"), cart_event(2, "u1", "add_to_cart"), cart_event(3, "u1", "add_to_cart")]
    run(processor, [keyed("cart", e, 20 + i) for i, e in enumerate(events)])
    outputs = {orjson.loads(o.value)["event_id"]: orjson.loads(o.value) for o in processors.producer.to("personalization_scores")}
    assert sorted(outputs) == ["e1", "e3"]
    without = [events[0], events[2]]
    pipe, state = processor.pipeline, processor.pipeline.new_state()
    for e in without:
        state = pipe.apply(state, e)
    assert outputs["e3"]["features"] == list(pipe.features(state, events[2])), "e3 scored on a state without e2"
    assert processor.read("u1")["state"] == FLOWS["cart"].offline_states(without)["u1"]


def test_keyed_and_unkeyed_records_of_one_key_on_one_partition_are_all_applied(processors):
    """Issue 14, 2: an unkeyed record at offset 15 takes the hop; a keyed one at offset 20 is applied
    directly; when 15 comes back through the hop it used to be taken for a duplicate."""
    from app.pipeline.lineage import origin_headers

    processor = processors("cart")
    direct = keyed("cart", cart_event(20, "u1"), 20)
    unkeyed = keyed("cart", cart_event(15, "u1"), 15, key=None)
    run(processor, [unkeyed, direct])
    hop, = processors.producer.to(processor.pipeline.repartition_topic)
    assert dict(hop.headers)["origin.offset"] == b"15"
    back = ConsumerRecord(processor.pipeline.repartition_topic, direct.partition, 0, hop.key, hop.value,
                          origin_headers(("cart_events", direct.partition, 15)))
    run(processor, [back])
    assert sorted(orjson.loads(o.value)["event_id"] for o in processors.producer.to("personalization_scores")) == ["e15", "e20"]
    assert processor.read("u1")["state"]["events"] == 2
    run(processor, [back._replace(offset=1)])  # the hop record again (a crash before its commit)
    assert processor.read("u1")["state"]["events"] == 2 and duplicates(processor) >= 1


def test_a_replayed_event_is_applied_once_even_when_replayed_twice(processors):
    processor = processors("cart")
    replay = [(deadletters.REPLAY_OF, b"cart_events:2:17"), (deadletters.REPLAY_COUNT, b"1")]
    first = keyed("cart", cart_event(17, "u2"), 40, headers=replay)
    run(processor, [first])
    run(processor, [first._replace(offset=41)])  # replayed again, at a new offset
    assert processor.read("u2")["state"]["events"] == 1
    identity, = processor.read("u2")["replayed"]
    assert identity.startswith("cart_events:2:17#"), "the lineage and a hash of the value"
    assert len(processors.producer.to("personalization_scores")) == 1


def test_a_forged_replay_lineage_suppresses_no_other_event(processors):
    """Found by review: a record of another value claiming a letter's lineage was applied as that
    replay, and the real replay, later, was taken for a duplicate; a producer copying such headers
    had every event after the first dropped."""
    processor = processors("cart")
    claim = [(deadletters.REPLAY_OF, b"cart_events:1:5"), (deadletters.REPLAY_COUNT, b"1")]
    forged = [keyed("cart", cart_event(100 + i, "u-claim"), 60 + i, headers=claim) for i in range(3)]
    run(processor, forged)
    real = keyed("cart", cart_event(5, "u-claim"), 70, headers=claim)
    run(processor, [real])
    assert processor.read("u-claim")["state"]["events"] == 4, "three events with copied headers and the real replay"
    assert sorted(orjson.loads(o.value)["event_id"] for o in processors.producer.to("personalization_scores")) == \
        ["e100", "e101", "e102", "e5"]


def test_more_replays_of_a_key_than_it_remembers_are_applied_once_after_a_redelivery(processors):
    """Found by review: a key remembers the last 32 replays; a batch of 40, redelivered after a
    crash before its commit, was applied again from the first (each pushed the next out)."""
    from app.pipeline.fold import REPLAYED_MAX

    processor = processors("cart")
    n = REPLAYED_MAX + 8
    replays = [keyed("cart", cart_event(i, "u-many"), 200 + i,
                     headers=[(deadletters.REPLAY_OF, f"cart_events:1:{i}".encode()), (deadletters.REPLAY_COUNT, b"1")])
               for i in range(n)]
    run(processor, replays)
    run(processor, replays)  # the same records again
    assert processor.read("u-many")["state"]["events"] == n
    assert len(processors.producer.to("personalization_scores")) == n and duplicates(processor) >= n


def test_a_quarantined_record_is_a_dead_letter_without_being_read(processors):
    processor = processors("cart")
    run(processor, [keyed("cart", cart_event(1, "u1"), 9)], set_aside=2)
    letter, = processors.producer.to(DEAD_LETTERS)
    parsed = Letter.parse(letter.headers)
    assert (parsed.stage, parsed.exception, parsed.attempts) == ("quarantine", "PoisonPill", "2")
    assert not processors.producer.to("personalization_scores")


def test_a_letter_whose_headers_raise_is_left_uncounted_and_the_partition_goes_on(monkeypatch, caplog):
    """Before: an exception out of Letter.parse (a digit str.isdigit() takes and int() does not)
    restarted the agent, which met the same letter again, for ever, its partition never committed."""
    from agents import dead_letters
    from domain import dead_letter_stats as stats

    def raising(headers):
        raise ValueError("unreadable")
    monkeypatch.setattr(dead_letters.Letter, "parse", staticmethod(raising))
    record = ConsumerRecord(DEAD_LETTERS, 0, 7, None, b"v", [])
    folded = dead_letters._fold(stats.new_stats(), record)
    assert folded["applied"] == 7 and folded["counts"] == {} and "not counted" in caplog.text


def test_a_hop_batch_overtaken_by_a_later_one_of_its_partition_is_a_dead_letter_not_retried_behind_it(processors):
    """Found by review: the hop recognises a record already applied by its origin offset, so a failed
    batch retried behind a later one of its partition was taken, record by record, for duplicates:
    no output, no state, no dead letter."""
    events = [{**cart_event(i, "u-order"), "category": "c" * 250} for i in range(2500)]
    records = [keyed("cart", e, 10_000 + i, key=None) for i, e in enumerate(events)]  # unkeyed: all take the hop
    hops, letters, refused = _hop_refused_once(processors, records)
    assert refused and len(hops) + len(letters) == len(records), "several batches to one partition, the first refused"
    assert hops == sorted(hops), "the hop gets its records in origin order"
    assert len(letters) == refused[0] and {x.exception for x in letters} == {"Overtaken"}


def _hop_refused_once(processors, records) -> tuple[list[int], list, list[int]]:
    """`records` through a cart processor whose first batch to the repartition topic is refused once
    (transiently): (origin offsets as the hop received them, the dead letters, the refused batch's size)."""
    from aiokafka.errors import KafkaConnectionError

    processor = processors("cart")
    producer = processors.producer
    hop_topic = processor.pipeline.repartition_topic
    refused = []

    def refuse(topic, batch):
        if topic == hop_topic and not refused:
            refused.append(len(batch))
            return KafkaConnectionError("a moment of outage")
        return None
    producer.refuse = refuse
    since = len(producer.sent)
    try:
        assert run(processor, records).acked
    finally:
        producer.refuse = None
    hops = [int(dict(r.headers)["origin.offset"]) for r in producer.to(hop_topic, since)]
    return hops, [Letter.parse(r.headers) for r in producer.to(DEAD_LETTERS, since)], refused


def test_the_dead_letter_view_reads_one_record_per_partition_however_many_keys_the_table_holds():
    """Found by review: every /dead-letters and /stats request read every key of the statistics
    table, whose changelog anyone can fill with a million keys, on the event loop, every 2 s."""
    from types import SimpleNamespace

    from app.web.tables import dead_letter_summary
    from domain import dead_letter_stats as stats

    class Table:
        changelog_topic = SimpleNamespace(get_topic_name=lambda: "scoring-dead_letter_stats-changelog")

        def keys(self):
            raise AssertionError("the table was scanned")

    read = []
    stored = {"p1": stats.apply(stats.new_stats(), 0, Letter.parse([("errors.stage", b"decode")]), b"v")}
    writer = SimpleNamespace(read=lambda k: read.append(k) or stored.get(k))
    service = SimpleNamespace(dead_letters=SimpleNamespace(table=Table(), writer=writer),
                              settings=SimpleNamespace(partitions=4), faust=SimpleNamespace())
    assert dead_letter_summary(service)["total"] == 1 and read == ["p0", "p1", "p2", "p3"]


def test_records_retried_after_a_failed_round_keep_their_order(processors):
    """Found by review of the Overtaken fix: the failed records were collected from the last batch
    back and then reversed, which reversed each batch too: five hop records of one user refused once
    went out again as 20004..20000, and the key's owner took four of them for duplicates."""
    records = [keyed("cart", cart_event(i, "u-retry"), 20_000 + i, key=None) for i in range(5)]
    hops, letters, refused = _hop_refused_once(processors, records)
    assert refused == [5] and hops == [20_000 + i for i in range(5)] and not letters
