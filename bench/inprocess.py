"""The processor alone, in one process: CPU per event of a micro-batch, without broker or network.

  python -m bench.inprocess [--events 100000] [--users 10000] [--batch 2000] [--profile]

The real `Processor` and `GatedTable` (RocksDB in a temporary directory) of the worker's app run
over pre-encoded cart events keyed by user, in batches as the intake hands them over; only the
Kafka producer is replaced by one that builds the same aiokafka record batches and acknowledges them
at once. So this measures decode, fold, features, predict, output and state encoding, the commit
gate's bookkeeping, RocksDB writes and metrics: what the worker spends per event besides Faust's
consumer and the broker. Numbers are steady-state (a first pass warms the table): CPU time, best
of five passes.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time

import orjson

from app.dev.inprocess import ConsumerRecord, FakeBatch, build


def records(n: int, users: int, partitions: int) -> list[ConsumerRecord]:
    from aiokafka.partitioner import murmur2

    from bench.common import cart_events

    out, offsets = [], [0] * partitions
    for e in cart_events(n, users, 1, "e"):
        key = e["user_id"].encode()
        p = (murmur2(key) & 0x7FFFFFFF) % partitions
        out.append(ConsumerRecord("cart_events", p, offsets[p], key, orjson.dumps(e), []))
        offsets[p] += 1
    return out


async def run(args) -> None:
    service = build(tempfile.mkdtemp(prefix="bench-inprocess-"))
    partitions = service.settings.partitions
    processor = service.pipelines["cart"].processor
    data = records(args.events, args.users, partitions)

    async def once(n: int, generation=1) -> float:
        # the same events again at later offsets: new to the state, as a stream that goes on
        shift = n * len(data)
        shifted = [r._replace(offset=r.offset + shift) for r in data]
        batches = [shifted[i:i + args.batch] for i in range(0, len(shifted), args.batch)]
        t0 = time.process_time()  # CPU time: steadier than wall time on a shared machine
        handed = []
        for b in batches:
            handed.append(FakeBatch(b, generation))
            await processor.handle(handed[-1])
        await processor.writer.drain()
        assert all(b.acked for b in handed)
        return time.process_time() - t0

    await once(0)  # warm: every user has a state record afterwards
    assert processor.m.scored._value.get() == args.events, processor.m.scored._value.get()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        await once(1)
        prof.disable()
        sort = os.environ.get("SORT", "tottime")
        pstats.Stats(prof, stream=sys.stdout).sort_stats(sort).print_stats(40)
        return
    best = min([await once(n) for n in range(1, 6)])
    print(f"processor alone: {args.events} events in batches of {args.batch}: "
          f"{best / args.events * 1e6:.2f} us/event, {args.events / best:,.0f} events/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="cProfile of one pass, by own time")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
