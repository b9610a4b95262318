"""`python -m app.models.compile MODEL_FILE`: compile a model's trees to native code, into the cache
beside it (app/models/scorer.py `compiled`). A worker that receives a model runs this in a process of
its own: compiling takes seconds of CPU that must not hold the worker's event loop or its GIL."""
from __future__ import annotations

import sys
from pathlib import Path

from app.models.scorer import compiled

if __name__ == "__main__":
    compiled(Path(sys.argv[1]))
