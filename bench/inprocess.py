"""The processor alone, in one process: CPU per event of a micro-batch, without broker or network.

  python -m bench.inprocess [--pipeline cart|fraud] [--events 100000] [--users 10000] [--batch 2000] [--profile]
                            [--zipf 1] [--gc-young 200000]

The real `Processor` and `GatedTable` (RocksDB in a temporary directory) of the worker's app run
over pre-encoded events of the pipeline keyed by their state key (cart: user; fraud: card), in
batches as the intake hands them over; only the Kafka producer is replaced by one that builds the
same aiokafka record batches and acknowledges them at once. So this measures decode, fold, features,
predict, output and state encoding, the commit gate's bookkeeping, RocksDB writes and metrics: what
the worker spends per event besides Faust's consumer and the broker. Numbers are steady-state (a
first pass warms the table): CPU time, the mean of five passes, with the cyclic garbage collector's
share of it.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time

import orjson

from app import gc_policy
from app.dev.inprocess import ConsumerRecord, FakeBatch, build


def records(pipeline, n: int, users: int, partitions: int, zipf: float = 0.0) -> list[ConsumerRecord]:
    """n events of `users` users (cards; Zipf-like for cart with `zipf` > 0), keyed by the state
    key, on its partition."""
    import itertools

    from app.kafka.partitioner import key_hash
    from bench.common import simulated

    clock = itertools.count(1_700_000_000_000, 7)
    out, offsets = [], [0] * partitions
    for e in simulated(pipeline.name, n, users, 1, "e", ts_ms=lambda: next(clock), zipf=zipf):
        key = e[pipeline.key_field].encode()
        p = key_hash(key) % partitions
        out.append(ConsumerRecord(pipeline.source_topic, p, offsets[p], key, orjson.dumps(e), []))
        offsets[p] += 1
    return out


class CollectorTime:
    """Seconds the cyclic garbage collector ran, from its callbacks."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


async def run(args) -> None:
    service = build(tempfile.mkdtemp(prefix="bench-inprocess-"))
    gc_policy.install()  # as the worker does when it starts
    if args.gc_young is not None:
        gc_policy.YOUNG_MAX = args.gc_young
    collector = CollectorTime()
    partitions = service.settings.partitions
    processor = service.pipelines[args.pipeline].processor
    data = records(processor.pipeline, args.events, args.users, partitions, args.zipf)

    async def once(n: int, generation=1) -> tuple[float, float]:
        # the same events again at later offsets: new to the state, as a stream that goes on
        shift = n * len(data)
        shifted = [r._replace(offset=r.offset + shift) for r in data]
        batches = [shifted[i:i + args.batch] for i in range(0, len(shifted), args.batch)]
        # The pass's input, made at once, is not the worker's (its records arrive a fetch at a
        # time): out of the young generation, or the first collection of the pass scans all of it.
        gc.collect()
        t0, gc0 = time.process_time(), collector.seconds  # CPU time: steadier than wall time on a shared machine
        handed = []
        for b in batches:
            handed.append(FakeBatch(b, generation))
            await processor.handle(handed[-1])
            gc_policy.between_batches()  # as the agent does
        await processor.writer.drain()
        assert all(b.acked for b in handed)
        return time.process_time() - t0, collector.seconds - gc0

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
    # the mean, not the best pass: a collection that comes every few passes is part of the cost
    passes = [await once(n) for n in range(1, 6)]
    cpu, in_gc = (sum(x) / len(passes) for x in zip(*passes))
    print(f"{args.pipeline} processor alone: {args.events} events in batches of {args.batch}: "
          f"{cpu / args.events * 1e6:.2f} us/event, {args.events / cpu:,.0f} events/s "
          f"(cyclic GC: {in_gc / args.events * 1e6:.2f} us/event)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", default="cart", choices=["cart", "fraud"])
    p.add_argument("--zipf", type=float, default=0.0, help="cart users picked Zipf-like (user k about k**-s as often)")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="cProfile of one pass, by own time")
    p.add_argument("--gc-young", type=int, default=None,
                   help="young objects collected between batches without a state write (app/gc_policy.py YOUNG_MAX)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
