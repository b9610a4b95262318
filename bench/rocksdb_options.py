"""RocksDB options for the table stores, chosen by measurement (issue 18).

  python -m bench.rocksdb_options [--users 1000000]     (about a minute)

Four databases (a table's partitions) hold `users` records of the size the worker writes (about
380 bytes of JSON state each); for each set of options: the time to write them in batches of 5,000
without the WAL (as the worker does); the time per key of first reads, each key once, in multi-gets
of 500 (the distinct users of 200k events picked Zipf-like, users k about k**-1 as often: what a
freshly started or restored worker reads before its own cache of written records holds them); the
time per key of multi-gets of 2,000 keys picked Zipf-like, repeats and all (hot keys and a long
tail); the bytes on disk after a flush, and the memory the process holds (RSS) after the reads.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import rocksdict

from app.kafka import patches
from bench.common import RESULTS, proc_status, say

PARTITIONS = 4


def options(block_cache: int, bloom_bits: float, compression: str, write_buffer: int,
            cache: rocksdict.Cache | None = None) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(write_buffer)
    opts.set_max_write_buffer_number(3)
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(bloom_bits, True)
    table.set_block_cache(cache or rocksdict.Cache(block_cache))
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(getattr(rocksdict.DBCompressionType, compression)())
    return opts


def record(i: int) -> bytes:
    state = {"session_id": f"u{i}:1700000000000", "session_start": 1700000000000, "last_ts": 1700000000000 + i,
             "prev_ts": 1700000000000, "events": i % 40, "page_views": 3, "product_views": 5, "adds": 1,
             "removes": 0, "checkouts": 0, "cart_items": 2, "cart_value": 31.5, "categories": ["books", "games"],
             "last_add_ts": 1700000000000, "activity": [1.734, 2.9, 3.1], "last_purchase_ts": None,
             "purchases_total": i % 3, "sessions_total": 1 + i % 7}
    return orjson.dumps({"state": state, "applied": {"cart_events:0": i}})


def run(name: str, users: int, opts_for, workdir: Path, rng: random.Random) -> dict:
    path = workdir / name
    dbs = []
    for p in range(PARTITIONS):
        db = rocksdict.Rdict(str(path / f"p{p}"), options=opts_for())
        write = rocksdict.WriteOptions()
        write.disable_wal = True
        db.set_write_options(write)
        dbs.append(db)
    t0 = time.perf_counter()
    for start in range(0, users, 5000):
        batches = [rocksdict.WriteBatch(raw_mode=True) for _ in range(PARTITIONS)]
        for i in range(start, min(users, start + 5000)):
            batches[i % PARTITIONS].put(b"u%d" % i, record(i))
        for db, batch in zip(dbs, batches):
            db.write(batch)
    write_s = time.perf_counter() - t0
    for db in dbs:
        db.flush()
    first = list(dict.fromkeys(int(users ** rng.random()) - 1 for _ in range(200_000)))
    t0 = time.perf_counter()
    for start in range(0, len(first), 500):
        by_db: dict[int, list] = {}
        for k in first[start:start + 500]:
            by_db.setdefault(k % PARTITIONS, []).append(b"u%d" % k)
        for p, ks in by_db.items():
            dbs[p].get(ks)
    first_s = time.perf_counter() - t0
    reads = 0
    t0 = time.perf_counter()
    for _ in range(50):
        keys = [int(users ** rng.random()) - 1 for _ in range(2000)]  # log-uniform: key k about k**-1
        by_db: dict[int, list] = {}
        for k in keys:
            by_db.setdefault(k % PARTITIONS, []).append(b"u%d" % k)
        for p, ks in by_db.items():
            got = dbs[p].get(ks)
            assert all(v is not None for v in got)
        reads += len(keys)
    read_s = time.perf_counter() - t0
    # a new user's first event: its key is in no database (the bloom filter should say so)
    t0 = time.perf_counter()
    for j in range(50):
        ks = [b"u%d" % (users + j * 2000 + i) for i in range(2000)]
        for p in range(PARTITIONS):
            got = dbs[p].get(ks[p::PARTITIONS])
            assert all(v is None for v in got)
    absent_s = time.perf_counter() - t0
    rss = proc_status(os.getpid()).get("VmRSS")
    for db in dbs:
        db.close()
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    return {"options": name, "write_us_per_key": round(write_s / users * 1e6, 2),
            "first_read_us_per_key": round(first_s / len(first) * 1e6, 2),
            "read_us_per_key": round(read_s / reads * 1e6, 2),
            "absent_us_per_key": round(absent_s / (50 * 2000) * 1e6, 2), "disk_bytes_per_key": round(disk / users),
            "rss_mib_after": rss}


SHARED = {}


def _shared_cache() -> rocksdict.Cache:
    """One block cache for every database of the process, as the worker shared it before it went without."""
    if "cache" not in SHARED:
        SHARED["cache"] = rocksdict.Cache(256 << 20)
    return SHARED["cache"]


CANDIDATES = {
    # Faust's defaults: a 2 GiB block cache of its own per database, 3 bloom bits per key, Snappy
    "faust default": lambda: options(2 << 30, 3, "snappy", 64 << 20),
    "bloom 10 bits": lambda: options(2 << 30, 10, "snappy", 64 << 20),
    "bloom 10, lz4": lambda: options(2 << 30, 10, "lz4", 64 << 20),
    "bloom 10, no compression": lambda: options(2 << 30, 10, "none", 64 << 20),
    "bloom 10, lz4, one 256 MiB cache, 16 MiB buffers": lambda: options(0, 10, "lz4", 16 << 20, cache=_shared_cache()),
    "the worker's: bloom 10, lz4, no block cache, 16 MiB buffers": patches.rocksdb_options,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rocksdb_options")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--one", help=argparse.SUPPRESS)  # one candidate, in a process of its own (its RSS)
    args = p.parse_args(argv)
    if args.one:
        workdir = Path(tempfile.mkdtemp(prefix="bench-rocksdb-"))
        result = run("db", args.users, CANDIDATES[args.one], workdir, random.Random(1))
        shutil.rmtree(workdir, ignore_errors=True)
        print(orjson.dumps({**result, "options": args.one}).decode())
        return
    results = []
    for name in CANDIDATES:
        say(f"rocksdb: {name}")
        done = subprocess.run([sys.executable, "-m", "bench.rocksdb_options", "--users", str(args.users), "--one", name],
                              capture_output=True, text=True, check=True)
        results.append(orjson.loads(done.stdout.strip().splitlines()[-1]))
        say(f"  {results[-1]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rocksdb-options-latest.json").write_bytes(orjson.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": "python -m bench.rocksdb_options",
         "users": args.users, "results": results}, option=orjson.OPT_INDENT_2))
    print("| options | write, us/key | first reads, us/key | Zipf multi-get, us/key | absent keys, us/key | "
          "disk, bytes/key | RSS after, MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['options']} | {r['write_us_per_key']} | {r['first_read_us_per_key']} | {r['read_us_per_key']} | "
              f"{r['absent_us_per_key']} | {r['disk_bytes_per_key']} | {r['rss_mib_after']} |")


if __name__ == "__main__":
    main()
