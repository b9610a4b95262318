"""`python -m app.models.compile MODEL_FILE`: compile a model's trees to native code, into the cache
beside it (app/models/scorer.py `compiled`), and load and run it once as the worker will. A worker
that receives a model runs this in a process of its own: compiling takes seconds of CPU that must
not hold the worker's event loop or its GIL, and a model that kills the process that loads it (a
forgery that `model_text.check`, run by the worker before this, did not catch) kills this one, and
is refused, not the worker.
Whether its features are the code's is the worker's check (`Scorer`)."""
from __future__ import annotations

import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np

from app.models.scorer import compiled

if __name__ == "__main__":
    model_file = Path(sys.argv[1])
    booster = lgb.Booster(model_file=str(model_file))
    row = np.zeros((1, booster.num_feature()))
    booster.predict(row, pred_contrib=True, num_threads=1)
    compiled(model_file).predict(row, n_jobs=1)
