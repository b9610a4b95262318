"""What standby replicas cost (issue 18): two workers scoring a burst, with and without standbys.

  python -m bench.run --standby [--standby-users 1000000] [--standby-events 200000] [--standby-rounds 2]
  (make bench-standby)

Per round, STANDBY_REPLICAS=0 and then 1, each on a broker of its own: every user's state in the
`user_sessions` changelog, two cart workers with empty DATA_DIRs (each restores its half, and with
standbys follows the other's), then N cart events (Zipf-like users) drained by the pair. Measured:
  - the pair's throughput, first to last output;
  - how long after both are ready the pair's CPU settles (the copies caught up with the restored
    state), and how long after the last output it settles again (caught up with the burst's writes);
  - the workers' CPU per event, from the produce until it settled again, less what the pair spends
    idle in as long (measured before the produce): scoring plus, with standbys, keeping the copies;
  - with standbys: how far the copies are behind at the end (`scoring_standby_lag_records`, summed
    over both workers) and how many changelog records they followed (the changelog's growth).
Results: bench/results/standby-latest.json and a markdown table on stdout.
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from app.dev.broker import EmbeddedBroker
from app.kafka.restore import stop_consumer
from app.settings import current
from bench.common import (
    RESULTS,
    Reader,
    Worker,
    cpu_seconds,
    create_topics,
    drain,
    git_describe,
    produce_all,
    say,
    simulated,
)
from bench.recovery import CHANGELOG, write_changelog
from bench.scale import ZIPF

IDLE_S = 5
SETTLED_CORES = 0.25  # the pair's CPU below this for 2 s: idle (their fetch loops alone take 0.07-0.12)


async def settled(pids: list[int], limit_s: float = 180) -> float:
    """Seconds until the processes' CPU stays below SETTLED_CORES for 2 s (counted to its start)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        before, start = sum(map(cpu_seconds, pids)), time.monotonic()
        await asyncio.sleep(2)
        if sum(map(cpu_seconds, pids)) - before < 2 * SETTLED_CORES:
            return round(start - t0, 1)
    return float("inf")


def standby_lag(worker: Worker) -> float | None:
    lags = [v for name, v in worker.metrics().items()
            if name.startswith("scoring_standby_lag_records{") and "user_sessions" in name]
    return sum(lags) if lags else None


async def changelog_end(bootstrap: str) -> int:
    """Records in the changelog, by the ends the broker reports (Tansu's lag by its last batch)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(CHANGELOG, p) for p in (consumer.partitions_for_topic(CHANGELOG) or ())]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await stop_consumer(consumer)


async def one(replicas: int, users: int, events: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-standby-{replicas}-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    workers: list[Worker] = []
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores", CHANGELOG])
        await write_changelog(broker.bootstrap, users, applied=False)
        env = {"PIPELINES": "cart", "STANDBY_REPLICAS": str(replicas)}
        workers = [Worker(broker.url, workdir, env=env, name=f"w{i}-{replicas}").start() for i in (1, 2)]
        for w in workers:
            await w.ready(300)
        pids = [w.pid for w in workers]
        warm_s = await settled(pids)  # the group settled and, with standbys, the copies caught up
        idle0 = sum(map(cpu_seconds, pids))
        await asyncio.sleep(IDLE_S)
        idle_per_s = (sum(map(cpu_seconds, pids)) - idle0) / IDLE_S
        end0 = await changelog_end(broker.bootstrap)

        load = simulated("cart", events, users, 7, "standby-", zipf=ZIPF)
        reader = Reader(broker.bootstrap, "personalization_scores", None, current().fetch_wait_ms)
        await reader.start()
        try:
            t0, cpu0, broker0 = time.monotonic(), sum(map(cpu_seconds, pids)), cpu_seconds(broker.pid)
            await produce_all(broker.bootstrap, "cart_events", load, progress=False)
            drained = await drain(reader, events, f"standby replicas {replicas}")
        finally:
            await reader.stop()
        after_s = await settled(pids)  # the copies catching up with the burst's state writes
        window = time.monotonic() - t0
        cpu = sum(map(cpu_seconds, pids)) - cpu0 - idle_per_s * window
        lags = [standby_lag(w) for w in workers] if replicas else []
        followed = await changelog_end(broker.bootstrap) - end0
        return {
            "standby_replicas": replicas, "users": users, "events": events,
            "events_per_s": drained["events_per_s"], "drain_complete": drained["complete"],
            "workers_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "broker_cpu_us_per_event": round((cpu_seconds(broker.pid) - broker0) / events * 1e6, 1),
            "idle_cpu_per_s": round(idle_per_s, 3),
            "ready_to_settled_s": warm_s, "last_output_to_settled_s": after_s,
            "changelog_records_written": followed,
            "standby_lag_records_at_end": None if not lags or None in lags else sum(lags),
        }
    finally:
        for w in workers:
            w.stop()
        broker.stop()


def table(by: dict[int, list[dict]]) -> str:
    rows = ["| standby replicas | ready -> settled, s | events/s (pair, drain) | last output -> settled, s "
            "| workers' CPU us/event (net of idle) | broker CPU us/event | changelog records written "
            "| copies behind at the end, records |", "|---|---|---|---|---|---|---|---|"]
    for replicas, rounds in by.items():
        med = lambda k: round(statistics.median(r[k] for r in rounds), 1)  # noqa: E731
        lag = [r["standby_lag_records_at_end"] for r in rounds]
        rows.append(f"| {replicas} | {med('ready_to_settled_s')} | {med('events_per_s'):,.0f} | "
                    f"{med('last_output_to_settled_s')} | {med('workers_cpu_us_per_event')} | "
                    f"{med('broker_cpu_us_per_event')} | {med('changelog_records_written'):,.0f} | "
                    f"{'-' if not replicas else lag} |")
    return "\n".join(rows)


def main(args) -> None:
    by: dict[int, list[dict]] = {0: [], 1: []}
    for r in range(args.standby_rounds):
        for replicas in by:  # interleaved: the machine's drift falls on both alike
            by[replicas].append(asyncio.run(one(replicas, args.standby_users, args.standby_events)))
            say(f"  round {r}: {by[replicas][-1]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "standby-latest.json"
    out.write_bytes(orjson.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_describe(),
                                  "command": "python -m bench.run " + " ".join(args.argv),
                                  "rounds": {str(k): v for k, v in by.items()}}, option=orjson.OPT_INDENT_2))
    print(table(by))
    say(f"results in {out}")
