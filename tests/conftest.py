from __future__ import annotations

import os
import tempfile

import pytest

# The worker's settings are read at the first `current()` (test modules call `configured()` at
# collection): tests that build the app in-process keep its local state out of the checkout.
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="scoring-tests-"))

from app.dev.broker import EmbeddedBroker
from tests.harness import MODEL_DIR, Worker


@pytest.fixture
def broker(tmp_path):
    """A fresh in-memory broker per test: no topic or offset leaks between tests."""
    b = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def workers(broker, tmp_path):
    """Factory of worker processes; all are stopped by PID at the end, whatever happened."""
    started: list[Worker] = []

    def make(name: str = "w1", env: dict | None = None, data_dir=None, start: bool = True, **kw) -> Worker:
        w = Worker(broker.url, data_dir or tmp_path / f"data-{name}", tmp_path / "logs", name, env, **kw)
        started.append(w)
        return w.start() if start else w

    try:
        yield make
    finally:
        for w in started:
            w.kill()


def pytest_configure(config):
    from app.pipelines import configured

    missing = [name for name in configured() if not (MODEL_DIR / name / "model.txt").exists()]
    if missing:
        raise pytest.UsageError(f"no {missing} model in {MODEL_DIR}: run `make model` first (make test does)")


# Property-based tests: a bounded number of examples in `make test`; `make fuzz` runs many more.
from hypothesis import settings as _hypothesis  # noqa: E402

_hypothesis.register_profile("ci", max_examples=60, deadline=None, derandomize=False)
_hypothesis.register_profile("fuzz", max_examples=3000, deadline=None)
_hypothesis.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
