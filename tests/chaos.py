"""The crash soak: both pipelines under load while workers are killed, wiped, added and removed.

  python -m tests.chaos [--events 12000] [--rate 100] [--kills 20] [--seed 1]     (make chaos)

Keys are written as real producers write them: murmur2-keyed (aiokafka, Java), CRC32-keyed
(librdkafka: most take the repartition hop) and unkeyed (always the hop); each key always the same
way, so each key's events stay in order. While the events are produced, a random worker is
SIGKILLed every 3-8 s (its DATA_DIR wiped at every third kill), a second worker joins and leaves,
and publishing of the outputs fails for a moment now and then. Then the survivors drain, and:
  - every valid event was scored at least once (duplicates are allowed: at-least-once);
  - every user's and card's state in the changelog equals a crash-free fold of its events
    (nothing counted twice, nothing lost);
  - every partition of the inputs and repartition topics is committed to its end (lag zero).
A run prints events, kills, wipes, rebalances, duplicates and the time to drain, and exits non-zero
if a check fails. `tests/test_chaos.py` runs a short one in `make test`.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.dev.broker import EmbeddedBroker
from app.kafka.partitioner import key_hash
from app.pipelines import configured
from tests.harness import Worker, crc32_partition, read_topic
from training import cart_sim, fraud_sim

PARTITIONS = 4
GROUP = "scoring"


def key_mode(key: bytes) -> str:
    """How the producers write this key, always the same way: murmur2, crc32 or unkeyed."""
    return ("murmur2", "murmur2", "crc32", "crc32", "unkeyed")[(key_hash(key) >> 5) % 5]


def placement(key: bytes) -> tuple[bytes | None, int | None]:
    """(record key, partition) a producer would use; an unkeyed producer here sticks to one partition
    per entity (as a producer batching by entity would), so that entity's events stay in order."""
    mode = key_mode(key)
    if mode == "murmur2":
        return key, None
    if mode == "crc32":
        return key, crc32_partition(key, PARTITIONS)
    return None, crc32_partition(key[::-1], PARTITIONS)


def workload(events: int, seed: int) -> dict[str, list[dict]]:
    """Events of both pipelines in event-time order, about half each."""
    def enough(simulate, n: int, days: float) -> list[dict]:
        users = 20
        while len(out := simulate(users, days, seed)) < n:
            users *= 2
        return out[:n]

    cart = enough(cart_sim.simulate, events // 2, 2)
    fraud = enough(fraud_sim.simulate, events - len(cart), 6)
    strip = lambda es: [{k: v for k, v in e.items() if not k.startswith("_")} for e in es]  # noqa: E731
    return {"cart": strip(cart), "fraud": strip(fraud)}


@dataclass
class Report:
    events: int = 0
    kills: int = 0
    wipes: int = 0
    joins_leaves: int = 0
    publish_faults: int = 0
    rebalances: int = 0
    duplicates: int = 0
    missing: int = 0
    wrong_states: int = 0
    lagging: list = field(default_factory=list)
    drain_s: float = 0.0
    dead_letters: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_states and not self.lagging

    def line(self) -> str:
        return (f"chaos: {'PASS' if self.ok else 'FAIL'} {self.events} events, {self.kills} SIGKILLs "
                f"({self.wipes} with DATA_DIR wiped), {self.joins_leaves} joins/leaves, {self.publish_faults} "
                f"publish faults, {self.rebalances} rebalances, {self.duplicates} duplicate outputs, "
                f"{self.dead_letters} dead letters, {self.missing} never scored, {self.wrong_states} states "
                f"unlike a crash-free fold, {len(self.lagging)} partitions not committed to the end; "
                f"drained in {self.drain_s:.1f} s")


class Producer(threading.Thread):
    def __init__(self, bootstrap: str, events: dict[str, list[dict]], rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.rate = bootstrap, rate
        merged = [(e["ts"], name, e) for name, es in events.items() for e in es]
        self.queue = [(name, e) for _, name, e in sorted(merged, key=lambda t: t[0])]
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            futs = []
            for name, e in self.queue:
                pipe = configured()[name]
                key, partition = placement(e[pipe.key_field].encode())
                futs.append(await producer.send(pipe.source_topic, orjson.dumps(e), key=key, partition=partition))
                self.sent += 1
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*futs)
        finally:
            await producer.stop()


def offline_states(name: str, events: list[dict]) -> dict[str, dict]:
    from app.pipeline.codec import decode

    pipe, states = configured()[name], {}
    for raw in events:
        e = decode(orjson.dumps(raw), pipe.schema, 1 << 20, pipe.check)
        states[e[pipe.key_field]] = pipe.apply(states.get(e[pipe.key_field]) or pipe.new_state(), e)
    return states


async def _lagging(bootstrap: str, topics: list[str]) -> list[tuple[str, int, int | None, int]]:
    """(topic, partition, committed, end) of every partition not committed to its end."""
    from app.kafka.probes import read_true_ends

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        ends = await read_true_ends(bootstrap, dict(await consumer.end_offsets(tps)))
        out = []
        for tp in tps:
            done = await consumer.committed(tp)
            if ends[tp] > 0 and (done or 0) < ends[tp]:
                out.append((tp.topic, tp.partition, done, ends[tp]))
        return out
    finally:
        await consumer.stop()


def run(events: int = 12_000, rate: float = 100, kills: int = 20, seed: int = 1, wipe_every: int = 3,
        workdir: Path | None = None, drain_timeout: float = 300, say=print) -> Report:
    rng = random.Random(seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="chaos-"))
    faults = workdir / "faults"
    faults.write_text("")
    load = workload(events, seed)
    report = Report(events=sum(len(v) for v in load.values()))
    env = {"FAULT_FILE": str(faults), "STATE_FLUSH_MS": "300"}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        pool = {name: Worker(broker.url, workdir / f"data-{name}", workdir / "logs", name, env)
                for name in ("w1", "w2")}
        pool["w1"].start()
        producer = Producer(broker.bootstrap, load, rate)
        producer.start()
        try:
            while report.kills < kills or producer.is_alive():
                time.sleep(rng.uniform(3, 8))
                if producer.error:
                    raise producer.error
                if rng.random() < 0.3:  # a moment of refused outputs: retried in place
                    report.publish_faults += 1
                    faults.write_text(f"publish:{rng.choice(['personalization_scores', 'fraud_decisions'])}\n")
                    time.sleep(rng.uniform(0.1, 0.4))
                    faults.write_text("")
                if report.kills in (1, 8, 14) and report.joins_leaves < (1, 8, 14).index(report.kills) + 1:
                    report.joins_leaves += 1  # the second worker joins, leaves, joins again
                    w2 = pool["w2"]
                    w2.stop() if w2.alive() else w2.start(wait_ready=False)
                    say(f"chaos: w2 {'joins' if w2.alive() else 'leaves'}")
                    continue
                victim = rng.choice([w for w in pool.values() if w.alive()] or [pool["w1"]])
                victim.kill()
                report.kills += 1
                if report.kills % wipe_every == 0:
                    shutil.rmtree(victim.data_dir, ignore_errors=True)
                    report.wipes += 1
                say(f"chaos: kill {report.kills} ({victim.name}{', wiped' if report.kills % wipe_every == 0 else ''}), "
                    f"{producer.sent}/{len(producer.queue)} sent")
                time.sleep(rng.uniform(0.2, 1.5))
                victim.start(wait_ready=False)
            producer.join()
            if producer.error:
                raise producer.error
            drain_start = time.monotonic()
            for w in pool.values():
                if w.alive():
                    w.wait_for("[^Worker]: Ready", 90)
            report = _check(broker, load, report, drain_start, drain_timeout, say)
            report.rebalances = len(set(re.findall(rb"synced group scoring with generation (\d+)",
                                                   b"".join(p.read_bytes() for p in (workdir / "logs").glob("*.log")))))
        finally:
            for w in pool.values():
                w.kill()
    say(report.line())
    return report


def _has_all(id_field: str, want: set):
    """`read_topic`'s stop condition: every wanted id read (duplicates make a count mislead)."""
    seen: set = set()

    def done(records) -> bool:
        for r in records[done.n:]:
            seen.add(orjson.loads(r.value)[id_field])
        done.n = len(records)
        return want <= seen
    done.n = 0
    return done


def _where(broker, pipe, ids: set) -> str:
    """Where the events never scored are in the input topic: first and last offset per partition."""
    spots: dict = {}
    for r in read_topic(broker, pipe.source_topic, timeout=5):
        try:
            event_id = orjson.loads(r.value)[pipe.id_field]
        except Exception:
            continue
        if event_id in ids:
            lo, hi, n = spots.get(r.partition, (r.offset, r.offset, 0))
            spots[r.partition] = (min(lo, r.offset), max(hi, r.offset), n + 1)
    return ", ".join(f"{pipe.source_topic}[{p}] {n} in {lo}..{hi}" for p, (lo, hi, n) in sorted(spots.items()))


def _check(broker, load, report: Report, drain_start: float, timeout: float, say) -> Report:
    deadline = drain_start + timeout
    outputs: dict[str, list] = {}
    for name, events in load.items():
        pipe = configured()[name]
        want = {e[pipe.id_field] for e in events}
        seen: Counter = Counter()
        while time.monotonic() < deadline:
            records = read_topic(broker, pipe.output_topic, _has_all(pipe.id_field, want), timeout=20)
            seen = Counter(orjson.loads(r.value)[pipe.id_field] for r in records)
            if want <= set(seen):
                break
        outputs[name] = seen
        missing = want - set(seen)
        report.missing += len(missing)
        report.duplicates += sum(seen.values()) - len(seen)
        if missing:
            say(f"chaos: {name}: {len(missing)} never scored: {_where(broker, pipe, missing)}; outputs read per "
                f"partition {dict(sorted(Counter(r.partition for r in records).items()))}")
    report.drain_s = time.monotonic() - drain_start
    report.dead_letters = len(read_topic(broker, "dead_letters", timeout=3))
    topics = [t for pipe in configured().values()
              for t in (pipe.source_topic, f"scoring-{pipe.source_topic}-by-{pipe.key_field}")]
    while time.monotonic() < deadline:  # the last commits follow the last writes
        report.lagging = asyncio.run(_lagging(broker.bootstrap, topics))
        if not report.lagging:
            break
        time.sleep(1)
    for name, events in load.items():
        pipe = configured()[name]
        expected = offline_states(name, events)
        latest = {}
        for r in read_topic(broker, f"scoring-{pipe.table_name}-changelog", timeout=10):
            if r.key and r.value:
                latest[r.key.decode()] = orjson.loads(r.value)["state"]
        wrong = [k for k in expected if latest.get(k) != expected[k]]
        if wrong:
            say(f"chaos: {name}: {len(wrong)} states differ, e.g. {wrong[:3]} ({[key_mode(k.encode()) for k in wrong[:3]]})")
        report.wrong_states += len(wrong)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=12_000)
    p.add_argument("--rate", type=float, default=100, help="events per second, both pipelines together")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--wipe-every", type=int, default=3)
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the workers and the broker are stopped too
    report = run(args.events, args.rate, args.kills, args.seed, args.wipe_every)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({**report.__dict__, "ok": report.ok}, option=orjson.OPT_INDENT_2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
