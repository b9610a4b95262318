"""A short crash soak in `make test` (`make chaos` runs the long one, tests/chaos.py): both pipelines
under load, keyed by both partitioners and unkeyed, a few SIGKILLs (every second one with the
local store wiped), a second worker joining, a moment of refused outputs. Nothing lost, nothing
counted twice, nothing left uncommitted."""
from __future__ import annotations

from tests import chaos


def test_a_short_crash_soak_loses_nothing_and_counts_nothing_twice(tmp_path):
    report = chaos.run(events=1600, rate=80, kills=4, seed=7, wipe_every=2, workdir=tmp_path, drain_timeout=180)
    assert report.kills >= 4 and report.wipes >= 2
    assert report.missing == 0, report.line()
    assert report.wrong_states == 0, report.line()
    assert report.lagging == [], report.line()
