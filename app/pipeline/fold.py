"""One key's events folded onto its state record: the idempotent part of the pipeline, pure.

A key's record is `{"state": ..., "applied": {stream: last offset}, "replayed": [lineage, ...]}`:
the pipeline's own state (`domain/`) and what is needed to recognise an event already in it
(`app/pipeline/lineage.py`: per stream of records the last offset applied; replays of dead letters by their
identity, the last REPLAYED_MAX of them). An event found in the record is a duplicate: its output was
delivered before, and it changes nothing.
"""
from __future__ import annotations

from app.pipelines import Pipeline

# Replayed events applied per key, remembered by lineage so that a second replay of the same dead
# letter changes nothing; the oldest is forgotten first (bounded state).
REPLAYED_MAX = 32
# Streams a key's record remembers an offset of: two per partition of its input topic (the records
# keyed right, and those that took the hop), so inputs of up to 512 partitions. The hop's origin
# headers name the stream, and anyone can write them: without a bound, forged partitions grew a
# record past what the changelog takes (20,000 of them: 980 KB), and the worker exited on its write.
STREAMS_MAX = 1024


class CorruptState(ValueError):
    """A key's stored record is not one this worker writes. The changelog it is restored from can be
    written by anyone who can write the topic: the key's events become dead letters (replayable once
    the record is fixed), the record stays as it is, and the stream goes on."""


def unpack(pipeline: Pipeline, record) -> tuple[dict, dict, list]:
    """(state, applied, replayed) of a key's stored record, checked as far as the fold relies on it
    (the state's own fields are the domain's: its functions fail per event); a new state for None.
    Once per key and batch: plain loops and `type() is`, about half the time of `all()` over generators."""
    if record is None:
        return pipeline.new_state(), {}, []
    if type(record) is not dict:
        raise CorruptState(f"the stored state record is not an object: {str(record)[:120]}")
    state, applied, replayed = record.get("state"), record.get("applied"), record.get("replayed")
    if type(state) is not dict:
        raise CorruptState("the stored state record has no 'state' object")
    if type(applied) is not dict:
        raise CorruptState("the stored state record's 'applied' is not a map of offsets")
    for offset in applied.values():
        if type(offset) is not int:
            raise CorruptState("the stored state record's 'applied' is not a map of offsets")
    if len(applied) > STREAMS_MAX:
        raise CorruptState(f"the stored state record's 'applied' has {len(applied)} streams, more than {STREAMS_MAX}")
    if replayed is None:
        return state, dict(applied), []
    if type(replayed) is not list:
        raise CorruptState("the stored state record's 'replayed' is not a list of lineages")
    for lineage in replayed:
        if type(lineage) is not str:
            raise CorruptState("the stored state record's 'replayed' is not a list of lineages")
    return state, dict(applied), list(replayed)  # copied once per key: the record is shared with readers


class Item:
    """One source record on its way through the batch."""

    __slots__ = ("record", "origin", "stream", "replay", "value", "key", "route", "features", "state",
                 "score", "shadow", "reasons", "stage", "error", "attempts", "duplicate", "output", "encoded",
                 "outgoing")

    def __init__(self, record) -> None:
        self.record = record
        self.origin = (record.topic, record.partition, record.offset)  # until its headers are read
        self.stream = None
        self.replay = None
        self.value = None
        self.key = None
        self.route = None  # the key's bytes and the partitioner's hash of them, once admitted
        self.features = None
        self.state = None  # the key's state after this event, once applied
        self.score = None
        self.shadow = None  # the challenger's score, when one scores in shadow
        self.reasons = None
        self.stage = None
        self.error = None
        self.attempts = 1
        self.duplicate = False  # already in the state: its output was delivered before
        self.output = None
        self.encoded = None
        self.outgoing = None  # the output record to publish

    def fail(self, stage: str, error: BaseException, attempts: int = 1) -> None:
        # A dead letter keeps the error's class and message. Its traceback would keep the frames
        # that raised it, and through their locals the whole batch, in a cycle with this item.
        error.__traceback__ = error.__context__ = error.__cause__ = None
        self.stage, self.error, self.attempts = stage, error, attempts

    @property
    def ok(self) -> bool:
        return self.stage is None and not self.duplicate

    def reset(self) -> None:
        """Before the key is folded again: what the last fold gave it is forgotten."""
        self.features = self.state = self.score = self.shadow = self.reasons = self.outgoing = None
        self.duplicate = False


def fold(pipeline: Pipeline, record: dict | None, items: list[Item]) -> tuple[dict, list]:
    """Apply one key's events in order to its state record; each applied item gets its features and
    its `state` after it. Items that failed already are left out; an item found in the record (a
    replay) is marked a duplicate. Returns the `applied` map and `replayed` list after the last one.
    Raises `CorruptState` for a record it cannot read.
    The one fold of the pipeline: a key is folded again, from the same record, when one of its events
    fails later (scoring, output)."""
    state, applied, replayed = unpack(pipeline, record)
    apply, features, width = pipeline.apply, pipeline.features, len(pipeline.feature_names)
    for it in items:
        if it.stage is not None:
            continue
        replay = it.replay
        if applied.get(it.stream, -1) >= it.origin[2] or replay is not None and replay.identity in replayed:
            it.duplicate = True
            continue
        if len(applied) >= STREAMS_MAX and it.stream not in applied:
            it.fail("headers", ValueError(f"the key's record remembers {STREAMS_MAX} streams already, not "
                                          f"{it.stream!r:.60}: a forged origin partition?"))
            continue
        try:
            new = apply(state, it.value)
            it.features = features(new, it.value)
            if len(it.features) != width:  # a state of the wrong shape (restored from anyone's bytes)
                raise ValueError(f"{len(it.features)} features instead of {width}")
        except Exception as exc:
            it.fail("features", exc)
            continue
        state = it.state = new
        applied[it.stream] = it.origin[2]
        if replay is not None:
            replayed.append(replay.identity)
            if len(replayed) > REPLAYED_MAX:
                del replayed[0]
    return applied, replayed


def record_of(state: dict, applied: dict, replayed: list) -> dict:
    return {"state": state, "applied": applied, "replayed": replayed} if replayed else \
        {"state": state, "applied": applied}


def last_state(pipeline: Pipeline, before: dict | None, its: list[Item], folded: tuple[dict, list]) -> dict | None:
    """The record to write for one key: after its last delivered event; else, if any event was a
    replay, the record as it was (rewritten: the local store may hold a write whose changelog
    delivery a crash interrupted); else nothing."""
    applied = [it for it in its if it.state is not None]
    if not applied:
        return before if any(it.duplicate for it in its) else None
    if all(it.ok for it in applied):  # the common case: every event folded was delivered
        return record_of(applied[-1].state, *folded)
    # some failed after the fold (their outputs were not delivered): the delivered ones are a prefix
    delivered = [it for it in applied if it.ok]
    if not delivered:
        return before if any(it.duplicate for it in its) else None
    return record_of(delivered[-1].state, *fold(pipeline, before, [it for it in its if it.ok or it.duplicate]))


def fail_after_undelivered(by_key: dict[str, list[Item]]) -> None:
    """An event whose output was not delivered stays out of the state, so the later events of its
    key, featurised on a state that holds it, go with it: dead letters too, replayed after it."""
    for its in by_key.values():
        first = next((it for it in its if it.stage == "publish"), None)
        if first is None:
            continue
        for it in its[its.index(first) + 1:]:
            if it.ok:
                it.fail("publish", RuntimeError(
                    f"an earlier event of this key was not delivered: {first.error!r:.200}"), first.attempts)
