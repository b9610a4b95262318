"""Failover with standbys (issue 18): how long a SIGKILLed owner's partitions go unscored.

  python -m bench.run --failover [--failover-rounds 3]   (make bench-failover)

Two workers with STANDBY_REPLICAS=1 (each keeps a copy of the other's table partitions), cart events
at a steady 500/s, 100k users with state. The owner of some partitions is SIGKILLed; from the
survivor's log and the outputs, in seconds after the kill:
  detection   the survivor learns the group is rebalancing (the broker noticed the dead member:
              at most BROKER_SESSION_TIMEOUT)
  rebalance   the survivor is assigned the dead worker's partitions
  catch-up    its standby copies caught up and it is ready (recovery complete)
  first score the first output of one of those partitions scored after the kill (by the survivor:
              the dead worker's last outputs may still arrive after it)
The target: the first score within the session timeout plus 2 s.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.dev.broker import EmbeddedBroker
from app.kafka.partitioner import key_hash
from app.settings import current
from bench.common import PARTITIONS, RESULTS, Worker, create_topics, helper, say
from bench.recovery import CHANGELOG, write_changelog

USERS = 100_000
RATE = 500
_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _after(log: str, since: float, *needles: str) -> float | None:
    """Wall time of the first log line after `since` (epoch s) containing one of `needles`."""
    for line in log.splitlines():
        m = _TS.match(line)
        if m and any(n in line for n in needles):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t > since:
                return t
    return None


def _owned(worker: Worker) -> set[int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/tables/user_sessions", timeout=10) as r:
        return set(orjson.loads(r.read())["active_partitions"])


async def _outputs(bootstrap: str, stop: asyncio.Event, seen: list) -> None:
    """(when it was scored, by the worker's clock, s; the partition its key belongs to) of every output."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        tps = [TopicPartition("personalization_scores", p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                seen += [(orjson.loads(r.value)["scored_at"] / 1000, key_hash(r.key) % PARTITIONS) for r in records]
    finally:
        await consumer.stop()


async def one(round_: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    workers, gen, reader = [], None, None
    stop, seen = asyncio.Event(), []
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores", CHANGELOG])
        await write_changelog(broker.bootstrap, USERS, applied=False)
        env = {"PIPELINES": "cart", "STANDBY_REPLICAS": "1"}
        for name in ("w1", "w2"):
            workers.append(Worker(broker.url, workdir, env=env, name=f"{name}-{round_}").start())
        for w in workers:
            await w.ready(180)
        reader = asyncio.create_task(_outputs(broker.bootstrap, stop, seen))
        gen = helper(["-m", "bench.loadgen", "--bootstrap", broker.bootstrap, "--topic", "cart_events", "--rate",
                      str(RATE), "--duration", "60", "--prefix", f"f{round_}-", "--users", str(USERS)],
                     workdir / "loadgen.log")
        await gen.wait_for_async("READY")
        await asyncio.sleep(15)  # both workers scoring, standbys following
        victim, survivor = workers
        moved = _owned(victim)
        killed_at = time.time()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        say(f"  round {round_}: SIGKILL of the owner of partitions {sorted(moved)}")
        deadline = time.monotonic() + 60
        first = None
        while time.monotonic() < deadline and first is None:
            await asyncio.sleep(0.2)
            first = next((t for t, p in seen if t > killed_at and p in moved), None)
        await asyncio.sleep(2)
        log = survivor.log()
        since = lambda t: None if t is None else round(t - killed_at, 2)  # noqa: E731
        return {
            "moved_partitions": sorted(moved),
            "detection_s": since(_after(log, killed_at, "rebalancing", "(Re-)joining group")),
            "rebalance_s": since(_after(log, killed_at, "Setting newly assigned partitions")),
            "catch_up_s": since(_after(log, killed_at, "Worker ready")),
            "first_score_s": since(first),
            "session_timeout_s": current().session_timeout_s,
        }
    finally:
        stop.set()
        if reader is not None:
            await reader
        if gen is not None:
            gen.stop()
        for w in workers:
            w.stop()
        broker.stop()


def main(args) -> None:
    rounds = []
    for i in range(args.failover_rounds):
        rounds.append(asyncio.run(one(i)))
        say(f"  {rounds[-1]}")
    target = current().session_timeout_s + 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "failover-latest.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python -m bench.run --failover",
         "target_first_score_s": target, "rounds": rounds}, option=orjson.OPT_INDENT_2))
    print("| round | partitions moved | detection, s | rebalance, s | catch-up (ready), s | first score, s | "
          f"within {target:g} s |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        ok = r["first_score_s"] is not None and r["first_score_s"] <= target
        print(f"| {i} | {r['moved_partitions']} | {r['detection_s']} | {r['rebalance_s']} | {r['catch_up_s']} | "
              f"{r['first_score_s']} | {'yes' if ok else 'no'} |")
