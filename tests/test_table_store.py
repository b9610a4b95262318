"""Table stores run without RocksDB's write-ahead log (app/kafka/patches.py, patch 4).

A process writes through Faust's own `RocksDBOptions.open` and dies without closing the database:
with the WAL its unflushed writes come back when the database is reopened (the control), without
it they are gone; either way the persisted changelog offset never survives without the values
written before it. Recovery from the changelog is what then restores the state (the crash tests
of tests/test_failure_semantics.py show that end to end).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import rocksdict

from tests.harness import ROOT

WRITE_AND_DIE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    if sys.argv[2] == "patched":
        from app.kafka import patches as faust_patches
        faust_patches.install(10)
    from faust.stores.rocksdb import RocksDBOptions
    db = RocksDBOptions().open(Path(sys.argv[1]))
    for i in range(1000):
        db.put(b"key-%d" % i, b"value-%d" % i)
    db.put(b"__faust\\x00offset__", b"999")  # as Store.set_persisted_offset writes it, after the values
    os._exit(0)  # a crash: nothing flushed, nothing closed
""")


@pytest.mark.parametrize("mode, survives", [("patched", False), ("stock", True)])
def test_a_crash_loses_unflushed_writes_only_without_the_wal(tmp_path, mode, survives):
    path = tmp_path / "store.db"
    subprocess.run([sys.executable, "-c", WRITE_AND_DIE, str(path), mode], cwd=ROOT, check=True)
    db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))
    try:
        values = [db.get(b"key-%d" % i) for i in range(1000)]
        offset = db.get(b"__faust\x00offset__")
    finally:
        db.close()
    assert all((v is not None) == survives for v in values)
    assert (offset is not None) == survives


def test_a_recovery_step_that_times_out_exits_the_worker_instead_of_ending_recovery(monkeypatch):
    """Found by review: mode reports a step's timeout (a broker outage longer than
    broker_request_timeout) as the service stopped; Faust's recovery loop then ended quietly and the
    worker stayed in its group, its partitions paused and /health 200. Patch 8 exits instead; a real
    stop still ends recovery."""
    import asyncio

    import mode
    from faust.tables.recovery import ServiceStopped

    from app.kafka import patches

    class Step(mode.Service):
        signal_recovery_start = None

    exits = []
    monkeypatch.setattr(patches.os, "_exit", exits.append)

    async def main():
        step = Step()
        step.signal_recovery_start = asyncio.Event()
        with pytest.raises(ServiceStopped):  # what Faust's own _wait does with it: the loop breaks
            await patches._recovery_wait(step, asyncio.sleep(5), timeout=0.05)
        with pytest.raises(ServiceStopped):  # past the exit, which the test made return
            await patches.recovery_wait_or_exit(step, asyncio.sleep(5), timeout=0.05)
        assert exits == [70]
        step._stopped.set()
        with pytest.raises(ServiceStopped):
            await patches.recovery_wait_or_exit(step, asyncio.sleep(5), timeout=0.05)
        assert exits == [70], "a real stop is no reason to exit"
    asyncio.run(main())
