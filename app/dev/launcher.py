"""The one way a worker (and the helper processes of `scoring run` and the benchmark) is started and
stopped: `scoring run`, the benchmark and the tests all use it.

A process is started in a session of its own (Ctrl-C in a terminal reaches the launcher, which
decides), its output appended to a log file, and stopped by its PID: SIGTERM to its process group,
SIGKILL after a timeout, also when the caller fails.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = "[^Worker]: Ready"  # what Faust logs once recovery is done and the agents run


def spawn(args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`python <args>` in a session of its own, output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen | None, timeout: float = 20, hurry=lambda: False) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout`, or at once when `hurry()` says so."""
    if proc is None or proc.poll() is not None:
        return
    signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    if proc.poll() is None:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


class LoggedProcess:
    """`python <args>` with its output in a log file that callers wait on."""

    def __init__(self, args: list[str], env: dict, log_path: Path, cwd: Path | None = None) -> None:
        self.args, self.env, self.log_path, self.cwd = args, env, Path(log_path), cwd
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "LoggedProcess":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = spawn(self.args, self.log_path, self.env, self.cwd)
        return self

    def log(self) -> str:
        """What this process wrote so far (the log file is shared by its restarts)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def _check(self, needle: str) -> bool:
        if needle in self.log():
            return True
        if self.proc.poll() is not None:
            raise WorkerExited(f"{' '.join(self.args)} exited ({self.proc.returncode}); see {self.log_path}:\n{self.log()[-3000:]}")
        return False

    def wait_for(self, needle: str = READY, timeout: float = 60, stopping=lambda: False) -> bool:
        """True once `needle` is in the log; False if `stopping()` first; raises if the process exits
        or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stopping():
                return False
            if self._check(needle):
                return True
            time.sleep(0.1)
        raise TimeoutError(f"{needle!r} not seen in {timeout:.0f}s; see {self.log_path}:\n{self.log()[-3000:]}")

    async def wait_for_async(self, needle: str = READY, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._check(needle):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{needle!r} not seen in {timeout:.0f}s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        if self.alive():
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20, hurry=lambda: False) -> None:
        stop(self.proc, timeout, hurry)


class WorkerProcess(LoggedProcess):
    """One `faust -A app worker -l info` process (`args`: another command line for python)."""

    def __init__(self, env: dict, log_path: Path, cwd: Path | None = None, app: str = "app",
                 args: list[str] | None = None) -> None:
        super().__init__(args or ["-m", "faust", "-A", app, "worker", "-l", "info"], env, log_path, cwd)


class WorkerExited(RuntimeError):
    pass
