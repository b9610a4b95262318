"""One micro-batch of raw records through decode, routing, state, features, score, publish, commit.

The order of effects is what makes a crash harmless (`Processor.handle`, steps 1-3):
  1. outputs (scores, forwards, dead letters) are published and their delivery awaited;
  2. only then is the new state written to the table (and its changelog delivery awaited);
  3. only then are the source events acked, so Faust may commit their offsets.
A crash before 2 replays the events against the old state: same features, duplicate outputs.
A crash between 2 and 3 replays events whose state is already written: the per-key record of the
last applied offset of each stream (`applied`; a replayed dead letter by its lineage, see
app/pipeline/lineage.py) recognises them and they are skipped, their outputs having been delivered in step 1.
So state is never double-counted and no event goes without an output.

An event contributes to state only if its output was delivered; a dead-lettered event does not,
so replaying its dead letter later applies it exactly once.

A replayed event found in the state rewrites its key's record to the changelog. The local store may
hold a write whose changelog delivery never completed (a crash between 2 and its confirmation):
without the rewrite, the skipped event would be committed while the changelog, which recovery and
every other worker trust, never learns of it.

State is written behind (`app.pipeline.writer`): steps 2 and 3 happen for several batches at once,
and outputs never wait for them.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np

from app import metrics
from app.errors import Poison
from app.kafka.partitioner import key_hash, key_hashes
from app.kafka.producer import BatchProducer, Record
from app.pipeline import deadletters, lineage
from app.pipeline.codec import decode, encode
from app.pipeline.fold import CorruptState, Item, fail_after_undelivered, fold, last_state
from app.pipeline.publish import publish, publish_until_acknowledged
from app.pipeline.quarantine import PoisonPill
from app.pipeline.scoring import Scoring
from app.pipeline.writer import StateWriter
from app.pipelines import Pipeline
from app.retry import RetryPolicy

ROUTES_MAX = 1 << 17  # cached key routes (bytes, partitioner's hash); cleared when full


class Processor:
    def __init__(self, pipeline: Pipeline, *, producer: BatchProducer, writer: StateWriter, models,
                 policy: RetryPolicy, partitions: int, dead_letter_topic: str, max_event_bytes: int,
                 dead_letter_max_bytes: int, faults=None) -> None:
        self.pipeline = pipeline
        self.producer = producer
        self.writer = writer
        self.models = models  # app.models.live.LiveModels: the champion, maybe a challenger in shadow
        self.policy = policy
        self.partitions = partitions
        self.dead_letter_topic = dead_letter_topic
        self.max_event_bytes = max_event_bytes
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.faults = faults  # app.dev.faults.Faults: crash:<event id> (and the scoring's rules)
        self.m = metrics.for_pipeline(pipeline.name)
        self.scoring = Scoring(pipeline, policy, self.m, faults)
        self.observers: list = []  # called with the scored items of each batch (the web view's ring, ...)
        self._routes: dict[str, tuple[bytes, int]] = {}  # state key -> (its bytes, their key_hash)
        self._ordered = frozenset([pipeline.repartition_topic])  # see app.pipeline.publish.Overtaken

    def partition_of(self, key: bytes) -> int:
        """The key's partition: Kafka's default partitioner, as the producer uses for the repartition hop."""
        return key_hash(key) % self.partitions

    def read(self, key: str) -> dict | None:
        """The newest state record of `key`."""
        return self.writer.read(key)

    # -- the batch ------------------------------------------------------------------------------

    async def handle(self, batch, set_aside: int | None = None) -> None:
        """Process an `app.kafka.intake.Batch`. It is acked once its state is written and confirmed,
        which may be after this returns (`writer.drain()` writes and waits for that).

        `set_aside`: the batch's one record killed the worker that many times (app/pipeline/quarantine.py);
        it becomes a dead letter without being read."""
        await self.writer.before(batch.generation)
        # one model decides for the whole batch (a promotion switches between batches)
        champion, challenger = self.models.champion, self.models.challenger
        items = [Item(r) for r in batch.records]
        if set_aside is not None:
            for it in items:
                it.fail("quarantine", PoisonPill(f"the worker died {set_aside} times while handling this record"),
                        attempts=set_aside)
        by_key, forward = self._admit([it for it in items if it.stage is None])
        before = self.writer.read_many(self._keys_by_partition(by_key), batch.generation)
        folded = self._fold_all(by_key, before)
        now_ms = int(time.time() * 1000)
        await self._score_all(by_key, before, folded, champion, challenger, now_ms)

        # 1. outputs: scores and repartition hops, retried in place; then the dead letters of
        #    everything that failed, which wait out an outage (there is nowhere further to put them)
        local = [it for its in by_key.values() for it in its]
        records = [it.outgoing for it in local if it.ok] + [self._forward(it) for it in forward]
        failed = await publish(self.producer, records, self.policy,
                               on_retry=lambda rs: self.m.retries.labels("publish").inc(len(rs)),
                               ordered=self._ordered)
        for r in failed:
            r.owner.fail("publish", r.error, attempts=r.attempts)
        for it in local:
            # An item and its output record refer to each other: a cycle, which only the cyclic GC
            # would free, with all the event's dicts (a quarter of the worker's CPU per event).
            it.outgoing = None
        if failed:
            fail_after_undelivered(by_key)
        letters = [self._dead_letter(it, now_ms) for it in items if it.stage is not None]
        await publish_until_acknowledged(self.producer, letters, self.policy,
                                         on_retry=lambda rs: self.m.retries.labels("dead_letter").inc(len(rs)),
                                         shrink=_shrink_letter)
        self._count(items, local, forward, now_ms)

        # 2. state: each key's record after its last delivered event (or, if its events were all
        #    replays, as it was: rewritten) joins the unwritten state, written behind by the writer;
        # 3. offsets: the writer acks the batch once that write is confirmed
        rows = {}
        for key, its in by_key.items():
            new = last_state(self.pipeline, before[key], its, folded[key])
            if new is not None:
                rows[key] = (its[-1].record.partition, new)
        await self.writer.add(rows, batch, len(items))

    # -- stages ---------------------------------------------------------------------------------

    def _admit(self, items: list[Item]) -> tuple[dict[str, list[Item]], list[Item]]:
        """Read each record's identity, decode and validate it; group the valid items by state key
        (arrival order within a key), or set them aside for the repartition hop when they are not
        keyed by the state key or not on its partition (a record that came through the hop and is
        still not: forged, sent on to the right partition). Whatever one record raises, of any class
        (msgspec raises RecursionError on deep nesting), makes that record a dead letter."""
        p = self.pipeline
        hop, schema, max_bytes, check, key_field, source = (p.repartition_topic, p.schema, self.max_event_bytes,
                                                            p.check, p.key_field, p.source_topic)
        crash = self.faults.crash_ids() if self.faults is not None else None
        routes, unrouted = self._routes, {}  # unrouted: state key -> its bytes
        keyed = []
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
                if crash and value[p.id_field] in crash:
                    self.faults.crash(value[p.id_field])
                it.key = key = value[key_field]
                it.route = routes.get(key)  # kept with the item: the cache may be cleared below
                if it.route is None and key not in unrouted:
                    unrouted[key] = key.encode()
            except Poison as exc:
                it.fail(exc.stage, exc)
                continue
            except Exception as exc:
                it.fail(stage, exc)
                continue
            keyed.append(it)
        # New keys hashed together: with a million users, a third of a batch's events have one.
        new = dict(zip(unrouted, zip(unrouted.values(), key_hashes(list(unrouted.values())))))
        if len(routes) + len(new) > ROUTES_MAX:
            routes.clear()
        if len(new) <= ROUTES_MAX:  # a batch of more new keys than that (BATCH_MAX is a setting) is not cached
            routes.update(new)
        by_key: dict[str, list[Item]] = {}
        forward = []
        partitions = self.partitions
        for it in keyed:
            msg, key = it.record, it.key
            if it.route is None:
                it.route = new[key]
            raw, hashed = it.route
            if msg.key != raw or msg.partition != hashed % partitions:
                # not keyed by the state key or not on its partition: through the hop. A hop record
                # too (only a forged one is), else its key's state would be read and written on
                # another partition than the key's.
                forward.append(it)
            elif key in by_key:
                by_key[key].append(it)
            else:
                by_key[key] = [it]
        return by_key, forward

    @staticmethod
    def _keys_by_partition(by_key: dict[str, list[Item]]) -> dict[int, list[str]]:
        """All events of a key are on the key's partition (those that were not took the hop)."""
        keys_of: dict[int, list[str]] = defaultdict(list)
        for key, its in by_key.items():
            keys_of[its[-1].record.partition].append(key)
        return keys_of

    def _fold_all(self, by_key: dict[str, list[Item]], before: dict[str, dict | None]) -> dict:
        """Each key's events folded onto its record; the events of a key whose record cannot be read
        are dead letters, and nothing is written for it."""
        folded = {}
        for key, its in by_key.items():
            try:
                folded[key] = fold(self.pipeline, before[key], its)
            except CorruptState as exc:
                for it in its:
                    if it.stage is None:
                        it.fail("state", exc)
                folded[key] = ({}, [])
        return folded

    async def _score_all(self, by_key: dict[str, list[Item]], before: dict[str, dict | None], folded: dict,
                         champion, challenger, now_ms: int) -> None:
        """Score every folded event and build its output. An event that fails here leaves the state,
        so its key is folded again without it and the key's later events are scored again: no event
        is featurised on state that holds a dead letter."""
        todo = [it for its in by_key.values() for it in its if it.ok]
        while todo:
            await self.scoring(todo, champion)
            if challenger is not None:
                self.scoring.shadow(todo, challenger)
            for it in todo:
                if it.ok:
                    it.outgoing = self._output(it, champion, challenger, now_ms)
            failed = {it.key for it in todo if it.stage in ("features", "score", "output")}
            refold = [key for key in failed if any(it.ok for it in by_key[key])]
            todo = []
            for key in refold:
                its = by_key[key]
                for it in its:
                    it.reset()
                folded[key] = fold(self.pipeline, before[key], its)
                todo += [it for it in its if it.ok]

    def _output(self, item: Item, champion, challenger, now_ms: int) -> Record | None:
        p, v = self.pipeline, item.value
        try:
            body = {
                p.id_field: v[p.id_field],
                p.key_field: item.key,
                "score": item.score,
                "model_version": champion.version,
                "event_ts": v["ts"],
                "scored_at": now_ms,
                **p.output(v, item.state, item.score, item.reasons),
                "features": item.features,
            }
            if challenger is not None and item.shadow is not None:
                body["shadow"] = shadow = {"model_version": challenger.version, "score": item.shadow}
                if p.decide is not None:
                    shadow["decision"] = p.decide(item.shadow)
            encoded = encode(body)
        except Exception as exc:
            item.fail("output", exc)
            return None
        item.output, item.encoded = body, encoded
        raw, hashed = item.route
        return Record(p.output_topic, raw, encoded, owner=item, key_hash=hashed)

    def _forward(self, item: Item) -> Record:
        """The record, untouched, to the key's partition of the repartition topic, with the
        coordinates of the record the producer wrote (any copy of those headers it carried is dropped)."""
        msg = item.record
        headers = [(deadletters.sendable_name(k), v) for k, v in (msg.headers or ()) if k not in lineage.ORIGIN]
        raw, hashed = item.route
        return Record(self.pipeline.repartition_topic, raw, msg.value, headers + lineage.origin_headers(item.origin),
                      owner=item, partition=hashed % self.partitions)

    def _dead_letter(self, item: Item, now_ms: int) -> Record:
        msg = item.record
        topic, partition, offset = item.origin
        key, value, headers = deadletters.build(
            key=msg.key, value=msg.value, input_headers=msg.headers, stage=item.stage, error=item.error,
            topic=topic, partition=partition, offset=offset, attempts=item.attempts, now_ms=now_ms,
            replay=item.replay, max_bytes=self.dead_letter_max_bytes)
        return Record(self.dead_letter_topic, key, value, headers, owner=item)

    def _count(self, items: list[Item], local: list[Item], forward: list[Item], now_ms: int) -> None:
        m = self.m
        # records the producers wrote: a record that took the hop was counted when it came in
        hop = self.pipeline.repartition_topic
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
            shadowed = [it for it in scored if "shadow" in it.output]
            if shadowed:
                metrics.observe_many(m.shadow_scores, np.fromiter((it.shadow for it in shadowed), dtype=np.float64,
                                                                  count=len(shadowed)))
                if self.pipeline.decide is not None:
                    agree = Counter(it.output["decision"] == it.output["shadow"]["decision"] for it in shadowed)
                    for same, n in agree.items():
                        m.shadow_agreement.labels("true" if same else "false").inc(n)
        for stage, n in failed.items():
            m.dead_letters.labels(stage).inc(n)
        duplicates = sum(it.duplicate for it in local)
        if duplicates:
            m.duplicates.inc(duplicates)
        if forward:
            m.repartitioned.inc(len(forward))
        m.scored.inc(len(scored))
        m.batch_size.observe(len(items))
        if scored:
            for observe in self.observers:
                observe(scored)


def _shrink_letter(record: Record) -> bool:
    """The broker refused a letter for good (too large): send it again as headers only."""
    smaller = deadletters.shrink(record.key, record.value, record.headers)
    if smaller is None:
        return False
    record.key, record.value, record.headers = smaller
    record.key_hash = None  # of another key
    return True
