"""Table recovery time (issue 7): a worker with an empty DATA_DIR rebuilding its state from the changelog.

  python -m bench.run --recovery [--recovery-users 10000,100000,1000000]   (make bench-recovery)

For each size: a fresh broker, the `user_sessions` changelog written directly in the table's format
(key = user id bytes, value = orjson of {"state": ..., "applied": {...}}, on the key's partition;
see app/kafka/store.py), then `faust -A app worker` started with an empty data dir. Reported: the
time spent reading the changelog (the bulk restore's own log line, app/kafka/restore.py, plus
Faust's recovery of whatever was left, from "Restoring state from changelog topics..." to "Done
reading from changelog topics"), the time from process start to
ready (/ready answers 200, i.e. recovery complete and partitions assigned), keys/s, and a check
that recovered keys are served (GET /state/cart/<user>).
"""
from __future__ import annotations

import asyncio
import re
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import orjson
from aiokafka.partitioner import murmur2

from app.dev.broker import EmbeddedBroker
from app.pipelines import configured
from bench.common import PARTITIONS, RESULTS, Worker, create_topics, say, send_all, simulated
from domain import session

CHANGELOG = "scoring-user_sessions-changelog"
_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


async def write_changelog(bootstrap: str, users: int, applied: bool = True) -> int:
    """One record per user, as the worker writes it after that user's first event (with `applied`,
    at offset <user number> of its partition: events of the input at lower offsets are replays)."""
    cart = configured()["cart"]
    events = simulated("cart", min(users, 50_000), users, 5, "r")
    size = 0

    def records():
        nonlocal size
        for i in range(users):
            user = f"u{i}"
            e = {**events[i % len(events)], "user_id": user}
            if e["type"] != "page_view":
                e.setdefault("product_id", "p1")
            key = user.encode()
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            value = orjson.dumps({"state": cart.apply(session.new_state(), e),
                                  "applied": {f"cart_events:{partition}": i} if applied else {}})
            size += len(value)
            yield key, value, partition

    await send_all(bootstrap, CHANGELOG, records())
    return size


def _log_time(log: str, needle: str) -> datetime | None:
    for line in log.splitlines():
        if needle in line:
            m = _TS.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return None


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def one(users: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker = None
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores"])
        await create_topics(broker.bootstrap, [CHANGELOG])
        size = await write_changelog(broker.bootstrap, users) if users else 0
        say(f"  {users} keys written to {CHANGELOG} ({size / 1e6:.1f} MB of values)")
        t0 = time.monotonic()
        worker = Worker(broker.url, workdir).start()
        ready_url = f"http://127.0.0.1:{worker.web_port}/ready"
        while _get(ready_url) != 200:
            if worker.proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"worker not ready; see {worker.log_path}")
            await asyncio.sleep(0.05)
        ready_s = time.monotonic() - t0
        log = worker.log()
        # the bulk restore (app/kafka/restore.py) logs its own time; Faust's recovery reads what is left
        bulk = re.search(r"restored (\d+) changelog records of \d+ partitions in ([\d.]+) s", log)
        start = _log_time(log, "Restoring state from changelog topics")
        done = _log_time(log, "Done reading from changelog topics")
        reading = (done - start).total_seconds() if start and done else 0.0
        reading = (float(bulk.group(2)) if bulk else 0.0) + reading or None
        probes = [f"u{i}" for i in (0, users // 2, users - 1)] if users else []
        served = [_get(f"http://127.0.0.1:{worker.web_port}/state/cart/{u}") for u in probes]
        return {"keys": users, "changelog_value_mb": round(size / 1e6, 1),
                "seconds_reading_changelog": reading,
                "keys_per_s": round(users / reading) if reading and users else None,
                "seconds_start_to_ready": round(ready_s, 2),
                "recovered_keys_served": all(s == 200 for s in served), "probe_status": served}
    finally:
        if worker:
            worker.stop()
        broker.stop()


def main(args) -> None:
    sizes = [int(x) for x in args.recovery_users.split(",")]
    results = []
    for n in [0, *sizes]:
        say(f"recovery with {n} keys")
        r = asyncio.run(one(n))
        say(f"  {r}")
        results.append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recovery-latest.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}, option=orjson.OPT_INDENT_2))
    print("| keys in changelog | values, MB | reading the changelog, s | keys/s | worker start to ready, s | keys served |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['keys']} | {r['changelog_value_mb']} | {r['seconds_reading_changelog']} | {r['keys_per_s']} | "
              f"{r['seconds_start_to_ready']} | {r['recovered_keys_served'] if r['keys'] else 'n/a'} |")
