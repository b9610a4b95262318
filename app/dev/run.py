"""`scoring run` (`make run`): the embedded broker (unless BROKER_URL is set), a worker, generators.

The worker and the generators are started by the launcher (app/dev/launcher.py), the broker by
app/dev/broker.py; every process is stopped by its PID whatever happens; a second Ctrl-C only turns
the waits for a clean stop into SIGKILL at once.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from app.dev.broker import EmbeddedBroker, port_open
from app.dev.launcher import LoggedProcess, WorkerExited, WorkerProcess, stop


class StopRequests:
    """SIGINT / SIGTERM while `run` runs: the first asks for a clean stop, a second one (people press
    Ctrl-C twice) for a quick one. The handler only counts, it never raises: a signal can neither
    interrupt a start before the new process's PID is kept nor cut the clean-up short (a
    KeyboardInterrupt raised there used to orphan the broker, the worker and the generators)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 2:
            print("\nsecond interrupt: killing everything now", flush=True)

    @property
    def stopping(self) -> bool:
        return self.count > 0

    @property
    def hurry(self) -> bool:
        return self.count > 1


def run(settings, rate: int, users: int, generate: bool | None) -> None:
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM should
    # clean up as Ctrl-C does.
    stops = StopRequests()
    signal.signal(signal.SIGINT, stops)
    signal.signal(signal.SIGTERM, stops)
    logs = Path(settings.data_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # With BROKER_URL set, the topics are a real cluster's: no synthetic events go there unless asked.
    external = bool(os.environ.get("BROKER_URL", "").strip())
    generate = (not external) if generate is None else generate
    broker = worker = None
    generators: list[LoggedProcess] = []
    env = dict(os.environ)
    hurry = lambda: stops.hurry  # noqa: E731
    try:
        if not external:
            broker = EmbeddedBroker(log_path=logs / "broker.log")
            broker.start()
            env["BROKER_URL"] = broker.url
            print(f"embedded broker: {broker.url} (pid {broker.pid})", flush=True)
        if stops.stopping:
            return
        if port_open(settings.web_port, settings.web_host):
            raise SystemExit(f"port {settings.web_port} is taken: set WEB_PORT")
        worker = WorkerProcess(env, logs / "worker.log").start()
        print(f"worker pid {worker.pid}, log {worker.log_path}; waiting until ready...", flush=True)
        try:
            if not worker.wait_for(timeout=60, stopping=lambda: stops.stopping):
                return
        except (WorkerExited, TimeoutError) as exc:
            raise SystemExit(str(exc).splitlines()[0]) from None
        if generate:
            for pipeline, pipeline_rate in (("cart", rate), ("fraud", max(1, rate // 5))):
                generators.append(LoggedProcess(
                    ["-m", "app.cli", "generate", "--pipeline", pipeline, "--rate", str(pipeline_rate),
                     "--users", str(users), "--broker", env["BROKER_URL"]], env, logs / f"generator-{pipeline}.log"
                ).start())
            print(f"generators pid {' '.join(str(g.pid) for g in generators)}, logs {logs}/generator-*.log", flush=True)
        elif external:
            print("no generator: BROKER_URL is set, so nothing synthetic is written to that cluster "
                  "(`scoring run --generate`, or `make run ARGS=--generate`, starts them)", flush=True)
        else:
            print("no generator (--no-generate)", flush=True)
        url = f"http://{settings.web_host}:{settings.web_port}"
        print(f"\n  dashboard: {url}/dashboard\n  metrics:   {url}/metrics\n  Ctrl-C stops everything\n",
              flush=True)
        while worker.alive() and not stops.stopping:
            time.sleep(0.2)
        if not stops.stopping:
            raise SystemExit(f"worker exited (code {worker.proc.returncode}); see {worker.log_path}")
    finally:
        if stops.stopping:
            print("\nstopping...", flush=True)
        for generator in generators:
            generator.stop(10, hurry)
        if worker is not None:
            worker.stop(20, hurry)
        if broker is not None:
            stop(broker.proc, 5, hurry)
            broker.stop()
