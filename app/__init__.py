"""Real-time scoring service. `faust -A app worker` finds the Faust app as `app.app`.

The app is built on first access (PEP 562), by app/main.py: importing a submodule such as
`app.pipeline.codec` in a test or in the training job builds no Faust app, loads no model, patches nothing.
"""

_service = None


def service():
    """This process's worker (app.main.Service), built from the environment's settings at first call."""
    global _service
    if _service is None:
        from app.main import build

        _service = build()
    return _service


def __getattr__(name: str):
    if name == "app":
        return service().faust
    raise AttributeError(f"module 'app' has no attribute {name!r}")
