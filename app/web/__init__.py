"""Web views on each worker (Faust's web server, WEB_PORT), one module per job:

  auth.py       the bearer token (WEB_TOKEN) and JSON errors, over every route
  health.py     /health, /ready
  lookups.py    /users/{id}/session, /cards/{id}/state, /state/{pipeline}/{key}: routed to the key's owner
  recent.py     the last outputs per key, fed by the processors, shown by the lookups
  tables.py     /tables, /tables/{name}, /dead-letters
  stats.py      /metrics, /stats, /model
  dashboard.py  /dashboard (/ redirects there)
"""
from __future__ import annotations

from app.web import auth, dashboard, health, lookups, stats, tables
from app.web.recent import RecentScores


def register(service) -> None:
    """The views of `service` (app.main.Service) on its Faust app."""
    app = service.faust
    app.web.web_app.middlewares.append(auth.guard(service.settings.web_token))
    recent = {}
    for name, r in service.pipelines.items():
        recent[name] = RecentScores(r.pipeline.id_field)
        r.processor.observers.append(recent[name].record)
    counts = tables.KeyCounts(app)
    health.register(service)
    lookups.register(service, recent)
    tables.register(service, counts)
    stats.register(service, counts)
    dashboard.register(service)
