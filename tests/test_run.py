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

from app.dev.broker import EmbeddedBroker, free_port
from tests.harness import MODEL_DIR, ROOT, pid_alive, read_topic


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
        assert not left_behind(pids), "a process outlived `run`"
    finally:
        for p in [proc.pid, *pids]:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_run(tmp_path, *args: str, env: dict | None = None, name: str = "run"):
    """`scoring run ARGS` in its own session, as a terminal runs it; returns (proc, log path, port, pids of
    what it started) once it printed the dashboard URL."""
    port = free_port()
    full = {**os.environ, "WEB_PORT": str(port), "DATA_DIR": str(tmp_path / f"data-{name}"),
            "MODEL_DIR": str(MODEL_DIR), **(env or {})}
    if not (env or {}).get("BROKER_URL"):
        full.pop("BROKER_URL", None)
    out = tmp_path / f"{name}.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "run", *args], cwd=ROOT, env=full,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while "dashboard:" not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.3)
    text = out.read_text()
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)|worker pid (\d+)", text) for p in p if p]
    found = re.search(r"generators pid ([\d ]+)", text)
    pids += [int(p) for p in found.group(1).split()] if found else []
    return proc, out, port, pids


def left_behind(pids: list[int], timeout: float = 10) -> list[int]:
    """The processes of `pids` still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def kill_all(*pids: int) -> None:
    for p in pids:
        try:
            os.killpg(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def scored(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        stats = orjson.loads(r.read())
    return {name: p["scored"] for name, p in stats["pipelines"].items()}


def test_a_second_ctrl_c_while_stopping_leaves_nothing_behind(tmp_path):
    proc, out, port, pids = start_run(tmp_path, "--rate", "40")
    try:
        assert len(pids) == 4  # broker, worker, two generators
        deadline = time.monotonic() + 60
        while not scored(port).get("cart") and time.monotonic() < deadline:
            time.sleep(0.5)  # the worker is busy: its clean stop takes a while
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C ...
        time.sleep(0.3)  # ... the clean-up is under way (the worker takes seconds to stop) ...
        os.killpg(proc.pid, signal.SIGINT)  # ... and Ctrl-C again
        proc.wait(30)
        assert not left_behind(pids), f"a process outlived `run`:\n{out.read_text()}"
        assert "second interrupt: killing everything now" in out.read_text()
    finally:
        kill_all(proc.pid, *pids)


def test_against_an_external_broker_no_generator_starts_unless_asked(tmp_path):
    external = EmbeddedBroker(log_path=tmp_path / "external.log").start()  # stands in for a team's cluster
    runs: list[int] = []
    try:
        env = {"BROKER_URL": external.url}
        proc, out, port, pids = start_run(tmp_path, env=env, name="plain")
        runs += [proc.pid, *pids]
        text = out.read_text()
        assert len(pids) == 1 and "embedded broker" not in text and "generators pid" not in text  # the worker
        assert "no generator: BROKER_URL is set" in text
        time.sleep(3)
        assert read_topic(external, "cart_events", timeout=3) == []
        assert read_topic(external, "transactions", timeout=3) == []
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(40) == 0
        assert not pid_alive(pids[0]) and external.proc.poll() is None  # its broker is not `run`'s to stop

        proc, out, port, pids = start_run(tmp_path, "--generate", "--rate", "40", env=env, name="generate")
        runs += [proc.pid, *pids]
        assert len(pids) == 3  # worker and two generators
        deadline = time.monotonic() + 60
        got = {}
        while not (got.get("cart") and got.get("fraud")) and time.monotonic() < deadline:
            time.sleep(1)
            got = scored(port)
        assert got["cart"] > 0 and got["fraud"] > 0, got
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(40) == 0
        assert not left_behind(pids), "a process outlived `run`"
    finally:
        kill_all(*runs)
        external.stop()


def test_no_generate_with_the_embedded_broker(tmp_path):
    proc, out, port, pids = start_run(tmp_path, "--no-generate")
    try:
        assert len(pids) == 2 and "no generator (--no-generate)" in out.read_text()  # broker and worker
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(40) == 0
        assert not left_behind(pids), "a process outlived `run`"
    finally:
        kill_all(proc.pid, *pids)
