"""GET /dashboard: the HTML dashboard (always open; its data calls carry the token)."""
from __future__ import annotations

from pathlib import Path

from faust.web import Request, Response, View

STATIC = Path(__file__).resolve().parent / "static"


def register(service) -> None:
    app, token = service.faust, service.settings.web_token

    @app.page("/dashboard")
    class Dashboard(View):
        async def get(self, request: Request) -> Response:
            try:
                page = (STATIC / "dashboard.html").read_text(encoding="utf-8")
            except OSError:
                return self.error(500, "dashboard.html is missing from the installation")
            # The page learns here whether to ask for the token, before its first data call.
            page = page.replace("__AUTH_REQUIRED__", "true" if token else "false")
            return self.html(page, headers={"Cache-Control": "no-store"})
