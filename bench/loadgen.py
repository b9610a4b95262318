"""Fixed-rate load generator (its own process): cart events stamped with `ts` = wall clock at send.

  python -m bench.loadgen --bootstrap H:P --topic cart_events --rate 2000 --duration 10 --prefix r2000-

Events are simulated up front (cart_sim), so the loop only stamps, serialises and sends. Every
TICK the generator sends what is due by then; it prints one JSON line with what it really sent.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiokafka import AIOKafkaProducer

from bench.common import cart_events

TICK_S = 0.002
POOL = 50_000


async def run(bootstrap: str, topic: str, rate: float, duration: float, prefix: str, users: int,
              seed: int) -> dict:
    n = int(rate * duration)
    # A pool of simulated events, serialised once without id and ts; each send prepends a fresh
    # id and the send time, so stamping costs about a microsecond even at high rates.
    pool = cart_events(min(n, POOL), users, seed, "")
    keys = [e["user_id"].encode() for e in pool]
    rests = [orjson.dumps({k: v for k, v in e.items() if k not in ("event_id", "ts")})[1:] for e in pool]
    head = b'{"event_id":"' + prefix.encode() + b'%d","ts":%d,'
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1,
                                max_batch_size=256 * 1024)
    await producer.start()
    print("READY", flush=True)
    sent = 0
    futs = []
    start = time.monotonic()
    try:
        while sent < n:
            due = min(n, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                j = sent % len(pool)
                value = head % (sent, int(time.time() * 1000)) + rests[j]
                futs.append(await producer.send(topic, value, key=keys[j]))
                sent += 1
            if len(futs) > 5000:
                await asyncio.gather(*futs)
                futs = []
            await asyncio.sleep(TICK_S)
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
    a = p.parse_args()
    res = asyncio.run(run(a.bootstrap, a.topic, a.rate, a.duration, a.prefix, a.users, a.seed))
    print("RESULT " + orjson.dumps(res).decode(), flush=True)


if __name__ == "__main__":
    main()
