"""Time `scoring train --events` on a million recorded cart events.

    .venv/bin/python -m bench.train_recorded [--events 1000000] [--rounds N] [--workdir DIR] [--keep]

Writes a JSON Lines file of simulated shoppers (training/cart_sim.py; the first N events by event
time, without the simulator's label), then runs the real command on it in a process of its own,
into a fresh model directory, and prints the wall time and peak memory of that process. Not part of
the test suite; nothing is left behind unless --keep.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
EVENTS_PER_USER_14_DAYS = 43.5  # cart_sim, measured: 4,000 users over 14 days give 174,090 events


def write_events(path: Path, n: int, seed: int = 1) -> int:
    from training import cart_sim

    users = int(n / EVENTS_PER_USER_14_DAYS * 1.05) + 1
    events = cart_sim.simulate(users, 14, seed)
    with open(path, "wb") as f:
        for e in events[:n]:
            e.pop("_label", None)
            f.write(orjson.dumps(e))
            f.write(b"\n")
    return min(n, len(events))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=None, help="default: the command's (200 for cart)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the events file and the model")
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-recorded-"))
    workdir.mkdir(parents=True, exist_ok=True)
    events_file, model_dir = workdir / "cart_events.jsonl", workdir / "models"
    try:
        t0 = time.monotonic()
        n = write_events(events_file, args.events)
        size_mb = events_file.stat().st_size / 1e6
        print(f"wrote {n:,} events ({size_mb:.0f} MB) to {events_file} in {time.monotonic() - t0:.1f}s", flush=True)
        cmd = [sys.executable, "-m", "app.cli", "train", "--pipeline", "cart", "--events", str(events_file),
               "--model-dir", str(model_dir)] + (["--rounds", str(args.rounds)] if args.rounds else [])
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        seconds = time.monotonic() - t0
        print(proc.stdout, end="")
        if proc.returncode != 0:
            raise SystemExit(f"scoring train failed ({proc.returncode})")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"\nscoring train on {n:,} events: {seconds:.1f} s wall ({n / seconds:,.0f} events/s), "
              f"peak memory {peak_mb:,.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
