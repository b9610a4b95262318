"""The ceiling: a bare aiokafka consume -> produce loop (no decode, no state, no model).

Run as its own process, like the worker:
  python -m bench.bare drain --src cart_events --dst bench_out --count N   (from the beginning, then exit)
  python -m bench.bare relay --src relay_in --dst relay_out                  (from the end, until SIGTERM)

Per fetched batch it sends every record and awaits the delivery futures before the next fetch, the
same "publish, await, then move on" shape as the worker's commit gate, with the worker's fetch wait
and producer linger (app.settings), so the only difference left is the pipeline's own work.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import current
from bench.common import PARTITIONS


async def loop(bootstrap: str, src: str, dst: str, count: int, from_beginning: bool) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=current().fetch_wait_ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=current().linger_ms,
                                max_batch_size=current().producer_max_batch_bytes, acks=1)
    await consumer.start()
    await producer.start()
    tps = [TopicPartition(src, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
    else:
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    done = 0
    first = None
    try:
        while not stop.is_set() and (count <= 0 or done < count):
            batch = await consumer.getmany(timeout_ms=100, max_records=current().batch_max)
            if not batch:
                continue
            if first is None:
                first = time.monotonic()
            futs = []
            for records in batch.values():
                for r in records:
                    futs.append(await producer.send(dst, r.value, key=r.key))
            await asyncio.gather(*futs)
            done += len(futs)
    finally:
        end = time.monotonic()
        await consumer.stop()
        await producer.stop()
    return {"events": done, "seconds": (end - first) if first else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["drain", "relay"])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, default=0)
    a = p.parse_args()
    res = asyncio.run(loop(a.bootstrap, a.src, a.dst, a.count if a.mode == "drain" else 0, a.mode == "drain"))
    print("RESULT " + orjson.dumps(res).decode(), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
