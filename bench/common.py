"""Shared parts of the benchmark: processes, broker topics, input events, the reader, percentiles,
process memory."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.dev.broker import free_port
from app.dev.launcher import LoggedProcess, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_DIR = Path(os.environ.get("MODEL_DIR", ROOT / "models")).resolve()
PARTITIONS = 4


# -- processes: the real worker, and the helpers (bare loop, load generator), each in its own ------

def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def helper(args: list[str], log: Path) -> LoggedProcess:
    """A helper process of the benchmark (`python -m bench.bare ...`), started."""
    return LoggedProcess(args, _env(), log, cwd=ROOT).start()


async def run_proc_to_result(args: list[str], log: Path, timeout: float = 600) -> dict:
    """Run a helper to its end; the JSON of its last `RESULT ` line."""
    proc = helper(args, log)
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    proc.stop()
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{args} gave no result; see {log}")
    return orjson.loads(lines[-1].split("RESULT ", 1)[1])  # the log is appended to: the last one is ours


class Worker(WorkerProcess):
    """The real worker, started as users start it: `faust -A app worker -l info`."""

    def __init__(self, broker_url: str, workdir: Path, env: dict | None = None, name: str = "worker") -> None:
        self.web_port = free_port()
        self.data_dir = workdir / f"data-{name}"
        super().__init__(_env({"BROKER_URL": broker_url, "WEB_PORT": str(self.web_port),
                               "DATA_DIR": str(self.data_dir), "MODEL_DIR": str(MODEL_DIR), **(env or {})}),
                         workdir / f"{name}.log", cwd=ROOT)

    async def ready(self, timeout: float = 120) -> None:
        await self.wait_for_async(timeout=timeout)

    def metrics(self, pipeline: str = "cart") -> dict[str, float]:
        """The worker's /metrics, samples of one pipeline (and of none), as {name{labels}: value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            label = re.search(r'pipeline="([^"]*)"', line)
            if line.startswith("#") or (label and label.group(1) != pipeline):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name.replace(f'{{pipeline="{pipeline}"}}', "")] = float(value)
            except ValueError:
                pass
        return out


def say(msg: str) -> None:
    """Progress on stderr, so stdout keeps only the result table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # retention.ms given explicitly: Tansu returns only the configs given at creation.
        await admin.create_topics([NewTopic(n, partitions, 1, topic_configs={"retention.ms": "-1"})
                                   for n in names])
    finally:
        await admin.close()


def simulated(pipeline: str, n: int, users: int, seed: int, prefix: str, ts_ms=None,
              zipf: float = 0.0) -> list[dict]:
    """n simulated events of a pipeline ("cart": shoppers, "fraud": cards), `users` of them picked
    uniformly (or, for cart, Zipf-like with `zipf` > 0); ids unique per prefix; ts stamped by
    `ts_ms()`."""
    from app.pipelines import configured
    from training import cart_sim, fraud_sim

    if zipf and pipeline != "cart":
        raise ValueError("Zipf-like activity is simulated for cart events only")
    clock = ts_ms or (lambda: int(time.time() * 1000))
    gen = cart_sim.live(users, seed, clock, zipf) if pipeline == "cart" else fraud_sim.live(users, seed, clock)
    id_field = configured()[pipeline].id_field
    out = []
    for i in range(n):
        e = next(gen)
        e[id_field] = f"{prefix}{i}"
        out.append(e)
    return out


async def send_all(bootstrap: str, topic: str, records, progress: bool = False) -> float:
    """Produce (key, value, partition or None: by key) records, every ack awaited (in chunks of
    20k, so memory stays bounded); returns seconds taken."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024,
                                acks=1)
    await producer.start()
    t0 = time.monotonic()
    try:
        futs = []
        for i, (key, value, partition) in enumerate(records):
            futs.append(await producer.send(topic, value, key=key, partition=partition))
            if len(futs) >= 20_000:
                await asyncio.gather(*futs)
                futs = []
                if progress:
                    say(f"  produced {i + 1}")
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return time.monotonic() - t0


async def produce_all(bootstrap: str, topic: str, events: list[dict], progress: bool = True,
                      key_field: str = "user_id") -> float:
    """Events keyed by `key_field` (the state key), as a producer with Kafka's default partitioner
    would send them; returns seconds taken."""
    return await send_all(bootstrap, topic, ((e[key_field].encode(), orjson.dumps(e), None) for e in events),
                          progress)


class Reader:
    """A separate consumer of an output topic (all partitions, from the current end).

    Records arrival wall time (ms, float) and the event timestamp carried in the value.
    """

    def __init__(self, bootstrap: str, topic: str, ts_field: str | None, fetch_wait_ms: int, keep_values=False,
                 id_field: str | None = None):
        self.bootstrap, self.topic, self.ts_field = bootstrap, topic, ts_field
        self.fetch_wait_ms = fetch_wait_ms
        self.keep_values = keep_values
        self.id_field = id_field
        self.ids: list[str] = []  # with id_field: ids in arrival order, aligned with samples
        self.consumer: AIOKafkaConsumer | None = None
        self.samples: list[tuple[float, int]] = []  # (arrival ms, event ts ms)
        self.values: list[bytes] = []
        self.count = 0
        self.first = self.last = None  # monotonic arrival of first / last record
        self._task = None

    async def start(self, from_beginning: bool = False) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=self.fetch_wait_ms,
                                         max_partition_fetch_bytes=4 * 1024 * 1024)
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        if from_beginning:
            await self.consumer.seek_to_beginning(*tps)
        else:
            await self.consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the position now, not at the first fetch
                await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        parse = self.ts_field is not None
        while True:
            batch = await self.consumer.getmany(timeout_ms=100, max_records=10_000)
            if not batch:
                continue
            now_m = time.monotonic()
            now_ms = time.time() * 1000.0
            n = 0
            for records in batch.values():
                n += len(records)
                if parse:
                    f, idf = self.ts_field, self.id_field
                    for r in records:
                        v = orjson.loads(r.value)
                        if f not in v:
                            # Tansu's reported end offsets lag the real end: a reader that seeks
                            # to "the end" can still see older records of another writer
                            continue
                        self.samples.append((now_ms, v[f]))
                        if idf:
                            self.ids.append(v[idf])
                if self.keep_values:
                    self.values.extend(r.value for r in records)
            if self.first is None:
                self.first = now_m
            self.last = now_m
            self.count += n

    def reset(self) -> None:
        self.samples, self.values, self.ids, self.count, self.first, self.last = [], [], [], 0, None, None

    async def wait_count(self, n: int, idle_timeout: float = 30.0, on_progress=None) -> bool:
        last_count, last_change = -1, time.monotonic()
        next_report = time.monotonic() + 3
        while self.count < n:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if self.count != last_count:
                last_count, last_change = self.count, now
            elif now - last_change > idle_timeout:
                return False
            if on_progress and now >= next_report:
                on_progress(self.count)
                next_report = now + 3
        return True

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.consumer:
            await self.consumer.stop()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[i]


def latency_stats(*rounds: list[tuple[float, int]]) -> dict:
    """Latency of (arrival ms, event ts ms) samples, from one or more rounds of a step.

    p50/p99/p99.9 over the samples of every round. Per round, then averaged: the p50 of its first
    and last third by event time (growth over the step), and how many events were still on their way
    when the last one was sent (about rate x latency for a pipeline that keeps up; growing with the
    step's length for one that does not).
    """
    s = sorted(a - t for samples in rounds for a, t in samples)
    out = {"n": len(s), "p50_ms": _r(percentile(s, 50)), "p99_ms": _r(percentile(s, 99)),
           "p999_ms": _r(percentile(s, 99.9)), "max_ms": _r(s[-1] if s else None)}
    firsts, lasts, in_flight = [], [], []
    for samples in rounds:
        by_ts = [a - t for a, t in sorted(samples, key=lambda x: x[1])]
        third = len(by_ts) // 3
        if third:
            firsts.append(percentile(sorted(by_ts[:third]), 50))
            lasts.append(percentile(sorted(by_ts[-third:]), 50))
            last_sent = max(t for _, t in samples)
            in_flight.append(sum(1 for a, _ in samples if a > last_sent))
    if firsts:
        out["p50_first_third_ms"] = _r(sum(firsts) / len(firsts))
        out["p50_last_third_ms"] = _r(sum(lasts) / len(lasts))
        out["in_flight_at_last_send"] = round(sum(in_flight) / len(in_flight))
    return out


def _r(x):
    return None if x is None else round(float(x), 1)


def proc_status(pid: int) -> dict:
    """VmRSS / VmHWM of a process in MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = round(int(v.split()[0]) / 1024.0, 1)
    except FileNotFoundError:
        pass
    return out


def git_describe() -> dict:
    """The commit measured, and whether the code under measurement had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "app", "domain", "agents"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except OSError:
        return {}


def _stat_cpu(stat: Path) -> tuple[str, float] | None:
    """(name, user + system CPU seconds) from a /proc stat file; None once the process or thread ended."""
    try:
        name, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its ended threads included)."""
    stat = _stat_cpu(Path(f"/proc/{pid}/stat"))
    return 0.0 if stat is None else stat[1]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of a process so far, per thread name (threads of one name summed;
    the main thread is "main")."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        stat = _stat_cpu(task / "stat")
        if stat is not None:
            name = "main" if task.name == str(pid) else stat[0]
            out[name] = out.get(name, 0.0) + stat[1]
    return out


# -- phases ---------------------------------------------------------------------------------------

async def drain(reader: Reader, n: int, what: str, timeout_idle: float = 60) -> dict:
    ok = await reader.wait_count(n, timeout_idle, lambda c: say(f"  {what}: {c}/{n} outputs"))
    secs = (reader.last - reader.first) if reader.first is not None and reader.count > 1 else None
    return {"events": n, "outputs": reader.count, "complete": ok,
            "seconds_first_to_last": round(secs, 3) if secs else None,
            "events_per_s": round(reader.count / secs) if secs else None}


async def latency_step(bootstrap: str, in_topic: str, out_topic: str, ts_field: str, rate: int,
                       duration: float, workdir: Path, label: str, pid: int,
                       users: tuple[int, float] = (10_000, 0.0)) -> tuple[dict, list]:
    """A warm-up (connections, metadata, first batches; not measured), then `rate` events/s for
    `duration` seconds into `in_topic`, read back from `out_topic` by a reader of its own. Returns
    what was sent and received, and the (arrival, `ts_field`) samples. `users`: how many, and their
    Zipf exponent (0: uniform)."""
    from app.settings import current

    population = ["--users", str(users[0]), "--zipf", str(users[1])]
    reader = Reader(bootstrap, out_topic, ts_field, current().fetch_wait_ms)
    await reader.start()
    try:
        await run_proc_to_result(["-m", "bench.loadgen", "--bootstrap", bootstrap, "--topic", in_topic,
                                  "--rate", "200", "--duration", "2", "--prefix", f"{label}-warm-", *population],
                                 workdir / f"loadgen-{label}.log")
        await reader.wait_count(400, 10)
        await asyncio.sleep(1)
        reader.reset()
        await asyncio.sleep(0.5)
        cpu0 = cpu_seconds(pid)
        say(f"  {label}: {rate} events/s for {duration} s")
        gen = await run_proc_to_result(["-m", "bench.loadgen", "--bootstrap", bootstrap, "--topic", in_topic,
                                        "--rate", str(rate), "--duration", str(duration),
                                        "--prefix", f"{label}-{rate}-", *population],
                                       workdir / f"loadgen-{label}.log")
        ok = await reader.wait_count(gen["sent"], 15)
    finally:
        await reader.stop()
    step = {"sent": gen["sent"], "achieved_rate": gen["rate"], "received": reader.count, "all_received": ok,
            "cpu_share": round((cpu_seconds(pid) - cpu0) / gen["seconds"], 2)}
    stats = latency_stats(reader.samples)
    say(f"    p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms, p99.9 {stats['p999_ms']} ms, "
        f"received {reader.count}/{gen['sent']}")
    return step, reader.samples


def pooled(rate: int, steps: list[tuple[dict, list]]) -> dict:
    """The rounds of one rate: latency over all their samples, counts summed, CPU averaged."""
    out = latency_stats(*(samples for _, samples in steps))
    out.update(offered=rate, rounds=len(steps), sent=sum(s["sent"] for s, _ in steps),
               received=sum(s["received"] for s, _ in steps),
               all_received=all(s["all_received"] for s, _ in steps),
               achieved_rate=round(sum(s["achieved_rate"] for s, _ in steps) / len(steps), 1),
               cpu_share=round(sum(s["cpu_share"] for s, _ in steps) / len(steps), 2))
    return out
