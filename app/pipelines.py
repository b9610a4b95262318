"""What differs between the pipelines: schema, key, state functions, features, output shape, topics.

Everything else (decode, routing, idempotency, scoring, the gate, dead letters) is shared in
`app/pipeline/`. Training uses the same definitions, so offline and online cannot drift apart.
A pipeline's topic names and the parameters of its functions (the session gap, the fraud decision
thresholds) come from the settings: `define(settings)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

from app.pipeline.codec import Check, Field, Poison, Schema, timestamp
from app.settings import PIPELINE_NAMES
from domain import card, session


@dataclass(frozen=True)
class Pipeline:
    name: str
    source_topic: str
    output_topic: str
    repartition_topic: str  # records not keyed by the state key make one hop through it
    label_topic: str  # labels that come back later, for the models' AUC on the same events
    table_name: str
    key_field: str
    id_field: str
    schema: Schema
    check: Check | None
    new_state: Callable[[], dict]
    apply: Callable[[dict, dict], dict]
    features: Callable[[dict, dict], tuple]
    feature_names: tuple[str, ...]
    # (event, state after, score, reasons) -> output fields beyond the common ones
    output: Callable[[dict, dict, float, list | None], dict]
    # how many top contributions to report per output (0: do not compute them), and the lowest score
    # whose output carries them: TreeSHAP costs hundreds of times the prediction itself
    reasons: int = 0
    reasons_at: float = 0.0
    # score -> the decision it makes, for a pipeline that decides (fraud: approve / review / decline)
    decide: Callable[[float], str] | None = None


_ID = Field("event_id", str)
# A state key is a table key: no control characters, which no real id has and which let a key be
# the store's own bookkeeping key (Faust's persisted offset is b"__faust\x00offset__").
_KEY = re.compile(r"[^\x00-\x1f\x7f]+")
CART_SCHEMA = Schema("CartEvent", (
    _ID,
    Field("user_id", str, pattern=_KEY),
    timestamp(),
    Field("type", str, choices=frozenset(session.EVENT_TYPES)),
    Field("product_id", str, required=False),
    Field("category", str),
    Field("price", float, minimum=0.0, maximum=1e7),
    Field("quantity", int, minimum=1, maximum=10_000),
))


def _cart_check(event: dict) -> None:
    if event["type"] != "page_view" and "product_id" not in event:
        raise Poison("validate", f"field 'product_id' is required for {event['type']}")


def _cart_output(event: dict, state: dict, score: float, reasons: list | None) -> dict:
    return {"session_id": state["session_id"], "type": event["type"]}


FRAUD_SCHEMA = Schema("Transaction", (
    Field("txn_id", str),
    Field("card_id", str, pattern=_KEY),
    timestamp(),
    Field("amount", float, minimum=0.0, exclusive_min=True, maximum=1e7),
    Field("currency", str, pattern=re.compile(r"[A-Z]{3}")),       # ISO 4217
    Field("merchant_id", str),
    Field("mcc", str, pattern=re.compile(r"[0-9]{4}")),           # ISO 18245 merchant category
    Field("country", str, pattern=re.compile(r"[A-Z]{2}")),       # ISO 3166-1 alpha-2
    Field("channel", str, choices=frozenset(card.CHANNELS)),
    Field("device_id", str, required=False),
))


def fraud_decision(score: float, review_at: float, decline_at: float) -> str:
    if score >= decline_at:
        return "decline"
    if score >= review_at:
        return "review"
    return "approve"


def _fraud_output(decide, event: dict, state: dict, score: float, reasons: list | None) -> dict:
    return {"decision": decide(score), "reasons": reasons or []}


def repartition_topic(prefix: str, source_topic: str, key_field: str) -> str:
    return f"{prefix}-{source_topic}-by-{key_field}"


def define(settings) -> dict[str, Pipeline]:
    """Every pipeline, by name, as `settings` (app.settings.Settings) configure them."""
    prefix = settings.topic_prefix
    decide_fraud = partial(fraud_decision, review_at=settings.fraud_review_at, decline_at=settings.fraud_decline_at)
    cart = Pipeline(
        name="cart",
        source_topic=settings.cart_input_topic,
        output_topic=settings.cart_output_topic,
        repartition_topic=repartition_topic(prefix, settings.cart_input_topic, "user_id"),
        label_topic=settings.cart_label_topic,
        table_name="user_sessions",
        key_field="user_id",
        id_field="event_id",
        schema=CART_SCHEMA,
        check=_cart_check,
        new_state=session.new_state,
        apply=partial(session.apply, session_gap_s=settings.session_gap_s),
        features=session.features,
        feature_names=session.FEATURE_NAMES,
        output=_cart_output,
    )
    fraud = Pipeline(
        name="fraud",
        source_topic=settings.fraud_input_topic,
        output_topic=settings.fraud_output_topic,
        repartition_topic=repartition_topic(prefix, settings.fraud_input_topic, "card_id"),
        label_topic=settings.fraud_label_topic,
        table_name="card_state",
        key_field="card_id",
        id_field="txn_id",
        schema=FRAUD_SCHEMA,
        check=None,
        new_state=card.new_state,
        apply=card.apply,
        features=card.features,
        feature_names=card.FEATURE_NAMES,
        output=partial(_fraud_output, decide_fraud),
        reasons=3,
        reasons_at=settings.fraud_review_at if settings.fraud_reasons == "flagged" else 0.0,
        decide=decide_fraud,
    )
    defined = {cart.name: cart, fraud.name: fraud}
    assert tuple(defined) == PIPELINE_NAMES
    return defined


def configured() -> dict[str, Pipeline]:
    """Every pipeline as this process's settings (the environment) define them."""
    from app.settings import current

    return define(current())
