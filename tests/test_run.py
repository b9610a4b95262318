"""`scoring run` (what `make run` starts): broker, worker, generators, web view; Ctrl-C stops all."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import orjson

from app.broker import free_port
from tests.harness import MODEL_DIR, ROOT, pid_alive


def test_run_brings_everything_up_and_ctrl_c_stops_it(tmp_path):
    port = free_port()
    env = {**os.environ, "WEB_PORT": str(port), "DATA_DIR": str(tmp_path / "data"), "MODEL_DIR": str(MODEL_DIR)}
    env.pop("BROKER_URL", None)
    out = tmp_path / "run.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--rate", "40"], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while "dashboard:" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.3)
        text = out.read_text()
        assert f"http://127.0.0.1:{port}/dashboard" in text
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)|worker pid (\d+)", text) for p in p if p]
        pids += [int(p) for p in re.search(r"generators pid ([\d ]+)", text).group(1).split()]
        assert len(pids) == 4  # broker, worker, two generators

        scored = {}
        while time.monotonic() < deadline and not (scored.get("cart") and scored.get("fraud")):
            time.sleep(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                stats = orjson.loads(r.read())
            scored = {name: p["scored"] for name, p in stats["pipelines"].items()}
        assert scored["cart"] > 0 and scored["fraud"] > 0, scored

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(40) == 0
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if pid_alive(p)], "a process outlived `run`"
    finally:
        for p in [proc.pid, *pids]:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
