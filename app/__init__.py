"""Real-time scoring service. `faust -A app worker` finds the Faust app as `app.app`.

The app is built on first access (PEP 562), so that importing a submodule such as `app.codec` in a
test or in the training job does not build a Faust app or load a model.
"""


def __getattr__(name: str):
    if name == "app":
        from app.worker import app

        return app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
