"""The crash-loop breaker's note, as a worker leaves it when it dies (app/pipeline/quarantine.py)."""
from __future__ import annotations

from collections import namedtuple

from app.pipeline.quarantine import DEATHS, Quarantine

TP = namedtuple("TP", "topic partition")
Rec = namedtuple("Rec", "offset")
A, B = TP("cart_events", 0), TP("cart_events", 1)


def spans(*parts):
    return [(tp, [Rec(o) for o in range(lo, hi + 1)]) for tp, lo, hi in parts]


def test_a_clean_run_leaves_no_suspects_and_one_piece(tmp_path):
    note = tmp_path / "cart.json"
    q = Quarantine(note)
    batch = spans((A, 0, 9), (B, 0, 4))
    assert q.pieces(batch) == [(batch, None)]
    q.begin(batch)
    q.end(batch)
    assert Quarantine(note).suspects == [], "a batch that ended is no death"


def test_a_death_makes_suspects_handled_alone_and_two_deaths_alone_set_one_aside(tmp_path):
    note = tmp_path / "cart.json"
    Quarantine(note).begin(spans((A, 10, 14)))  # ... and the process dies here

    q = Quarantine(note)
    assert q.suspects == [["cart_events", 0, 10, 14, 0]], "a death in a batch blames no record yet"
    pieces = q.pieces(spans((A, 8, 15), (B, 3, 3)))
    shape = [([(tp.partition, [r.offset for r in rs]) for tp, rs in part], deaths) for part, deaths in pieces]
    assert shape == [([(0, [8, 9])], None), ([(0, [10])], 0), ([(0, [11])], 0), ([(0, [12])], 0),
                     ([(0, [13])], 0), ([(0, [14])], 0), ([(0, [15]), (1, [3])], None)]
    q.begin(pieces[1][0])
    q.end(pieces[1][0])  # 10 was handled: no longer a suspect on its own
    q.begin(pieces[2][0])  # 11 alone, and the process dies again

    q = Quarantine(note)
    assert q.deaths("cart_events", 0, 11) == 1
    q.begin(spans((A, 11, 11)))  # and again

    q = Quarantine(note)
    assert q.deaths("cart_events", 0, 11) == DEATHS, "set aside at this start"
    assert q.deaths("cart_events", 0, 12) == 0 and q.deaths("cart_events", 0, 10) is None
    q.begin(spans((A, 11, 11)))
    q.end(spans((A, 11, 14)))
    assert Quarantine(note).suspects == [], "handled past them: forgotten"


def test_an_unreadable_note_is_ignored(tmp_path):
    note = tmp_path / "cart.json"
    note.write_bytes(b'{"inflight": [["cart_events", 0, 1')  # cut short
    assert Quarantine(note).suspects == []
    note.write_bytes(b'{"inflight": [["cart_events", -1, "x", 2]], "suspects": [[1, 2]]}')
    assert Quarantine(note).suspects == []
