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
from app import security

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
    if args.events or args.from_topic:
        return cmd_train_recorded(args)
    if args.labels or args.labelled_only or args.since or args.until:
        raise SystemExit("scoring train: --labels, --labelled-only, --since and --until go with --events or --from-topic")
    available = trainers()
    names = list(available) if args.pipeline == "all" else [args.pipeline]
    for name in names:
        target = Path(args.model_dir) / name
        if args.if_missing and (target / "model.txt").exists():
            print(f"{name} model present in {target}")
            continue
        available[name](target)


def cmd_train_recorded(args) -> None:
    """`scoring train --events PATH | --from-topic TOPIC`: training/recorded.py does the work."""
    from training import recorded

    if args.pipeline not in ("cart", "fraud"):
        raise SystemExit("scoring train: --events / --from-topic need --pipeline cart or --pipeline fraud")
    if args.events and args.from_topic:
        raise SystemExit("scoring train: give --events or --from-topic, not both")
    try:
        since, until = recorded.parse_time(args.since), recorded.parse_time(args.until)
        if args.events:
            rec = recorded.read_file(args.pipeline, Path(args.events), since, until)
        else:
            rec = recorded.read_topic(args.pipeline, args.from_topic, settings.broker_url, since, until)
        labels = recorded.read_labels(Path(args.labels)) if args.labels else None
        result = recorded.train(rec, Path(args.model_dir), labels, args.labelled_only, args.holdout,
                                args.rounds, args.promote_local)
    except recorded.TrainingError as exc:
        raise SystemExit(f"scoring train: {exc}") from None
    print("\n".join(recorded.summary(rec, result)))
    print(f"version: {result.meta['version']}", flush=True)


def cmd_models_list(args) -> None:
    from app import registry

    pipeline_dir = Path(args.model_dir) / args.pipeline
    entries = registry.listing(pipeline_dir)
    if args.json:
        print(orjson.dumps(entries, option=orjson.OPT_INDENT_2).decode())
    elif not entries:
        raise SystemExit(f"scoring models: no {args.pipeline} model in {pipeline_dir}")
    else:
        print("\n".join(registry.table(entries)))


# -- generator ----------------------------------------------------------------------------------

async def produce_at_rate(broker_url: str, topic: str, events, rate: float, duration: float,
                          key_field: str | None) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(broker_url), linger_ms=5,
                                **security.client_kwargs(bootstrap(broker_url)))
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

def cmd_replay(args) -> None:
    from app import replay
    from app.usecases import USE_CASES

    offsets = None
    if args.offsets:
        lo, _, hi = args.offsets.partition("-")
        if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise SystemExit(f"scoring replay-dead-letters: --offsets {args.offsets!r}: give FIRST-LAST, e.g. 100-200")
        offsets = (int(lo), int(hi))
    choice = replay.Choice(stage=args.stage, exception=args.exception, topic=args.topic, partition=args.partition,
                           offsets=offsets, max_replays=args.max_replays, again=args.again)
    inputs = {uc.source_topic for uc in USE_CASES.values()}
    outcome = asyncio.run(replay.replay(bootstrap(args.broker), inputs, choice, args.dry_run))
    for line in outcome.replayed:
        print(line)
    print(outcome.summary(args.dry_run))


# -- run: broker + worker + generator -----------------------------------------------------------

class StopRequests:
    """SIGINT / SIGTERM while `run` runs: the first asks for a clean stop, a second one (people press
    Ctrl-C twice) for a quick one. The handler only counts, it never raises: a signal can neither
    interrupt a start before the new process's PID is kept nor cut the clean-up short (a
    KeyboardInterrupt raised there used to orphan the broker, the worker and the generators)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 2:
            print("\nsecond interrupt: killing everything now", flush=True)

    @property
    def stopping(self) -> bool:
        return self.count > 0

    @property
    def hurry(self) -> bool:
        return self.count > 1


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen, timeout: float,
                 stops: StopRequests | None = None) -> bool:
    """True once `needle` is in the log; False if a stop was asked for first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stops is not None and stops.stopping:
            return False
        if needle in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            raise SystemExit(f"worker exited (code {proc.returncode}); see {path}")
        time.sleep(0.2)
    raise SystemExit(f"worker not ready after {timeout:.0f}s; see {path}")


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each child leads its own session and process group
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen | None, timeout: float = 10, stops: StopRequests | None = None) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout`, or at once on a second interrupt."""
    if proc is None or proc.poll() is not None:
        return
    _killpg(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not (stops and stops.hurry):
        time.sleep(0.05)
    if proc.poll() is None:
        _killpg(proc, signal.SIGKILL)
        proc.wait()


def cmd_run(args) -> None:
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM should
    # clean up as Ctrl-C does.
    stops = StopRequests()
    signal.signal(signal.SIGINT, stops)
    signal.signal(signal.SIGTERM, stops)
    logs = Path(settings.data_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # With BROKER_URL set, the topics are a real cluster's: no synthetic events go there unless asked.
    external = bool(os.environ.get("BROKER_URL", "").strip())
    generate = (not external) if args.generate is None else args.generate
    broker = worker = None
    generators: list[subprocess.Popen] = []
    env = dict(os.environ)
    try:
        if not external:
            broker = EmbeddedBroker(log_path=logs / "broker.log")
            broker.start()
            env["BROKER_URL"] = broker.url
            print(f"embedded broker: {broker.url} (pid {broker.pid})", flush=True)
        if stops.stopping:
            return
        if port_open(settings.web_port, settings.web_host):
            raise SystemExit(f"port {settings.web_port} is taken: set WEB_PORT")
        worker_log = logs / "worker.log"
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "faust", "-A", "app", "worker", "-l", "info"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"worker pid {worker.pid}, log {worker_log}; waiting until ready...", flush=True)
        if not wait_for_log(worker_log, "[^Worker]: Ready", worker, 60, stops):
            return
        if generate:
            for pipeline, rate in (("cart", args.rate), ("fraud", max(1, args.rate // 5))):
                generators.append(subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "generate", "--pipeline", pipeline, "--rate", str(rate),
                     "--users", str(args.users), "--broker", env["BROKER_URL"]],
                    env=env, start_new_session=True))
            print(f"generators pid {' '.join(str(g.pid) for g in generators)}", flush=True)
        elif external:
            print("no generator: BROKER_URL is set, so nothing synthetic is written to that cluster "
                  "(`scoring run --generate`, or `make run ARGS=--generate`, starts them)", flush=True)
        else:
            print("no generator (--no-generate)", flush=True)
        url = f"http://{settings.web_host}:{settings.web_port}"
        print(f"\n  dashboard: {url}/dashboard\n  metrics:   {url}/metrics\n  Ctrl-C stops everything\n",
              flush=True)
        while worker.poll() is None and not stops.stopping:
            time.sleep(0.2)
        if not stops.stopping:
            raise SystemExit(f"worker exited (code {worker.returncode}); see {worker_log}")
    finally:
        # Every process is stopped by its PID whatever happens here: a second Ctrl-C only turns the
        # waits for a clean stop into SIGKILL at once.
        if stops.stopping:
            print("\nstopping...", flush=True)
        for generator in generators:
            stop(generator, 10, stops)
        stop(worker, 20, stops)
        if broker is not None:
            stop(broker.proc, 5, stops)
            broker.stop()


# -- config: the effective configuration --------------------------------------------------------

def cmd_config(args) -> None:
    """Every setting with its value and where it came from; secrets masked (WEB_TOKEN, and the
    KAFKA_* security settings as `security.describe()` shows them). Bad settings never get here:
    reading them stops the process with one line naming each."""
    rows = settings.effective()
    rows += [(name, str(value).lower() if isinstance(value, bool) else str(value),
              "env" if os.environ.get(name, "").strip() else "default")
             for name, value in security.describe().items()]
    if args.json:
        print(orjson.dumps({name: {"value": value, "from": source} for name, value, source in rows},
                           option=orjson.OPT_INDENT_2).decode())
        return
    width = max(len(name) for name, _, _ in rows)
    vwidth = min(48, max(len(value) for _, value, _ in rows))
    for name, value, source in rows:
        print(f"{name:<{width}}  {value or '(empty)':<{vwidth}}  {source}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="scoring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker until Ctrl-C")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("train", help="train LightGBM on simulated history (default) or on recorded events "
                                     "(--events / --from-topic); write model + metadata")
    p.add_argument("--pipeline", default="all", help="cart, fraud, or all (simulators only)")
    p.add_argument("--model-dir", default=str(settings.model_dir))
    p.add_argument("--if-missing", action="store_true", help="skip pipelines whose model exists")
    p.add_argument("--events", metavar="PATH", help="JSON Lines of input events (gzip accepted)")
    p.add_argument("--from-topic", metavar="TOPIC", help="a topic's retained history (BROKER_URL)")
    p.add_argument("--since", metavar="ISO|MS", help="first event time to train on (inclusive)")
    p.add_argument("--until", metavar="ISO|MS", help="event time to stop before (exclusive)")
    p.add_argument("--labels", metavar="PATH", help="fraud: JSON Lines of txn_id, label (0/1)")
    p.add_argument("--labelled-only", action="store_true", help="fraud: train on labelled transactions only")
    p.add_argument("--holdout", type=float, default=0.2, help="share held out, last by event time")
    p.add_argument("--rounds", type=int, default=None, help="boosting rounds (default: as the simulator training)")
    p.add_argument("--promote-local", action="store_true",
                   help="make the new version the current model even if there is one")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="the model registry under MODEL_DIR")
    models = p.add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="versions of a pipeline's model, the current one marked")
    p.add_argument("pipeline", choices=["cart", "fraud"])
    p.add_argument("--model-dir", default=str(settings.model_dir))
    p.add_argument("--json", action="store_true", help="metadata of every version as JSON")
    p.set_defaults(func=cmd_models_list)

    p = sub.add_parser("generate", help="produce realistic events at a rate")
    p.add_argument("--pipeline", default="cart", choices=["cart", "fraud"])
    p.add_argument("--rate", type=float, default=50)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--duration", type=float, default=0, help="seconds; 0 = until stopped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--unkeyed", action="store_true", help="send without keys (exercises repartitioning)")
    p.add_argument("--broker", default=settings.broker_url)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("replay-dead-letters", help="send chosen dead letters back to their input topic, once")
    p.add_argument("--stage", help="only letters of this stage (decode, validate, score, publish, ...)")
    p.add_argument("--exception", help="only letters of this exception class")
    p.add_argument("--topic", help="only letters of this source topic")
    p.add_argument("--partition", type=int, help="only letters of this source partition")
    p.add_argument("--offsets", help="only letters of this source offset range, e.g. 100-200")
    p.add_argument("--max-replays", type=int, default=3, help="skip an event replayed this often already")
    p.add_argument("--again", action="store_true", help="also letters that an earlier run replayed")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; send nothing")
    p.add_argument("--broker", default=settings.broker_url)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="broker (unless BROKER_URL is set) + worker + generators (with the "
                                   "embedded broker, or --generate)")
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=None,
                   help="start the event generators (default: with the embedded broker only, never into "
                        "a BROKER_URL cluster unless asked)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the effective configuration (secrets masked) and where each "
                                      "value came from")
    p.add_argument("--json", action="store_true", help="as JSON: {VARIABLE: {value, from}}")
    p.set_defaults(func=cmd_config)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
