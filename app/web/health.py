"""Liveness and readiness, as Kubernetes probes read them.

  GET /health    liveness (always open)
  GET /ready     200 once table recovery is done and partitions are assigned, else 503
"""
from __future__ import annotations

from faust.web import Request, Response, View

from app import metrics


def readiness(app) -> tuple[bool, str]:
    if not app.tables.recovery.completed.is_set():
        return False, "table recovery not completed"
    if app.rebalancing or getattr(app, "in_recovery", False):
        return False, "rebalancing"
    try:
        assignment = app.consumer.assignment()
    except Exception:
        assignment = set()
    if not assignment:
        return False, "no partitions assigned"
    return True, "ready"


def register(service) -> None:
    app = service.faust
    metrics.watch_readiness(lambda: readiness(app))

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            ok, why = readiness(app)
            return self.json({"ready": ok, "reason": why}, status=200 if ok else 503)
