"""Backpressure: offered load at ~3x the worker's capacity for a minute, then back to a low rate.

  python -m bench.run --backpressure [--capacity N] [--overload-seconds 60]   (make bench-backpressure)

Checks what the issue asks: worker memory stays bounded while input piles up (the intake holds up
the fetcher while it is full: 2 x BATCH_MAX records or INTAKE_MAX_BYTES, app/kafka/intake.py),
nothing is dropped (every event sent is scored, by id), and the latency at a low rate after the
backlog has drained is back to what it was before the overload.
Capacity defaults to the last `make bench` result (bench/results/latest.json). The load generator
shares the two cores with the broker and the worker, so the rate it reaches is reported as is.
"""
from __future__ import annotations

import asyncio
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
    helper,
    latency_stats,
    proc_status,
    run_proc_to_result,
    say,
)

LOW_RATE = 500


async def low_rate(bootstrap: str, reader: Reader, workdir: Path, prefix: str, seconds: float,
                   topic: str = "cart_events") -> dict:
    reader.reset()
    gen = await run_proc_to_result(["-m", "bench.loadgen", "--bootstrap", bootstrap, "--topic", topic,
                                    "--rate", str(LOW_RATE), "--duration", str(seconds), "--prefix", prefix],
                                   workdir / "loadgen.log")
    ok = await reader.wait_count(gen["sent"], 30)
    return {**latency_stats(reader.samples), "sent": gen["sent"], "received": reader.count, "all_received": ok}


async def run(args) -> dict:
    capacity = args.capacity
    if not capacity:
        latest = RESULTS / "latest.json"
        capacity = orjson.loads(latest.read_bytes())["worker_throughput"]["events_per_s"] if latest.exists() else 5000
    target = 3 * capacity
    workdir = Path(tempfile.mkdtemp(prefix="bench-bp-"))
    say(f"work dir {workdir}; capacity {capacity}/s, offering {target}/s for {args.overload_seconds} s")
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker = None
    reader = Reader(broker.bootstrap, "personalization_scores", "event_ts", current().fetch_wait_ms,
                    id_field="event_id")
    out: dict = {"capacity_events_per_s": capacity, "offered_target_events_per_s": target}
    try:
        await create_topics(broker.bootstrap, ["cart_events", "personalization_scores"])
        await reader.start()
        worker = Worker(broker.url, workdir).start()
        await worker.ready()
        await low_rate(broker.bootstrap, reader, workdir, "warm-", 3)
        say(f"before: {LOW_RATE}/s for 10 s")
        out["before"] = await low_rate(broker.bootstrap, reader, workdir, "before-", 10)
        rss_before = proc_status(worker.pid).get("VmRSS")

        say("overload")
        reader.reset()
        log = workdir / "loadgen-overload.log"
        # 20-ms ticks: the same rate in a tenth of the record batches, which the embedded broker
        # stores as objects and lists on every fetch; a backlog of millions stays drainable
        gen = helper(["-m", "bench.loadgen", "--bootstrap", broker.bootstrap, "--topic", "cart_events", "--rate",
                      str(target), "--duration", str(args.overload_seconds), "--prefix", "over-",
                      "--tick-ms", "20"], log)
        await gen.wait_for_async("READY")
        t0 = time.monotonic()
        samples = []  # (seconds, worker RSS MiB, outputs so far)
        while gen.alive():
            samples.append((round(time.monotonic() - t0, 1), proc_status(worker.pid).get("VmRSS"), reader.count))
            await asyncio.sleep(1)
        gen.stop()
        result = orjson.loads([ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")][-1][7:])
        t_end = time.monotonic() - t0
        received_at_end = reader.count
        say(f"  sent {result['sent']} at {result['rate']}/s; {received_at_end} scored by then; draining")
        last_n, last_progress = reader.count, time.monotonic()
        while reader.count < result["sent"]:
            samples.append((round(time.monotonic() - t0, 1), proc_status(worker.pid).get("VmRSS"), reader.count))
            await asyncio.sleep(1)
            if reader.count != last_n:
                last_n, last_progress = reader.count, time.monotonic()
            elif time.monotonic() - last_progress > 60:
                break  # no progress for a minute: report what arrived
        drain_s = time.monotonic() - t0 - t_end
        ids = set(reader.ids)
        out["overload"] = {
            "seconds": result["seconds"], "sent": result["sent"], "offered_events_per_s": result["rate"],
            "offered_over_capacity": round(result["rate"] / capacity, 2),
            "scored_during_overload_per_s": round(received_at_end / t_end),
            "backlog_at_end": result["sent"] - received_at_end,
            "drain_seconds": round(drain_s, 1),
            "distinct_scored": len(ids), "all_scored": len(ids) == result["sent"],
            "missing": result["sent"] - len({i for i in ids if i.startswith("over-")}),
            "duplicates": len(reader.ids) - len(ids),
            "rss_mib_before": rss_before,
            "rss_mib_max": max(r for _, r, _ in samples if r),
            "rss_mib_end": proc_status(worker.pid).get("VmRSS"),
            "rss_mib_samples": [[t, r] for t, r, _ in samples[:: max(1, len(samples) // 40)]],
        }
        say(f"  all scored: {out['overload']['all_scored']}; RSS {rss_before} -> max "
            f"{out['overload']['rss_mib_max']} MiB; drained in {drain_s:.0f} s")
        say(f"after: {LOW_RATE}/s for 10 s")
        out["after"] = await low_rate(broker.bootstrap, reader, workdir, "after-", 10)
        out["worker_vmhwm_mib"] = proc_status(worker.pid).get("VmHWM")
        # Control: the bare relay in the worker's place (same broker, same topics, now full), to
        # tell the broker's slowdown from the worker's: Tansu keeps every record in memory.
        worker.stop()
        say(f"control: bare relay cart_events -> personalization_scores at {LOW_RATE}/s on the same broker")
        relay = helper(["-m", "bench.bare", "relay", "--bootstrap", broker.bootstrap, "--src", "cart_events", "--dst",
                        "personalization_scores"], workdir / "relay.log")
        try:
            await relay.wait_for_async("READY")
            control = Reader(broker.bootstrap, "personalization_scores", "ts", current().fetch_wait_ms)
            await control.start()
            try:
                out["after_bare_relay"] = await low_rate(broker.bootstrap, control, workdir, "relay-", 10)
            finally:
                await control.stop()
        finally:
            relay.stop()
    finally:
        await reader.stop()
        if worker:
            worker.stop()
        broker.stop()
    return out


def table(r: dict) -> str:
    o, b, a = r["overload"], r["before"], r["after"]
    return "\n".join([
        "| backpressure | value |",
        "|---|---|",
        f"| capacity (last bench), events/s | {r['capacity_events_per_s']} |",
        f"| offered for {o['seconds']} s, events/s (x capacity) | {o['offered_events_per_s']} ({o['offered_over_capacity']}x) |",
        f"| scored during the overload, events/s | {o['scored_during_overload_per_s']} |",
        f"| backlog when the load dropped / drained in | {o['backlog_at_end']} events / {o['drain_seconds']} s |",
        f"| every event scored (sent / distinct scored / duplicates) | {o['all_scored']} ({o['sent']} / {o['distinct_scored']} / {o['duplicates']}) |",
        f"| worker RSS before / max / after, MiB | {o['rss_mib_before']} / {o['rss_mib_max']} / {o['rss_mib_end']} |",
        f"| latency at {LOW_RATE}/s before: p50 / p99 ms | {b['p50_ms']} / {b['p99_ms']} |",
        f"| latency at {LOW_RATE}/s after the drain: p50 / p99 ms | {a['p50_ms']} / {a['p99_ms']} |",
        f"| control: bare relay at {LOW_RATE}/s on the same broker after: p50 / p99 ms | "
        f"{r['after_bare_relay']['p50_ms']} / {r['after_bare_relay']['p99_ms']} |",
    ])


def main(args) -> None:
    result = asyncio.run(run(args))
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backpressure-latest.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(table(result))
