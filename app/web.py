"""Web views on each worker (Faust's web server, WEB_PORT)."""
from __future__ import annotations

from faust.web import Request, Response, View

from app.worker import app


@app.page("/health")
class Health(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})
