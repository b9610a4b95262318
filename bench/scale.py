"""How cost grows with the number of users (issue 18): 10k, 100k, 1M users, side by side in one run.

  python -m bench.run --scale [--scale-users 10000,100000,1000000] [--scale-events 200000] [--scale-rounds 3]
  (make bench-scale)

Rounds of all sizes, interleaved; per size and round, on a broker of its own:
  1. every user has a state: the `user_sessions` changelog written as the worker writes it
     (bench/recovery.py), then a worker started with an empty DATA_DIR: recovery (the bulk restore,
     app/kafka/restore.py) in keys/s and the time from start to /ready;
  2. throughput: N cart events pre-produced, users picked Zipf-like (user k about k**-1 as often as
     user 1, as real shops see them), drained by the worker: events/s from first to last output,
     and the CPU time of worker and broker per event;
  3. latency at a fixed offered rate, the same Zipf population: p50 / p99 / p99.9;
  4. memory (VmHWM of the worker), bytes per user in RocksDB (the table's files on disk after a
     flush) and in the changelog (key + value of the records written).
Results: per size the median of each number over the rounds (every round kept), the largest size
against the smallest as ratios; a markdown table on stdout, bench/results/scale-latest.json and
bench/results/scale.svg (throughput, p99, RSS and recovery against users, on a log axis). A run with
--worker-env or other sizes writes bench/results/scale-<time>.json instead.
"""
from __future__ import annotations

import asyncio
import re
import statistics
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
    cpu_seconds,
    create_topics,
    drain,
    git_describe,
    latency_stats,
    latency_step,
    proc_status,
    produce_all,
    say,
    simulated,
    thread_cpu_seconds,
)
from bench.recovery import CHANGELOG, write_changelog

ZIPF = 1.0
DEFAULT_USERS = "10000,100000,1000000"
DEFAULT_EVENTS = 200_000
RATE = 2000


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def one(users: int, events: int, duration: float, worker_env: dict) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{users}-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker = None
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores", CHANGELOG])
        changelog_bytes = await write_changelog(broker.bootstrap, users, applied=False)
        say(f"  {users:,} user states in the changelog ({changelog_bytes / 1e6:.0f} MB)")
        t0 = time.monotonic()
        worker = Worker(broker.url, workdir, env={"PIPELINES": "cart", **worker_env}, name=f"worker-{users}").start()
        await worker.ready(300)
        ready_s = time.monotonic() - t0
        restored = re.search(r"restored (\d+) changelog records of \d+ partitions in ([\d.]+) s", worker.log())
        restore_s = float(restored.group(2)) if restored else None

        load = simulated("cart", events, users, 5, "scale-", zipf=ZIPF)
        distinct = len({e["user_id"] for e in load})
        reader = Reader(broker.bootstrap, "personalization_scores", None, current().fetch_wait_ms)
        await reader.start()
        try:
            # from before the produce: the worker starts on the first events while the rest arrive
            pids = {"worker": worker.pid, "broker": broker.pid}
            cpu0 = {who: cpu_seconds(pid) for who, pid in pids.items()}
            threads0 = thread_cpu_seconds(worker.pid)
            await produce_all(broker.bootstrap, "cart_events", load, progress=False)
            drained = await drain(reader, events, f"{users:,} users")
            cpu_us = {who: round((cpu_seconds(pid) - cpu0[who]) / events * 1e6, 1) for who, pid in pids.items()}
            # the event loop, aiokafka's consumer thread, RocksDB's compactions and flushes
            cpu_us["worker_threads"] = {name: round((t - threads0.get(name, 0.0)) / events * 1e6, 1)
                                        for name, t in thread_cpu_seconds(worker.pid).items()}
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
            "drain_cpu_us_per_event": cpu_us,
            "latency_rate": RATE, "latency": latency, "latency_all_received": step["all_received"],
            "vmhwm_mib": memory.get("VmHWM"), "rocksdb_bytes_per_user": round(rocksdb / users),
            "changelog_bytes_per_user": round(changelog_bytes / users),
        }
    finally:
        if worker:
            worker.stop()
        broker.stop()


def table(results: list[dict]) -> str:
    rows = ["| users | recovery, keys/s | start to ready, s | events/s (Zipf, drain) | CPU us/event, worker / broker "
            f"| p50 / p99 / p99.9 ms at {RATE}/s | worker VmHWM, MiB | RocksDB bytes/user | changelog bytes/user |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat, cpu = r["latency"], r["drain_cpu_us_per_event"]
        rows.append(f"| {r['users']:,} | {r['restore_keys_per_s']:,} | {r['start_to_ready_seconds']} | "
                    f"{r['events_per_s']:,} | {cpu['worker']} / {cpu['broker']} | "
                    f"{lat['p50_ms']} / {lat['p99_ms']} / {lat['p999_ms']} | "
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


def median_of(rounds: list[dict]) -> dict:
    """Per field the median over the rounds (nested dicts field by field); a flag must hold in all."""
    out = {}
    for k, v in rounds[0].items():
        values = [r.get(k) for r in rounds]  # a thread may be in one round's split and not another's
        if all(isinstance(x, dict) for x in values):
            out[k] = median_of(values)
        elif isinstance(v, bool):
            out[k] = all(values)
        elif isinstance(v, (int, float)) and None not in values:
            out[k] = statistics.median_low(values)  # a value one round had
        else:
            out[k] = v
    return out


def ratios(results: list[dict]) -> dict:
    """The largest size against the smallest: throughput, worker CPU per event and p99."""
    small, large = results[0], results[-1]
    return {"users": [small["users"], large["users"]],
            "events_per_s": round(large["events_per_s"] / small["events_per_s"], 3),
            "worker_cpu_per_event": round(large["drain_cpu_us_per_event"]["worker"]
                                          / small["drain_cpu_us_per_event"]["worker"], 3),
            "p99": round(large["latency"]["p99_ms"] / small["latency"]["p99_ms"], 3)}


def main(args) -> None:
    sizes = [int(x) for x in args.scale_users.split(",")]
    rounds: dict[int, list[dict]] = {users: [] for users in sizes}
    # rounds interleave the sizes, each on a broker of its own: the machine's drift over minutes
    # falls on every size alike
    for r in range(args.scale_rounds):
        for users in sizes:
            say(f"scale: {users:,} users, round {r + 1} of {args.scale_rounds}")
            rounds[users].append(asyncio.run(one(users, args.scale_events, args.duration, args.worker_env)))
            say(f"  {rounds[users][-1]}")
    results = [{**median_of(rounds[users]), "rounds": rounds[users]} for users in sizes]
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a run with worker settings or other sizes is kept beside the default one, not over it
    default = not args.worker_env and args.scale_users == DEFAULT_USERS and args.scale_events == DEFAULT_EVENTS
    name = "scale-latest" if default else f"scale-{time.strftime('%Y%m%dT%H%M%S')}"
    (RESULTS / f"{name}.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_describe(), "command": " ".join(["python -m bench.run --scale", *args.argv]),
         "worker_env": args.worker_env, "rounds": args.scale_rounds, "ratios": ratios(results),
         "results": results}, option=orjson.OPT_INDENT_2))
    if default:
        (RESULTS / "scale.svg").write_text(svg(results))
    print(table(results))
    print(ratios(results))
    say(f"results in bench/results/{name}.json")
