"""One micro-batch of raw records through decode, routing, state, features, score, publish, commit.

The order of effects is what makes a crash harmless:
  1. outputs (scores, forwards, dead letters) are published and their delivery awaited;
  2. only then is the new state written to the table (and its changelog delivery awaited);
  3. only then are the source events acked, so Faust may commit their offsets.
A crash before 2 replays the events against the old state: same features, duplicate outputs.
A crash between 2 and 3 replays events whose state is already written: the per-key record of the
last applied offset of each stream (`applied`; a replayed dead letter by its lineage, see
app/lineage.py) recognises them and they are skipped, their outputs having been delivered in step 1.
So state is never double-counted and no event goes without an output.

An event contributes to state only if its output was delivered; a dead-lettered event does not,
so replaying its dead letter later applies it exactly once.

A replayed event found in the state rewrites its key's record to the changelog. The local store may
hold a write whose changelog delivery never completed (a crash between 2 and its confirmation):
without the rewrite, the skipped event would be committed while the changelog, which recovery and
every other worker trust, never learns of it.

State is written behind (step 2), for several batches at once: each batch's new records join a
buffer of unwritten ones (the newest per key), which later batches and the web view read; the
buffer is written after STATE_FLUSH_EVENTS events or STATE_FLUSH_MS, at once when a rebalance
empties the intake, and before a batch of another consumer generation. A key that several batches touch
is then written and changelogged once, not once per batch; the batches are acked together when that
write is confirmed. While a write's changelog delivery is awaited, the next batches are processed;
the next write waits for it, so state writes stay in order and the rewrite of a failed changelog
delivery cannot overtake a newer value. Outputs never wait for any of this.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from itertools import chain

import numpy as np

from app import deadletters, lineage, metrics
from app.codec import decode, encode
from app.errors import Poison, is_transient
from app.faults import Faults
from app.gate import Record, RetryPolicy, key_hash, publish, publish_until_acknowledged
from app.quarantine import PoisonPill
from app.scorer import Scorer
from app.usecases import UseCase

log = logging.getLogger(__name__)

# Replayed events applied per key, remembered by lineage so that a second replay of the same dead
# letter changes nothing; the oldest is forgotten first (bounded state).
REPLAYED_MAX = 32
ROUTES_MAX = 1 << 17  # cached key routes (bytes, partition); cleared when full


class Item:
    """One source record on its way through the batch."""

    __slots__ = ("record", "origin", "stream", "replay", "value", "key", "features", "state",
                 "score", "reasons", "stage", "error", "attempts", "duplicate", "output", "encoded", "outgoing")

    def __init__(self, record) -> None:
        self.record = record
        self.origin = (record.topic, record.partition, record.offset)  # until its headers are read
        self.stream = None
        self.replay = None
        self.value = None
        self.key = None
        self.features = None
        self.state = None  # the key's state after this event, once applied
        self.score = None
        self.reasons = None
        self.stage = None
        self.error = None
        self.attempts = 1
        self.duplicate = False  # already in the state: its output was delivered before
        self.output = None
        self.encoded = None
        self.outgoing = None  # the output record to publish

    def fail(self, stage: str, error: BaseException, attempts: int = 1) -> None:
        self.stage, self.error, self.attempts = stage, error, attempts

    @property
    def ok(self) -> bool:
        return self.stage is None and not self.duplicate


def fold(uc: UseCase, record: dict | None, items: list[Item]) -> tuple[dict, list]:
    """Apply one key's events in order to its state record; each applied item gets its features and
    its `state` after it. Items that failed already are left out; an item found in the record (a
    replay) is marked a duplicate. Returns the `applied` map and `replayed` list after the last one.
    The one fold of the pipeline: a key is folded again, from the same record, when one of its events
    fails later (see `Processor._score_all`)."""
    if record is None:
        state, applied, replayed = uc.new_state(), {}, []
    else:  # copied once per key: the record itself is shared with readers
        state, applied, replayed = record["state"], dict(record["applied"]), list(record.get("replayed", ()))
    apply, features = uc.apply, uc.features
    for it in items:
        if it.stage is not None:
            continue
        replay = it.replay
        if replay is not None and replay[0] in replayed or replay is None and applied.get(it.stream, -1) >= it.origin[2]:
            it.duplicate = True
            continue
        try:
            new = apply(state, it.value)
            it.features = features(new, it.value)
        except Exception as exc:
            it.fail("features", exc)
            continue
        state = it.state = new
        if replay is None:
            applied[it.stream] = it.origin[2]
        else:
            replayed.append(replay[0])
            if len(replayed) > REPLAYED_MAX:
                del replayed[0]
    return applied, replayed


def record_of(state: dict, applied: dict, replayed: list) -> dict:
    return {"state": state, "applied": applied, "replayed": replayed} if replayed else \
        {"state": state, "applied": applied}


def last_state(uc: UseCase, before: dict | None, its: list[Item], folded: tuple[dict, list]) -> dict | None:
    """The record to write for one key: after its last delivered event; else, if any event was a
    replay, the record as it was (rewritten, see above); else nothing."""
    applied = [it for it in its if it.state is not None]
    if not applied:
        return before if any(it.duplicate for it in its) else None
    if all(it.ok for it in applied):  # the common case: every event folded was delivered
        return record_of(applied[-1].state, *folded)
    # some failed after the fold (their outputs were not delivered): the delivered ones are a prefix
    delivered = [it for it in applied if it.ok]
    if not delivered:
        return before if any(it.duplicate for it in its) else None
    return record_of(delivered[-1].state, *fold(uc, before, [it for it in its if it.ok or it.duplicate]))


def dead_letter(item: Item, max_bytes: int, now_ms: int) -> Record:
    msg = item.record
    topic, partition, offset = item.origin
    key, value, headers = deadletters.build(
        key=msg.key, value=msg.value, input_headers=msg.headers, stage=item.stage, error=item.error,
        topic=topic, partition=partition, offset=offset, attempts=item.attempts, now_ms=now_ms,
        replay=item.replay, max_bytes=max_bytes)
    return Record(deadletters.TOPIC, key, value, headers, owner=item)


class Processor:
    def __init__(self, app, usecase: UseCase, table, scorer: Scorer, repartition_topic: str,
                 policy: RetryPolicy, faults: Faults, max_event_bytes: int, flush_events: int,
                 flush_ms: float, dead_letter_max_bytes: int = 512 * 1024) -> None:
        self.app = app
        self.uc = usecase
        self.table = table
        self.scorer = scorer
        self.repartition_topic = repartition_topic
        self.policy = policy
        self.faults = faults
        self.max_event_bytes = max_event_bytes
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.partitions = app.conf.topic_partitions
        self.m = metrics.for_pipeline(usecase.name)
        metrics.set_model(usecase.name, scorer.version)
        self.on_scored = None  # set by the web view: fed the scored items of each batch
        self.on_failure = None  # set by the agent: an unexpected error while confirming a state write
        # set by the agent: the topic-partitions this worker holds now (None: all it is handed)
        self.assignment = None
        self.flush_events, self.flush_s = flush_events, flush_ms / 1000.0
        self._confirming: asyncio.Future | None = None  # the last write's confirmation and acks
        # written behind: key -> (partition, newest record), and the batches whose state it holds
        self._unwritten: dict[str, tuple[int, dict]] = {}
        self._waiting: list = []
        self._waiting_events = 0
        self._waiting_since = 0.0
        self._routes: dict[str, tuple[bytes, int]] = {}

    def partition_of(self, key: bytes) -> int:
        """The key's partition: Kafka's default partitioner, as the producer uses for the repartition hop."""
        return key_hash(key) % self.partitions

    def _route(self, key: str) -> tuple[bytes, int]:
        """The state key's bytes and partition, cached: the same keys recur all the time."""
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= ROUTES_MAX:
                self._routes.clear()
            raw = key.encode()
            route = self._routes[key] = (raw, self.partition_of(raw))
        return route

    # -- stages ---------------------------------------------------------------------------------

    def _admit(self, items: list[Item]) -> tuple[dict[str, list[Item]], list[Item]]:
        """Read each record's identity, decode and validate it; group the valid items by state key
        (arrival order within a key), or set them aside for the repartition hop when they are not
        keyed by the state key or not on its partition. Whatever one record raises, of any class
        (msgspec raises RecursionError on deep nesting), makes that record a dead letter."""
        uc, hop = self.uc, self.repartition_topic
        schema, max_bytes, check, key_field, source = uc.schema, self.max_event_bytes, uc.check, uc.key_field, uc.source_topic
        crash = self.faults.crash_ids() if self.faults is not None else None
        by_key: dict[str, list[Item]] = {}
        forward = []
        for it in items:
            msg = it.record
            stage = "headers"
            try:
                if msg.topic == hop or msg.headers:
                    it.origin = lineage.origin_of(msg, source, hop)
                    it.replay = lineage.replay_of(msg, source)
                it.stream = lineage.stream_of(msg, hop, it.origin)
                stage = "decode"
                it.value = value = decode(msg.value, schema, max_bytes, check)
                if crash and value[uc.id_field] in crash:
                    self.faults.crash(value[uc.id_field])
                it.key = key = value[key_field]
                raw, partition = self._route(key)
            except Poison as exc:
                it.fail(exc.stage, exc)
                continue
            except Exception as exc:
                it.fail(stage, exc)
                continue
            if msg.topic != hop and (msg.key != raw or msg.partition != partition):
                forward.append(it)
            elif key in by_key:
                by_key[key].append(it)
            else:
                by_key[key] = [it]
        return by_key, forward

    def _records_before(self, by_key: dict[str, list[Item]], generation) -> dict[str, dict | None]:
        """Each key's state record: unwritten first, else the table's, read per partition (all events
        of a key are on the key's partition)."""
        unwritten, records = self._unwritten, {}
        keys_of: dict[int, list[str]] = defaultdict(list)
        for key, its in by_key.items():
            if key in unwritten:
                records[key] = unwritten[key][1]
            else:
                keys_of[its[-1].record.partition].append(key)
        for partition, keys in keys_of.items():
            records.update(zip(keys, self.table.read_many(partition, keys, generation)))
        return records

    async def _score_all(self, by_key: dict[str, list[Item]], before: dict[str, dict | None], folded: dict,
                         now_ms: int) -> None:
        """Score every folded event and build its output. An event that fails here leaves the state,
        so its key is folded again without it and the key's later events are scored again: no event
        is featurised on state that holds a dead letter."""
        todo = [it for its in by_key.values() for it in its if it.ok]
        while todo:
            await self._score(todo)
            for it in todo:
                if it.ok:
                    it.outgoing = self._output(it, now_ms)
            failed = {it.key for it in todo if it.stage in ("score", "output")}
            refold = [key for key in failed if any(it.ok for it in by_key[key])]
            todo = []
            for key in refold:
                its = by_key[key]
                for it in its:
                    it.features = it.state = it.score = it.reasons = it.outgoing = None
                    it.duplicate = False
                folded[key] = fold(self.uc, before[key], its)
                todo += [it for it in its if it.ok]

    async def _score(self, items: list[Item]) -> None:
        t0 = time.perf_counter()
        width = len(self.uc.feature_names)
        rows = np.fromiter(chain.from_iterable(it.features for it in items), dtype=np.float64,
                           count=len(items) * width).reshape(len(items), width)
        for attempt in range(1, self.policy.attempts + 1):
            try:
                if self.faults is not None:
                    self.faults.check_score(self.uc.name)
                    if self.faults.poisoned([it.value[self.uc.id_field] for it in items]):
                        raise ValueError("model rejected an input row")
                scores = self.scorer.predict(rows)
                break
            except Exception as exc:
                if is_transient(exc):
                    self.m.retries.labels("score").inc()
                    if attempt < self.policy.attempts:
                        await asyncio.sleep(self.policy.backoff_s(attempt))
                        continue
                    for it in items:
                        it.fail("score", exc, attempts=attempt)
                    return
                scores = self._score_each(items, rows)
                break
        self.m.score_seconds.observe(time.perf_counter() - t0)
        contributions = self._contributions(items, rows) if self.uc.reasons else None
        for i, (it, score) in enumerate(zip(items, scores.tolist())):
            if not it.ok:
                continue
            if not 0.0 <= score <= 1.0:  # NaN too
                it.fail("score", ValueError(f"model returned {score!r}"))
                continue
            it.score = score
            if contributions is not None:
                it.reasons = self._reasons(contributions[i])

    def _contributions(self, items: list[Item], rows: np.ndarray) -> np.ndarray:
        try:
            return self.scorer.contributions(rows)
        except Exception:  # a row LightGBM cannot explain: find it, as for the scores
            out = np.zeros((len(items), rows.shape[1] + 1))
            for i, it in enumerate(items):
                try:
                    out[i] = self.scorer.contributions(rows[i:i + 1])[0]
                except Exception as exc:
                    it.fail("score", exc)
            return out

    def _score_each(self, items: list[Item], rows: np.ndarray) -> np.ndarray:
        """A batch predict raised: isolate the row(s) that the model rejects."""
        scores = np.full(len(items), np.nan)
        for i, it in enumerate(items):
            try:
                if self.faults is not None and self.faults.poisoned([it.value[self.uc.id_field]]):
                    raise ValueError("model rejected this input row")
                scores[i] = self.scorer.predict(rows[i:i + 1])[0]
            except Exception as exc:
                it.fail("score", exc)
        return scores

    def _reasons(self, contrib: np.ndarray) -> list[dict]:
        top = np.argsort(-contrib[:-1])[: self.uc.reasons]
        return [{"feature": self.uc.feature_names[j], "contribution": round(float(contrib[j]), 4)}
                for j in top if contrib[j] > 0]

    def _output(self, item: Item, now_ms: int) -> Record | None:
        uc, v = self.uc, item.value
        try:
            body = {
                uc.id_field: v[uc.id_field],
                uc.key_field: item.key,
                "score": item.score,
                "model_version": self.scorer.version,
                "event_ts": v["ts"],
                "scored_at": now_ms,
                **uc.output(v, item.state, item.score, item.reasons),
                "features": item.features,
            }
            encoded = encode(body)
        except Exception as exc:
            item.fail("output", exc)
            return None
        item.output, item.encoded = body, encoded
        return Record(uc.output_topic, self._route(item.key)[0], encoded, owner=item)

    def _forward(self, item: Item) -> Record:
        """The record, untouched, to the key's partition of the repartition topic, with the
        coordinates of the record the producer wrote (any copy of those headers it carried is dropped)."""
        msg = item.record
        headers = [(deadletters.sendable_name(k), v) for k, v in (msg.headers or ()) if k not in lineage.ORIGIN]
        return Record(self.repartition_topic, self._route(item.key)[0], msg.value,
                      headers + lineage.origin_headers(item.origin), owner=item)

    # -- the batch ------------------------------------------------------------------------------

    async def handle(self, batch, set_aside: int | None = None) -> None:
        """Process an `app.intake.Batch`. It is acked once its state is written and confirmed, which
        may be after this returns (see `flush`); `drain()` writes and waits for that.

        `set_aside`: the batch's one record killed the worker that many times (app/quarantine.py);
        it becomes a dead letter without being read."""
        # the consumer generation the batch was taken in: state cached by the table is only
        # trusted within one generation, and what was folded in another is written first
        generation = batch.generation
        if self._waiting and self._waiting[-1].generation != generation:
            await self.flush()
        items = [Item(r) for r in batch.records]
        if set_aside is not None:
            for it in items:
                it.fail("quarantine", PoisonPill(f"the worker died {set_aside} times while handling this record"),
                        attempts=set_aside)
        by_key, forward = self._admit([it for it in items if it.stage is None])
        before = self._records_before(by_key, generation)
        folded = {key: fold(self.uc, before[key], its) for key, its in by_key.items()}
        now_ms = int(time.time() * 1000)
        await self._score_all(by_key, before, folded, now_ms)
        local = [it for its in by_key.values() for it in its]

        # 1. outputs: scores and repartition hops, retried in place; then the dead letters of
        #    everything that failed, which wait out an outage (there is nowhere further to put them)
        records = [it.outgoing for it in local if it.ok]
        records += [self._forward(it) for it in forward]
        failed = await publish(self.app.producer, records, self.policy,
                               on_retry=lambda rs: self.m.retries.labels("publish").inc(len(rs)))
        for r in failed:
            r.owner.fail("publish", r.error, attempts=r.attempts)
        if failed:
            self._fail_after_undelivered(by_key)
        letters = [dead_letter(it, self.dead_letter_max_bytes, now_ms) for it in items if it.stage is not None]
        await publish_until_acknowledged(self.app.producer, letters, self.policy,
                                         on_retry=lambda rs: self.m.retries.labels("dead_letter").inc(len(rs)),
                                         shrink=_shrink_letter)
        self._count(items, local, now_ms)
        if forward:
            self.m.repartitioned.inc(len(forward))

        # 2. state: each key's record after its last delivered event joins the unwritten ones, written
        #    behind (`flush`); a key whose events were all replays is rewritten as it is (see above)
        # 3. offsets: the batch is acked once that write is confirmed (`_confirm`)
        unwritten = self._unwritten
        for key, its in by_key.items():
            new = last_state(self.uc, before[key], its, folded[key])
            if new is not None:
                unwritten[key] = (its[-1].record.partition, new)
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting.append(batch)
        self._waiting_events += len(items)
        if (self._waiting_events >= self.flush_events
                or time.monotonic() - self._waiting_since >= self.flush_s):
            await self.flush()

    def write_due(self) -> float | None:
        """Seconds until the unwritten state is due to be written (0: now); None if nothing is.

        The agent's loop asks whenever its intake is empty and flushes when it is due, so nothing
        stays unwritten (and unacked, holding up commits and rebalances) for long once no more
        records come; at a low rate one write then covers many small batches."""
        if not self._waiting:
            return None
        return max(0.0, self._waiting_since + self.flush_s - time.monotonic())

    def read(self, key: str) -> dict | None:
        """The newest record of `key`: unwritten, else the table's."""
        unwritten = self._unwritten.get(key)
        return unwritten[1] if unwritten is not None else self.table.read(key)

    async def flush(self) -> None:
        """Write the unwritten state; its batches are acked once its changelog is confirmed."""
        if not self._waiting:
            return
        await self._written()  # the previous write confirmed and acked: the state writes stay in order
        rows = {key: (partition, key, record) for key, (partition, record) in self._unwritten.items()}
        batches = self._waiting
        self._unwritten, self._waiting, self._waiting_events = {}, [], 0
        generation = batches[-1].generation
        owned = self._owned()
        if owned is not None:
            # A worker that lost partitions without taking part in the rebalance (evicted after a
            # pause) must not write their state over what their new owner writes: the new owner
            # replays them from the committed offsets. (Without transactions a write already under
            # way cannot be fenced; this closes the window to the time one write takes.)
            lost = {p for p, _, _ in rows.values() if p not in owned}
            if lost:
                log.warning("%s partitions %s are no longer assigned here: their unwritten state is "
                            "dropped, their new owner replays it", self.uc.name, sorted(lost))
                rows = {k: row for k, row in rows.items() if row[0] in owned}
        t0 = time.perf_counter()
        await self.table.put_many(list(rows.values()), generation)
        self._confirming = asyncio.ensure_future(self._confirm(batches, rows, generation, t0))
        self._confirming.add_done_callback(self._confirmed)

    async def _confirm(self, batches: list, rows: dict, generation, t0: float) -> None:
        await self.table.confirm(self.policy, lambda keys: self.table.put_many([rows[k] for k in keys], generation))
        self.m.state_flush_seconds.observe(time.perf_counter() - t0)
        owned = self._owned()
        for batch in batches:
            if owned is None:
                batch.ack()
            else:
                batch.ack(lambda tp: tp.partition in owned)

    def _confirmed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())

    def _owned(self) -> set[int] | None:
        """Partitions of the state (= of the input topics) this worker holds now; None if not known."""
        if self.assignment is None:
            return None
        try:
            return {tp.partition for tp in self.assignment()}
        except Exception:  # no consumer (yet): nothing to fence against
            return None

    async def drain(self) -> None:
        """Write what is unwritten; wait until it is confirmed and every batch handed over is acked."""
        await self.flush()
        await self._written()

    async def _written(self) -> None:
        if self._confirming is not None:
            await self._confirming

    @staticmethod
    def _fail_after_undelivered(by_key: dict[str, list[Item]]) -> None:
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

    def _count(self, items: list[Item], local: list[Item], now_ms: int) -> None:
        m = self.m
        # records the producers wrote: a record that took the hop was counted when it came in
        hop = self.repartition_topic
        m.events_in.inc(sum(it.record.topic != hop for it in items))
        scored = [it for it in local if it.ok]  # by key
        failed = Counter(it.stage for it in items if it.stage is not None)
        # histograms and counters once per batch, not per event
        if scored:
            ts = np.fromiter((it.value["ts"] for it in scored), dtype=np.float64, count=len(scored))
            metrics.observe_many(m.latency, np.maximum(0.0, (now_ms - ts) / 1000.0))
            metrics.observe_many(m.scores, np.fromiter((it.score for it in scored), dtype=np.float64,
                                                       count=len(scored)))
            if "decision" in scored[0].output:
                for decision, n in Counter(it.output["decision"] for it in scored).items():
                    m.decisions.labels(decision).inc(n)
        for stage, n in failed.items():
            m.dead_letters.labels(stage).inc(n)
        duplicates = sum(it.duplicate for it in local)
        if duplicates:
            m.duplicates.inc(duplicates)
        m.scored.inc(len(scored))
        m.batch_size.observe(len(items))
        if self.on_scored is not None and scored:
            self.on_scored(scored)


def _shrink_letter(record: Record) -> bool:
    """The broker refused a letter for good (too large): send it again as headers only."""
    smaller = deadletters.shrink(record.key, record.value, record.headers)
    if smaller is None:
        return False
    record.key, record.value, record.headers = smaller
    return True
