"""The bearer token and the JSON errors: one aiohttp middleware over every route, Faust's own too.

With WEB_TOKEN set, every endpoint but /health, /metrics and the dashboard page itself needs
`Authorization: Bearer <token>`. Every error is a JSON body, never a stack trace; / redirects to
the dashboard.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

import orjson
from aiohttp import web as aioweb

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics", "/dashboard", "/favicon.ico"})


def json_error(status: int, message: str, **extra) -> aioweb.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="scoring"'} if status == 401 else None
    return aioweb.Response(body=orjson.dumps({"error": message, **extra}), status=status,
                           content_type="application/json", charset="utf-8", headers=headers)


def authorized(request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    # aiohttp keeps a header's non-ASCII bytes as lone surrogates: no token of ours has them
    raw = given.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(raw, token.encode())


def guard(token: str):
    @aioweb.middleware
    async def middleware(request, handler):
        if request.path == "/":
            raise aioweb.HTTPFound("/dashboard")
        if token and request.path not in OPEN_PATHS and not authorized(request, token):
            return json_error(401, "missing or wrong bearer token")
        try:
            return await handler(request)
        except aioweb.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("web request %s %s failed", request.method, request.path)
            return json_error(500, "internal error (see the worker log)")

    return middleware
