"""What the shared failure tests need to know about a pipeline: topics, sample events, poison.

The poison, crash, transient and publish-failure tests are written once over a `Flow`, and run for
every pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import orjson

from app.pipelines import Pipeline, configured
from tests import fraud_fixtures
from training import cart_sim


@dataclass(frozen=True)
class Flow:
    pipeline: Pipeline
    valid: Callable[[int, int], list[dict]]  # (n_keys, seed) -> events in produce order
    poison: Callable[[], list[tuple[str, bytes | None, bytes | None]]]

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def source(self) -> str:
        return self.pipeline.source_topic

    @property
    def output(self) -> str:
        return self.pipeline.output_topic

    @property
    def key(self) -> str:
        return self.pipeline.key_field

    @property
    def id(self) -> str:
        return self.pipeline.id_field

    def changelog(self, app_id: str = "scoring") -> str:
        return f"{app_id}-{self.pipeline.table_name}-changelog"

    def offline_states(self, events: list[dict]) -> dict[str, dict]:
        """The state per key after a crash-free fold of `events` (through the codec, as online)."""
        from app.pipeline.codec import decode

        pipe = self.pipeline
        states: dict[str, dict] = {}
        for raw in events:
            e = decode(orjson.dumps(raw), pipe.schema, 1 << 20, pipe.check)
            states[e[pipe.key_field]] = pipe.apply(states.get(e[pipe.key_field]) or pipe.new_state(), e)
        return states


def cart_events(n_users: int, seed: int) -> list[dict]:
    events = cart_sim.simulate(n_users, days=3, seed=seed)
    return [{k: v for k, v in e.items() if k != "_label"} for e in events]


GOOD_CART = {"event_id": "x", "user_id": "poison-user", "ts": 1_700_000_000_000, "type": "add_to_cart",
             "product_id": "p1", "category": "books", "price": 1.0, "quantity": 1}


def _j(**over) -> bytes:
    return orjson.dumps({**GOOD_CART, **over})


def cart_poison() -> list[tuple[str, bytes | None, bytes | None]]:
    """(description, key, value) of records that can never succeed."""
    missing = {k: v for k, v in GOOD_CART.items() if k != "category"}
    return [
        ("not utf-8", b"k1", b"\xff\xfe\xfa"),
        ("not json", b"k2", b"{nope"),
        ("json array", None, b"[1,2,3]"),
        ("no value", b"k3", None),
        ("missing field", b"k4", orjson.dumps({**missing, "event_id": "p-missing"})),
        ("mistyped field", b"k5", _j(event_id="p-type", quantity="two")),
        ("unknown type", b"k6", _j(event_id="p-kind", type="teleport")),
        ("non-finite", b"k7", b'{"event_id":"p-nan","user_id":"u","ts":1700000000000,"type":"page_view",'
                              b'"category":"c","price":NaN,"quantity":1}'),
        ("negative price", b"k8", _j(event_id="p-neg", price=-3.0)),
        ("absurd timestamp", b"k9", _j(event_id="p-ts", ts=99)),
        ("oversized", b"k10", _j(event_id="p-big", category="c" * 200, padding="x" * 70_000)),
    ]


FLOWS = {
    "cart": Flow(configured()["cart"], cart_events, cart_poison),
    "fraud": Flow(configured()["fraud"], fraud_fixtures.valid_events, fraud_fixtures.poison_transactions),
}
