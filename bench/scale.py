"""How cost grows with the number of users (issue 18): 10k, 100k, 1M users, each in one run.

  python -m bench.run --scale [--scale-users 10000,100000,1000000] [--scale-events 200000]   (make bench-scale)

For each size, on a broker of its own:
  1. every user has a state: the `user_sessions` changelog written as the worker writes it
     (bench/recovery.py), then a worker started with an empty DATA_DIR: recovery (the bulk restore,
     app/kafka/restore.py) in keys/s and the time from start to /ready;
  2. throughput: N cart events pre-produced, users picked Zipf-like (user k about k**-1 as often as
     user 1, as real shops see them), drained by the worker: events/s from first to last output;
  3. latency at a fixed offered rate, the same Zipf population: p50 / p99 / p99.9;
  4. memory (VmHWM of the worker), bytes per user in RocksDB (the table's files on disk after a
     flush) and in the changelog (key + value of the records written).
Results: a markdown table on stdout, bench/results/scale-latest.json and bench/results/scale.svg
(throughput, p99, RSS and recovery against users, on a log axis).
"""
from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

import orjson

from app.dev.broker import EmbeddedBroker
from app.settings import current
from bench.common import (
    RESULTS,
    Reader,
    Worker,
    create_topics,
    drain,
    latency_stats,
    latency_step,
    proc_status,
    produce_all,
    say,
    simulated,
)
from bench.recovery import CHANGELOG, write_changelog

ZIPF = 1.0
RATE = 2000


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def one(users: int, events: int, duration: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{users}-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker = None
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores", CHANGELOG])
        changelog_bytes = await write_changelog(broker.bootstrap, users, applied=False)
        say(f"  {users:,} user states in the changelog ({changelog_bytes / 1e6:.0f} MB)")
        t0 = time.monotonic()
        worker = Worker(broker.url, workdir, env={"PIPELINES": "cart"}, name=f"worker-{users}").start()
        await worker.ready(300)
        ready_s = time.monotonic() - t0
        restored = re.search(r"restored (\d+) changelog records of \d+ partitions in ([\d.]+) s", worker.log())
        restore_s = float(restored.group(2)) if restored else None

        load = simulated("cart", events, users, 5, "scale-", zipf=ZIPF)
        distinct = len({e["user_id"] for e in load})
        reader = Reader(broker.bootstrap, "personalization_scores", None, current().fetch_wait_ms)
        await reader.start()
        try:
            await produce_all(broker.bootstrap, "cart_events", load, progress=False)
            drained = await drain(reader, events, f"{users:,} users")
        finally:
            await reader.stop()
        step, samples = await latency_step(broker.bootstrap, "cart_events", "personalization_scores", "event_ts",
                                           RATE, duration, workdir, f"scale-{users}", worker.pid, (users, ZIPF))
        latency = latency_stats(samples)
        memory = proc_status(worker.pid)
        worker.stop()  # a clean stop writes what is unwritten: the files hold every state
        rocksdb = disk_bytes(worker.data_dir)
        return {
            "users": users, "events": events, "distinct_users_in_events": distinct, "zipf": ZIPF,
            "restore_seconds": restore_s, "restore_keys_per_s": round(users / restore_s) if restore_s else None,
            "start_to_ready_seconds": round(ready_s, 2),
            "events_per_s": drained["events_per_s"], "drain_complete": drained["complete"],
            "latency_rate": RATE, "latency": latency, "latency_all_received": step["all_received"],
            "vmhwm_mib": memory.get("VmHWM"), "rocksdb_bytes_per_user": round(rocksdb / users),
            "changelog_bytes_per_user": round(changelog_bytes / users),
        }
    finally:
        if worker:
            worker.stop()
        broker.stop()


def table(results: list[dict]) -> str:
    rows = ["| users | recovery, keys/s | start to ready, s | events/s (Zipf, drain) | p50 / p99 / p99.9 ms at "
            f"{RATE}/s | worker VmHWM, MiB | RocksDB bytes/user | changelog bytes/user |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r["latency"]
        rows.append(f"| {r['users']:,} | {r['restore_keys_per_s']:,} | {r['start_to_ready_seconds']} | "
                    f"{r['events_per_s']:,} | {lat['p50_ms']} / {lat['p99_ms']} / {lat['p999_ms']} | "
                    f"{r['vmhwm_mib']} | {r['rocksdb_bytes_per_user']} | {r['changelog_bytes_per_user']} |")
    return "\n".join(rows)


def svg(results: list[dict]) -> str:
    """Four small line charts against users on a log axis: throughput, p99, memory, recovery time."""
    import math

    panels = [("events/s (drain)", [r["events_per_s"] for r in results]),
              ("p99 latency, ms", [r["latency"]["p99_ms"] for r in results]),
              ("worker VmHWM, MiB", [r["vmhwm_mib"] for r in results]),
              ("start to /ready, s", [r["start_to_ready_seconds"] for r in results])]
    users = [r["users"] for r in results]
    W, H, pad = 300, 170, 38
    lo, hi = math.log10(min(users)), math.log10(max(users)) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{2 * H}" font-family="sans-serif" '
           'font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for i, (title, values) in enumerate(panels):
        ox, oy = (i % 2) * W, (i // 2) * H
        top = max(v for v in values if v is not None) * 1.15 or 1
        def x(u):
            return ox + pad + (math.log10(u) - lo) / max(hi - lo, 1e-9) * (W - 2 * pad)

        def y(v):
            return oy + H - pad + 8 - (v / top) * (H - 2 * pad)
        out.append(f'<text x="{ox + pad}" y="{oy + 18}" font-weight="bold">{title}</text>')
        out.append(f'<line x1="{ox + pad}" y1="{oy + H - pad + 8}" x2="{ox + W - pad}" y2="{oy + H - pad + 8}" '
                   'stroke="#999"/>')
        points = " ".join(f"{x(u):.1f},{y(v):.1f}" for u, v in zip(users, values) if v is not None)
        out.append(f'<polyline points="{points}" fill="none" stroke="#2563eb" stroke-width="2"/>')
        for u, v in zip(users, values):
            if v is None:
                continue
            out.append(f'<circle cx="{x(u):.1f}" cy="{y(v):.1f}" r="3" fill="#2563eb"/>')
            out.append(f'<text x="{x(u):.1f}" y="{y(v) - 7:.1f}" text-anchor="middle">{v:,}</text>')
            out.append(f'<text x="{x(u):.1f}" y="{oy + H - pad + 22}" text-anchor="middle">{u:,} users</text>')
    out.append("</svg>")
    return "\n".join(out)


def main(args) -> None:
    sizes = [int(x) for x in args.scale_users.split(",")]
    results = []
    for users in sizes:
        say(f"scale: {users:,} users")
        results.append(asyncio.run(one(users, args.scale_events, args.duration)))
        say(f"  {results[-1]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale-latest.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python -m bench.run --scale", "results": results},
        option=orjson.OPT_INDENT_2))
    (RESULTS / "scale.svg").write_text(svg(results))
    print(table(results))
