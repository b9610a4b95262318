"""Profile the worker while it drains pre-produced input (needs py-spy: `pip install py-spy`).

  python -m bench.profile [--events 150000] [--seconds 15] [--out profile]
  python -m bench.profile --users 1000000 --zipf 1 --state --delay 1 --seconds 5   (as make bench-scale)
  python -m bench.profile --pipeline fraud   (a fraud-only worker draining transactions)

Writes <out>.txt (collapsed stacks, for grep or a flame-graph tool) and prints the functions with
the most samples, inclusive and by leaf.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import tempfile
from pathlib import Path

from app.dev.broker import EmbeddedBroker
from bench.common import Worker, create_topics, produce_all, say, simulated
from bench.recovery import CHANGELOG, write_changelog

TOPICS = {"cart": ("cart_events", "personalization_scores"), "fraud": ("transactions", "fraud_decisions")}
KEY_FIELDS = {"cart": "user_id", "fraud": "card_id"}


def top(collapsed: Path, n: int = 40) -> str:
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = stack.split(";")
        for f in set(frames):
            incl[f] += c
        leaf[frames[-1]] += c
    out = [f"total samples {total}", "-- inclusive --"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(n)]
    out += ["-- leaf (self) --"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in leaf.most_common(n)]
    return "\n".join(out)


async def run(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    worker = None
    try:
        source, output = TOPICS[args.pipeline]
        await create_topics(broker.bootstrap, [source, output, CHANGELOG])
        if args.state:  # every user has a state, restored before the drain
            await write_changelog(broker.bootstrap, args.users, applied=False)
        await produce_all(broker.bootstrap, source,
                          simulated(args.pipeline, args.events, args.users, 1, "p", zipf=args.zipf),
                          key_field=KEY_FIELDS[args.pipeline])
        alone = args.state or args.pipeline != "cart"
        worker = Worker(broker.url, workdir, env={"PIPELINES": args.pipeline} if alone else None).start()
        await worker.ready(300)
        await asyncio.sleep(args.delay)  # group join, then steady draining
        say(f"recording {args.seconds} s of worker pid {worker.pid}")
        py_spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
        # --gil: only samples holding the GIL, i.e. where the worker's CPU goes (not its waits)
        subprocess.run([py_spy, "record", "--pid", str(worker.pid), "--duration", str(args.seconds),
                        "--rate", "200", *([] if args.all_threads else ["--gil"]), "--format", "raw",
                        "--output", args.out + ".txt", "--nonblocking"], check=True, capture_output=True)
    finally:
        if worker:
            worker.stop()
        broker.stop()
    print(top(Path(args.out + ".txt"), args.top))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", choices=sorted(TOPICS), default="cart",
                   help="whose events to drain; fraud runs a fraud-only worker")
    p.add_argument("--events", type=int, default=150_000)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--delay", type=float, default=6)
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--out", default="profile")
    p.add_argument("--all-threads", action="store_true", help="every running thread, not only the GIL holder")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--zipf", type=float, default=0.0, help="users picked Zipf-like (user k about k**-s as often)")
    p.add_argument("--state", action="store_true",
                   help="every user has a state in the changelog, as in make bench-scale (a cart-only worker)")
    args = p.parse_args()
    if args.state and args.pipeline != "cart":
        p.error("--state restores cart users' states: only with --pipeline cart")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
