"""`scoring` command line: embedded broker, training, event generator, dead-letter replay, `run`.

The worker itself is Faust's: `faust -A app worker -l info`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from app.broker import EmbeddedBroker, port_open
from app.settings import settings

log = logging.getLogger("scoring")


def bootstrap(url: str) -> str:
    """Faust URL (kafka://h:p[;kafka://h2:p2]) to an aiokafka bootstrap list."""
    return ",".join(u.split("://", 1)[-1] for u in url.replace(";", ",").split(","))


# -- broker -------------------------------------------------------------------------------------

def cmd_broker(args) -> None:
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # so that sigwait, not the default action, gets them
    with EmbeddedBroker(port=args.port) as broker:
        print(f"BROKER_URL={broker.url}  (pid {broker.pid}); Ctrl-C stops it", flush=True)
        signal.sigwait(stop_signals)


# -- training -----------------------------------------------------------------------------------

def trainers() -> dict:
    from training import train_cart

    found = {"cart": train_cart.train}
    try:
        from training import train_fraud
    except ImportError:
        return found
    found["fraud"] = train_fraud.train
    return found


def cmd_train(args) -> None:
    available = trainers()
    names = list(available) if args.pipeline == "all" else [args.pipeline]
    for name in names:
        target = Path(args.model_dir) / name
        if args.if_missing and (target / "model.txt").exists():
            print(f"{name} model present in {target}")
            continue
        available[name](target)


# -- generator ----------------------------------------------------------------------------------

async def produce_at_rate(broker_url: str, topic: str, events, rate: float, duration: float,
                          key_field: str | None) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker_url), linger_ms=5)
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


def cmd_generate(args) -> None:
    from training import cart_sim

    if args.pipeline == "fraud":
        from training import fraud_sim

        events, topic, key = fraud_sim.live(args.users, args.seed, lambda: int(time.time() * 1000)), "transactions", "card_id"
    else:
        events, topic, key = cart_sim.live(args.users, args.seed, lambda: int(time.time() * 1000)), "cart_events", "user_id"
    sent = asyncio.run(produce_at_rate(args.broker, topic, events, args.rate, args.duration,
                                       None if args.unkeyed else key))
    print(f"generator: done, {sent} events")


# -- dead-letter replay -------------------------------------------------------------------------

async def replay_dead_letters(broker_url: str, stage: str | None, exception: str | None,
                              offsets: tuple[int, int] | None, max_replays: int) -> tuple[int, int]:
    """Re-publish chosen dead letters to their source topic, original bytes, replay counter +1.

    A record that failed again after a replay has several letters; only the latest of each lineage
    is considered, and it is skipped once it has been replayed `max_replays` times.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from app.processor import DEAD_LETTER_TOPIC

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(broker_url), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker_url))
    await consumer.start()
    await producer.start()
    latest: dict[str, tuple[int, object]] = {}
    try:
        tps = [TopicPartition(DEAD_LETTER_TOPIC, p) for p in consumer.partitions_for_topic(DEAD_LETTER_TOPIC) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        idle = 0
        while idle < 3:  # until quiet: Tansu's end offsets lag, so they cannot tell where the end is
            batch = await consumer.getmany(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for r in records:
                    h = {k: v.decode() for k, v in r.headers}
                    lineage = h.get("replay.of") or f"{h['errors.topic']}:{h['errors.partition']}:{h['errors.offset']}"
                    count = int(h.get("replay.count", "0"))
                    if lineage not in latest or count >= latest[lineage][0]:
                        latest[lineage] = (count, r)
        replayed = skipped = 0
        futures = []
        for lineage, (count, r) in latest.items():
            h = {k: v.decode() for k, v in r.headers}
            if stage and h.get("errors.stage") != stage:
                continue
            if exception and h.get("errors.exception") != exception:
                continue
            if offsets and not offsets[0] <= int(h["errors.offset"]) <= offsets[1]:
                continue
            if count >= max_replays:
                skipped += 1
                continue
            headers = [("replay.count", str(count + 1).encode()), ("replay.of", lineage.encode())]
            futures.append(await producer.send(h["errors.topic"], r.value, key=r.key, headers=headers))
            replayed += 1
        await asyncio.gather(*futures)
    finally:
        await consumer.stop()
        await producer.stop()
    return replayed, skipped


def cmd_replay(args) -> None:
    offsets = tuple(int(x) for x in args.offsets.split("-")) if args.offsets else None
    replayed, skipped = asyncio.run(replay_dead_letters(args.broker, args.stage, args.exception, offsets,
                                                        args.max_replays))
    print(f"replayed {replayed} dead letter(s); skipped {skipped} at the replay limit ({args.max_replays})")


# -- run: broker + worker + generator -----------------------------------------------------------

def wait_for_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"worker exited (code {proc.returncode}); see {path}")
        time.sleep(0.2)
    raise SystemExit(f"worker not ready after {timeout:.0f}s; see {path}")


def stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> None:
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM should
    # clean up as Ctrl-C does.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    logs = Path(settings.data_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    broker = worker = None
    generators = []
    env = dict(os.environ)
    try:
        if "BROKER_URL" not in os.environ:
            broker = EmbeddedBroker(log_path=logs / "broker.log").start()
            env["BROKER_URL"] = broker.url
            print(f"embedded broker: {broker.url} (pid {broker.pid})", flush=True)
        if port_open(settings.web_port, settings.web_host):
            raise SystemExit(f"port {settings.web_port} is taken: set WEB_PORT")
        worker_log = logs / "worker.log"
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "faust", "-A", "app", "worker", "-l", "info"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"worker pid {worker.pid}, log {worker_log}; waiting until ready...", flush=True)
        wait_for_log(worker_log, "[^Worker]: Ready", worker, 60)
        generators = [
            subprocess.Popen([sys.executable, "-m", "app.cli", "generate", "--pipeline", pipeline, "--rate",
                              str(rate), "--users", str(args.users), "--broker", env["BROKER_URL"]],
                             env=env, start_new_session=True)
            for pipeline, rate in (("cart", args.rate), ("fraud", max(1, args.rate // 5)))]
        print(f"generators pid {' '.join(str(g.pid) for g in generators)}", flush=True)
        url = f"http://{settings.web_host}:{settings.web_port}"
        print(f"\n  dashboard: {url}/dashboard\n  metrics:   {url}/metrics\n  Ctrl-C stops everything\n",
              flush=True)
        while worker.poll() is None:
            time.sleep(0.5)
        raise SystemExit(f"worker exited (code {worker.returncode}); see {worker_log}")
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    finally:
        for generator in generators:
            stop(generator)
        stop(worker, timeout=20)
        if broker:
            broker.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="scoring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker until Ctrl-C")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("train", help="simulate history, train LightGBM, write model + metadata")
    p.add_argument("--pipeline", default="all")
    p.add_argument("--model-dir", default=str(settings.model_dir))
    p.add_argument("--if-missing", action="store_true", help="skip pipelines whose model exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="produce realistic events at a rate")
    p.add_argument("--pipeline", default="cart", choices=["cart", "fraud"])
    p.add_argument("--rate", type=float, default=50)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--duration", type=float, default=0, help="seconds; 0 = until stopped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--unkeyed", action="store_true", help="send without keys (exercises repartitioning)")
    p.add_argument("--broker", default=settings.broker_url)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("replay-dead-letters", help="re-publish chosen dead letters to their source topic")
    p.add_argument("--stage")
    p.add_argument("--exception")
    p.add_argument("--offsets", help="source offset range, e.g. 100-200")
    p.add_argument("--max-replays", type=int, default=3)
    p.add_argument("--broker", default=settings.broker_url)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="broker (unless BROKER_URL is set) + worker + generator")
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--users", type=int, default=500)
    p.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
