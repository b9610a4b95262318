"""`scoring` command line: argument parsing and dispatch; the commands live in app/dev (broker,
generator, run), app/ops (replay, models, config) and training/.

The worker itself is Faust's: `faust -A app worker -l info`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from app.settings import bootstrap_servers, current

log = logging.getLogger("scoring")


# -- broker -------------------------------------------------------------------------------------

def cmd_broker(args) -> None:
    from app.dev.broker import EmbeddedBroker

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # so that sigwait, not the default action, gets them
    with EmbeddedBroker(port=args.port) as broker:
        print(f"BROKER_URL={broker.url}  (pid {broker.pid}); Ctrl-C stops it", flush=True)
        signal.sigwait(stop_signals)


# -- training -----------------------------------------------------------------------------------

def trainers() -> dict:
    from training import train_cart, train_fraud

    return {"cart": train_cart.train, "fraud": train_fraud.train}


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
            rec = recorded.read_topic(args.pipeline, args.from_topic, current().broker_url, since, until)
        labels = recorded.read_labels(Path(args.labels)) if args.labels else None
        result = recorded.train(rec, Path(args.model_dir), labels, args.labelled_only, args.holdout,
                                args.rounds, args.promote_local)
    except recorded.TrainingError as exc:
        raise SystemExit(f"scoring train: {exc}") from None
    print("\n".join(recorded.summary(rec, result)))
    print(f"version: {result.meta['version']}", flush=True)


def _models_context():
    from app.topology import Topology

    settings = current()
    topology = Topology.from_settings(settings)
    return bootstrap_servers(settings.broker_url), topology


def cmd_models_list(args) -> None:
    from app.ops import models

    bootstrap, topology = _models_context()
    try:
        found = asyncio.run(asyncio.wait_for(models.promoted(bootstrap, topology.model_control, topology.pipelines), 10))
        roles = found.get(args.pipeline, {})
        promoted = {role: p.version for role, p in roles.items()} or {}
    except Exception as exc:  # no broker here: the list from MODEL_DIR alone
        log.info("model control topic %s not read: %r", topology.model_control, exc)
        promoted = None
    print(models.listing(Path(args.model_dir), args.pipeline, args.json, promoted))


def cmd_models_change(args) -> None:
    """promote, rollback, shadow: published on the control topic, applied by every running worker."""
    from app.ops import models

    bootstrap, topology = _models_context()
    pipeline = topology.pipelines[args.pipeline]
    model_dir = Path(args.model_dir)
    if args.models_command == "promote":
        change = models.promote(bootstrap, topology.model_control, model_dir, pipeline, args.version, topology.pipelines)
    elif args.models_command == "rollback":
        change = models.rollback(bootstrap, topology.model_control, model_dir, pipeline, topology.pipelines)
    else:
        if bool(args.version) == args.off:
            raise SystemExit("scoring models shadow: give a VERSION, or --off")
        change = models.shadow(bootstrap, topology.model_control, model_dir, pipeline, None if args.off else args.version)
    print(asyncio.run(change))


# -- generator ----------------------------------------------------------------------------------

def cmd_generate(args) -> None:
    from app.dev.generator import generate
    from app.pipelines import configured

    sent = generate(configured()[args.pipeline], args.users, args.seed, args.rate, args.duration, args.unkeyed,
                    args.broker)
    print(f"generator: done, {sent} events")


# -- dead-letter replay -------------------------------------------------------------------------

def cmd_replay(args) -> None:
    from app.ops import replay
    from app.topology import Topology

    offsets = None
    if args.offsets:
        lo, _, hi = args.offsets.partition("-")
        if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise SystemExit(f"scoring replay-dead-letters: --offsets {args.offsets!r}: give FIRST-LAST, e.g. 100-200")
        offsets = (int(lo), int(hi))
    choice = replay.Choice(stage=args.stage, exception=args.exception, topic=args.topic, partition=args.partition,
                           offsets=offsets, max_replays=args.max_replays, again=args.again)
    topology = Topology.from_settings(current())
    outcome = asyncio.run(replay.replay(bootstrap_servers(args.broker), topology.dead_letters, topology.inputs, choice,
                                        args.dry_run))
    for line in outcome.replayed:
        print(line)
    print(outcome.summary(args.dry_run))


# -- run, config ----------------------------------------------------------------------------------

def cmd_run(args) -> None:
    from app.dev.run import run

    run(current(), args.rate, args.users, args.generate)


def cmd_config(args) -> None:
    """Bad settings never get here: reading them stops the process with one line naming each."""
    from app.ops.config import show

    print(show(current(), args.json))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = current()
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
    for name, help_ in (("promote", "every running worker of the pipeline switches to VERSION between two batches"),
                        ("rollback", "back to the version promoted before the current one"),
                        ("shadow", "VERSION scores every event beside the champion, deciding nothing (--off ends it)")):
        p = models.add_parser(name, help=help_)
        p.add_argument("pipeline", choices=["cart", "fraud"])
        if name == "promote":
            p.add_argument("version", help="a version under MODEL_DIR/<pipeline>/, or an MLflow URI models:/name@alias")
        elif name == "shadow":
            p.add_argument("version", nargs="?", help="a version under MODEL_DIR/<pipeline>/, or models:/name@alias")
            p.add_argument("--off", action="store_true", help="no challenger any more")
        p.add_argument("--model-dir", default=str(settings.model_dir))
        p.set_defaults(func=cmd_models_change)

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
