"""What a hostile or careless producer writes: hypothesis strategies, and a producer that can write it.

The strategies make records of every kind the guide lists (any bytes; JSON nested thousands deep,
numbers beyond float range, odd unicode, duplicate keys; absent, foreign and non-UTF-8 keys; null,
non-UTF-8 and forged headers), mixed with valid events, for either pipeline.
"""
from __future__ import annotations

import contextlib
import json
from collections import namedtuple

from hypothesis import strategies as st

ConsumerRecord = namedtuple("ConsumerRecord", "topic partition offset key value headers")

T0 = 1_700_000_000_000
USERS = ["u1", "u2", "u3"]
CARDS = ["c1", "c2", "c3"]
# names this service writes somewhere: forged copies of them are the interesting ones
OWN_HEADERS = ["origin.topic", "origin.partition", "origin.offset", "replay.of", "replay.count",
               "errors.topic", "errors.partition", "errors.offset", "errors.stage"]
HEADER_VALUES = [b"", b"abc", b"-1", b"0", b"3", b"10" * 12, b"1000000000000000000", b"99999999999999999999",
                 b"cart_events", b"transactions", b"cart_events:0:5", b"transactions:1:7",
                 b"scoring-user_sessions-changelog:0:1", b"\xff\xfe", b"\xc3\x28"]


def cart_event(i: int, user: str, kind: str = "product_view") -> dict:
    return {"event_id": f"e{i}", "user_id": user, "ts": T0 + i * 1000, "type": kind, "product_id": "p1",
            "category": "books", "price": 10.0, "quantity": 1}


def transaction(i: int, card: str) -> dict:
    return {"txn_id": f"t{i}", "card_id": card, "ts": T0 + i * 1000, "amount": 12.5, "currency": "EUR",
            "merchant_id": "m1", "mcc": "5411", "country": "DE", "channel": "pos"}


def valid_events(pipeline: str):
    if pipeline == "cart":
        return st.builds(
            lambda i, user, kind, price: {**cart_event(i, user, kind), "price": price},
            st.integers(0, 10**6), st.sampled_from(USERS),
            st.sampled_from(["page_view", "product_view", "add_to_cart", "remove_from_cart", "checkout_start",
                             "purchase"]),
            st.floats(0, 1e7, allow_nan=False))
    return st.builds(lambda i, card, amount: {**transaction(i, card), "amount": amount},
                     st.integers(0, 10**6), st.sampled_from(CARDS), st.floats(0.01, 1e7, allow_nan=False))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _mutated(event: dict, field: str, value) -> bytes:
    out = dict(event)
    if value is _DROP:
        out.pop(field, None)
    else:
        out[field] = value
    return json.dumps(out).encode()


_DROP = object()


def values(pipeline: str):
    """Record values: mostly valid events, and everything else."""
    events = valid_events(pipeline)
    encoded = events.map(lambda e: json.dumps(e).encode())
    mutated = st.builds(_mutated, events, st.sampled_from(["event_id", "user_id", "card_id", "ts", "type", "price",
                                                           "amount", "quantity", "currency", "country"]),
                        st.just(_DROP) | json_values)
    deep = st.builds(lambda n, opener: opener[0] * n + b"1" + opener[1] * n, st.integers(500, 200_000),
                     st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    huge_numbers = st.builds(lambda e, n: json.dumps(e).encode().replace(b'"ts": ', b'"ts": ' + n + b", \"x\": "),
                             events, st.sampled_from([b"1e999", b"-1e400", b"9" * 400, b"1e-999", b"-0"]))
    duplicate_keys = st.builds(lambda e, k: json.dumps(e).encode()[:-1] + b', "' + k.encode() + b'": "zz"}',
                               events, st.sampled_from(["user_id", "card_id", "ts", "event_id", "txn_id"]))
    odd_unicode = st.builds(lambda e, t: json.dumps({**e, "category": t}, ensure_ascii=False).encode(),
                            events, st.text(min_size=1, max_size=30))
    bad_utf8 = st.builds(lambda e: json.dumps(e).encode().replace(b"1", b"\xff", 1), events)
    huge_string = st.builds(lambda e, n: json.dumps({**e, "pad": "x" * n}).encode(), events,
                            st.sampled_from([70_000, 300_000]))
    return st.one_of(encoded, encoded, encoded, mutated, deep, huge_numbers, duplicate_keys, odd_unicode,
                     bad_utf8, huge_string, json_values.map(lambda v: json.dumps(v).encode()),
                     st.binary(max_size=64), st.none())


header_names = st.sampled_from(OWN_HEADERS) | st.text(max_size=12) | st.sampled_from(["\udcff\udcfe", "k\udc80"])
header_values = st.none() | st.sampled_from(HEADER_VALUES) | st.binary(max_size=24)
headers = st.lists(st.tuples(header_names, header_values), max_size=4)


def keys(pipeline: str):
    own = USERS if pipeline == "cart" else CARDS
    other = CARDS if pipeline == "cart" else USERS
    return st.none() | st.sampled_from([k.encode() for k in own + other]) | st.binary(max_size=12)


def records(pipeline: str, source: str, hop: str, partitions: int = 4):
    """A batch of records: (topic, partition, key, value, headers); offsets are given by the caller."""
    one = st.tuples(st.sampled_from([source, source, source, hop]), st.integers(0, partitions - 1), keys(pipeline),
                    values(pipeline), headers)
    return st.lists(one, min_size=1, max_size=12)


@contextlib.contextmanager
def raw_header_keys():
    """aiokafka's producer writes header names as UTF-8; inside this block a `RawName` is written
    as its raw bytes (the Python record builder is used), as a producer in another language may."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    saved = accumulator.DefaultRecordBatchBuilder, producer.DefaultRecordBatchBuilder
    accumulator.DefaultRecordBatchBuilder = producer.DefaultRecordBatchBuilder = _DefaultRecordBatchBuilderPy
    try:
        yield
    finally:
        accumulator.DefaultRecordBatchBuilder, producer.DefaultRecordBatchBuilder = saved


class RawName(str):
    """A header name that encodes to the given bytes (not UTF-8)."""

    def __new__(cls, raw: bytes):
        name = str.__new__(cls, raw.decode("latin-1"))
        name.raw = raw
        return name

    def encode(self, *args, **kwargs) -> bytes:
        return self.raw
