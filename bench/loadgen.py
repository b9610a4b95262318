"""Fixed-rate load generator (its own process): cart events stamped with `ts` = wall clock at send.

  python -m bench.loadgen --bootstrap H:P --topic cart_events --rate 2000 --duration 10 --prefix r2000-

Events are simulated up front (cart_sim), so the loop only stamps and sends. Every tick (2 ms by
default) the generator sends what is due by then, one record batch per partition, keyed by user and
partitioned as Kafka's default partitioner would (the same as `producer.send`, at a tenth of the
cost per record, so one process can offer well over 100k events/s). Keep the tick short for latency
measurements; a longer tick means fewer, larger batches, which the embedded broker stores as fewer
objects (its fetch cost grows with their number). It prints one JSON line with what it really sent.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from bench.common import simulated

POOL = 50_000


async def run(bootstrap: str, topic: str, rate: float, duration: float, prefix: str, users: int,
              seed: int, tick_s: float = 0.002, zipf: float = 0.0) -> dict:
    n = int(rate * duration)
    # A pool of simulated events, serialised once without id and ts; each send prepends a fresh
    # id and the send time, so stamping costs about a microsecond even at high rates.
    pool = simulated("cart", min(n, POOL), users, seed, "", zipf=zipf)
    keys = [e["user_id"].encode() for e in pool]
    rests = [orjson.dumps({k: v for k, v in e.items() if k not in ("event_id", "ts")})[1:] for e in pool]
    head = b'{"event_id":"' + prefix.encode() + b'%d","ts":%d,'
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=1024 * 1024)
    await producer.start()
    partitions = sorted(await producer.partitions_for(topic))
    partition_of = [partitions[(murmur2(k) & 0x7FFFFFFF) % len(partitions)] for k in keys]
    print("READY", flush=True)
    sent = 0
    futs: list[asyncio.Future] = []
    start = time.monotonic()
    try:
        while sent < n:
            due = min(n, int((time.monotonic() - start) * rate) + 1)
            if due > sent:
                now_ms = int(time.time() * 1000)
                batches: dict[int, object] = {}
                while sent < due:
                    j = sent % len(pool)
                    p = partition_of[j]
                    batch = batches.get(p)
                    if batch is None:
                        batch = batches[p] = producer.create_batch()
                    value = head % (sent, now_ms) + rests[j]
                    if batch.append(key=keys[j], value=value, timestamp=None) is None:  # full: send it
                        futs.append(await producer.send_batch(batch, topic, partition=p))
                        batch = batches[p] = producer.create_batch()
                        batch.append(key=keys[j], value=value, timestamp=None)
                    sent += 1
                for p, batch in batches.items():
                    futs.append(await producer.send_batch(batch, topic, partition=p))
                pending = []
                for f in futs:
                    if f.done():
                        f.result()  # raises if the batch failed
                    else:
                        pending.append(f)
                futs = pending
            await asyncio.sleep(tick_s)
        elapsed = time.monotonic() - start
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return {"sent": sent, "seconds": round(elapsed, 3), "rate": round(sent / elapsed, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tick-ms", type=float, default=2.0, help="how often due events are sent")
    p.add_argument("--zipf", type=float, default=0.0, help="users picked Zipf-like (user k about k**-s as often)")
    a = p.parse_args()
    res = asyncio.run(run(a.bootstrap, a.topic, a.rate, a.duration, a.prefix, a.users, a.seed, a.tick_ms / 1000, a.zipf))
    print("RESULT " + orjson.dumps(res).decode(), flush=True)


if __name__ == "__main__":
    main()
