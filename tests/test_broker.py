"""The embedded broker: starts on a free port, survives a stale one, stops cleanly by PID."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from aiokafka import AIOKafkaProducer

from app.dev.broker import EmbeddedBroker, port_open
from tests.harness import ROOT, pid_alive


async def _roundtrip(bootstrap: str) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        await (await p.send("ping", b"x"))
    finally:
        await p.stop()


def test_start_answers_kafka_and_stop_frees_pid_and_port(tmp_path):
    b = EmbeddedBroker(log_path=tmp_path / "b.log").start()
    pid, port = b.pid, b.port
    assert b.url == f"kafka://127.0.0.1:{port}"
    asyncio.run(_roundtrip(b.bootstrap))
    b.stop()
    assert not pid_alive(pid)
    assert not port_open(port)


def test_port_held_by_another_broker_does_not_fail_the_next_start(tmp_path):
    stale = EmbeddedBroker(log_path=tmp_path / "a.log").start()
    try:
        fresh = EmbeddedBroker(port=stale.port, log_path=tmp_path / "b.log").start()
        try:
            assert fresh.port != stale.port
            asyncio.run(_roundtrip(fresh.bootstrap))
        finally:
            fresh.stop()
    finally:
        stale.stop()


def test_restart_on_same_port_after_stop(tmp_path):
    b = EmbeddedBroker(log_path=tmp_path / "a.log").start()
    port = b.port
    b.stop()
    again = EmbeddedBroker(port=port, log_path=tmp_path / "b.log").start()
    try:
        asyncio.run(_roundtrip(again.bootstrap))
    finally:
        again.stop()


def test_cli_broker_prints_url_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "broker"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("BROKER_URL=kafka://127.0.0.1:")
        port = int(line.split()[0].rsplit(":", 1)[1])
        assert port_open(port)
        proc.terminate()
        assert proc.wait(10) == 0
        deadline = time.monotonic() + 5
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not port_open(port), "the broker outlived the CLI"
    finally:
        proc.terminate()  # the CLI stops its broker on SIGTERM
        proc.wait(10)
