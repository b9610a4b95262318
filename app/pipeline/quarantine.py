"""A crash-loop breaker: a record that killed the worker twice is set aside as a dead letter.

An exception in one record's handling makes that record a dead letter (app/pipeline/processor.py). A record
that kills the process instead (a native crash in a parser or the model, memory exhausted) would be
replayed into every worker that takes its partition, and kill each in turn. So before each batch
the agent notes on local disk which records it is about to handle, and clears the note after:
- a note found at start means the last process died while handling those records: they become
  suspects, handled one at a time from then on, each with a note of its own;
- a record that was alone in the note at two deaths has killed the worker twice: it is set aside
  as a dead letter (stage `quarantine`) without being handled. A poison pill in a batch kills the
  worker three times in all (with its batch, then twice alone); a kill from outside (an operator,
  the OOM killer) would have to hit the same record alone twice to set it aside.

A clean stop clears the note, so only a death counts. The note is a small file written per batch
(no fsync: it has to survive the death of the process, not of the machine). It lives in DATA_DIR, so
each worker keeps its own: a record that kills workers on several machines is set aside by each
after two deaths there. The list of suspects is bounded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

SUSPECTS_MAX = 1000
DEATHS = 2  # deaths while handling a record alone before it is set aside


class PoisonPill(Exception):
    """Raised for nothing: the reason a quarantined record is a dead letter."""


class Quarantine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.suspects: list[list] = []  # [topic, partition, first offset, last offset, deaths]
        self._load()

    def _load(self) -> None:
        try:
            note = orjson.loads(self.path.read_bytes())
            suspects = [s for s in note.get("suspects", []) if _valid(s, 5)]
            inflight = [s for s in note.get("inflight") or [] if _valid(s, 4)]
        except FileNotFoundError:
            return
        except Exception as exc:  # a note cut short by the death itself
            log.warning("unreadable crash note %s (%r): ignored", self.path, exc)
            return
        for topic, partition, lo, hi in inflight:
            # only a death with one record in flight counts against it: one in a batch says only that
            # some record of the batch may be at fault (or none: a kill from outside, the OOM killer)
            before = max((s[4] for s in suspects if s[:2] == [topic, partition] and s[2] <= lo and hi <= s[3]),
                         default=0)
            suspects.append([topic, partition, lo, hi, before + 1 if lo == hi else 0])
        if inflight:
            log.warning("the last worker process died while handling %s; those records are handled one at "
                        "a time, and one that kills the worker %d times is set aside as a dead letter",
                        ", ".join(f"{t}[{p}] {lo}..{hi}" for t, p, lo, hi in inflight), DEATHS)
        self.suspects = suspects[-SUSPECTS_MAX:]
        self._write(None)

    def deaths(self, topic: str, partition: int, offset: int) -> int | None:
        """How often the worker died while this record was in flight alone: None if it is no suspect."""
        found = None
        for t, p, lo, hi, deaths in self.suspects:
            if lo <= offset <= hi and p == partition and t == topic:
                found = max(found or 0, deaths)
        return found

    def pieces(self, spans: list[tuple]) -> list[tuple[list[tuple], int | None]]:
        """Cut a batch's spans ((tp, records) per partition) into pieces to handle one after the other:
        runs of ordinary records, and each suspect alone with its deaths. In order per partition."""
        if not self.suspects:
            return [(spans, None)]
        pieces, run = [], []
        for tp, records in spans:
            start = 0
            for i, r in enumerate(records):
                deaths = self.deaths(tp.topic, tp.partition, r.offset)
                if deaths is None:
                    continue
                if i > start:
                    run.append((tp, records[start:i]))
                if run:
                    pieces.append((run, None))
                    run = []
                pieces.append(([(tp, [r])], deaths))
                start = i + 1
            if start < len(records):
                run.append((tp, records[start:]))
        if run:
            pieces.append((run, None))
        return pieces

    def begin(self, spans: list[tuple]) -> None:
        self._write([[tp.topic, tp.partition, records[0].offset, records[-1].offset] for tp, records in spans])

    def end(self, spans: list[tuple]) -> None:
        """The records of `spans` were handled: the process did not die on them."""
        if self.suspects:
            done = {(tp.topic, tp.partition): records[-1].offset for tp, records in spans}
            kept = []
            for topic, partition, lo, hi, deaths in self.suspects:
                last = done.get((topic, partition), -1)
                if last < hi:
                    kept.append([topic, partition, max(lo, last + 1), hi, deaths])
            self.suspects = kept
        self._write(None)

    def _write(self, inflight: list | None) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"inflight": inflight, "suspects": self.suspects}))
        os.replace(tmp, self.path)


def _valid(entry, n: int) -> bool:
    return (isinstance(entry, list) and len(entry) == n and isinstance(entry[0], str)
            and all(isinstance(x, int) and x >= 0 for x in entry[1:]))


def open_for(data_dir: Path, pipeline: str) -> Quarantine:
    folder = Path(data_dir) / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    return Quarantine(folder / f"{pipeline}.json")
