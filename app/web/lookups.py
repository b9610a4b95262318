"""A key's live state, features and recent scores, answered by the worker that owns the key's
partition, whichever worker is asked: Faust's `table_route` forwards the request (with its
headers, so the token too) to the owner.

  GET /users/{user_id}/session    a user's session (cart pipeline)
  GET /cards/{card_id}/state      a card's state (fraud pipeline; 404 while there is no such pipeline)
  GET /state/{pipeline}/{key}     any pipeline, by its state key
"""
from __future__ import annotations

import unicodedata

import aiohttp
from faust.exceptions import SameNode
from faust.web import Request, Response, View

from app.kafka.consumer import routing_metadata
from app.pipeline.fold import CorruptState, unpack

MAX_KEY_CHARS = 256  # the codec's limit for a string field such as user_id


def bad_key(key: str) -> str | None:
    """Why a key from the URL is malformed, or None."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        return "key contains control characters"
    return None


def features_now(pipeline, state: dict) -> tuple[dict | None, dict | None]:
    """Features of the last event as the state holds them, with the event's own fields set by a probe.

    The state keeps no copy of the last event, so the event-specific features (event_type, price)
    are those of the probe, a page_view at price 0; every state-derived feature is what the last
    event was scored with. A pipeline whose features need other event fields gets None.
    """
    probe = {"type": "page_view", "price": 0.0, "quantity": 1}
    try:
        return dict(zip(pipeline.feature_names, pipeline.features(state, probe))), probe
    except Exception:
        return None, None


def register(service, recent: dict) -> None:
    app, running = service.faust, service.pipelines

    def key_state(view: View, name: str, key: str, not_found: str):
        r = running[name]
        p = r.pipeline
        record = r.processor.read(key)
        if record is None:
            return view.error(404, not_found, **{p.key_field: key})
        try:
            state, applied, _ = unpack(p, record)
        except CorruptState as exc:  # its events go to the dead letters until it is fixed
            return view.error(500, f"the stored state of this key cannot be read: {exc}", **{p.key_field: key})
        features, probe = features_now(p, state)
        return view.json({
            "pipeline": name,
            p.key_field: key,
            "worker": str(app.conf.canonical_url),
            "partition": r.processor.partition_of(key.encode()),
            "state": state,
            "applied_offsets": applied,
            "features_now": features,
            "features_probe": probe,
            "model_version": r.models.champion.version,
            "recent_scores": recent[name].of(key),
        })

    async def routed(view: View, request: Request, name: str, key: str, not_found: str):
        table = running[name].table
        await routing_metadata(app, table.changelog_topic.get_topic_name())
        try:
            return await app.router.route_req(table.name, key, view.web, request)
        except SameNode:
            return key_state(view, name, key, not_found)
        except aiohttp.ClientError as exc:
            return view.error(503, f"owner of the key is unreachable: {type(exc).__name__}")

    if "cart" in running:
        @app.page("/users/{user_id}/session")
        class UserSession(View):
            """A user's live session, answered by the owner of the user's partition."""

            async def get(self, request: Request, user_id: str) -> Response:
                reason = bad_key(user_id)
                if reason:
                    return self.error(400, f"malformed user_id: {reason}")
                await routing_metadata(app, running["cart"].table.changelog_topic.get_topic_name())
                try:
                    return await self._lookup(request, user_id=user_id)
                except aiohttp.ClientError as exc:
                    return self.error(503, f"owner of the user is unreachable: {type(exc).__name__}")

            @app.table_route(table=running["cart"].table, match_info="user_id")
            async def _lookup(self, request: Request, user_id: str) -> Response:
                return key_state(self, "cart", user_id, "unknown user")

    @app.page("/cards/{card_id}/state")
    class CardState(View):
        async def get(self, request: Request, card_id: str) -> Response:
            if "fraud" not in running:
                return self.error(404, "no fraud pipeline on this deployment")
            reason = bad_key(card_id)
            if reason:
                return self.error(400, f"malformed card_id: {reason}")
            return await routed(self, request, "fraud", card_id, "unknown card")

    @app.page("/state/{pipeline}/{key}")
    class KeyState(View):
        async def get(self, request: Request, pipeline: str, key: str) -> Response:
            if pipeline not in running:
                return self.error(404, "unknown pipeline", pipelines=sorted(running))
            reason = bad_key(key)
            if reason:
                return self.error(400, f"malformed key: {reason}")
            return await routed(self, request, pipeline, key, "unknown key")
