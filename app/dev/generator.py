"""`scoring generate`: realistic events from the simulators, at a rate, into a pipeline's input topic."""
from __future__ import annotations

import asyncio
import time

import orjson

from app import security
from app.settings import bootstrap_servers


async def produce_at_rate(broker_url: str, topic: str, events, rate: float, duration: float,
                          key_field: str | None) -> int:
    from aiokafka import AIOKafkaProducer

    bootstrap = bootstrap_servers(broker_url)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **security.client_kwargs(bootstrap))
    await producer.start()
    sent = 0
    start = time.monotonic()
    last_report = start
    try:
        while duration <= 0 or time.monotonic() - start < duration:
            due = int((time.monotonic() - start) * rate) + 1
            while sent < due:
                e = next(events)
                key = e[key_field].encode() if key_field else None
                await producer.send(topic, orjson.dumps(e), key=key)
                sent += 1
            now = time.monotonic()
            if now - last_report >= 5:
                print(f"generator: {sent} events sent to {topic} ({sent / (now - start):.0f}/s)", flush=True)
                last_report = now
            await asyncio.sleep(0.01)
    finally:
        await producer.stop()
    return sent


def generate(pipeline, users: int, seed: int, rate: float, duration: float, unkeyed: bool, broker_url: str) -> int:
    """Live events of `pipeline` (app.pipelines.Pipeline), stamped with the wall clock: they stand
    for events happening now."""
    if pipeline.name == "fraud":
        from training import fraud_sim as sim
    else:
        from training import cart_sim as sim
    events = sim.live(users, seed, lambda: int(time.time() * 1000))
    return asyncio.run(produce_at_rate(broker_url, pipeline.source_topic, events, rate, duration,
                                       None if unkeyed else pipeline.key_field))
