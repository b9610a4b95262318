"""One micro-batch of raw records through decode, routing, state, features, score, publish, commit.

The order of effects is what makes a crash harmless:
  1. outputs (scores, forwards, dead letters) are published and their delivery awaited;
  2. only then is the new state written to the table (and its changelog delivery awaited);
  3. only then are the source events acked, so Faust may commit their offsets.
A crash before 2 replays the events against the old state: same features, duplicate outputs.
A crash between 2 and 3 replays events whose state is already written: the per-key record of the
last applied source offset (`applied`) recognises them and they are skipped, their outputs having
been delivered in step 1. So state is never double-counted and no event goes without an output.

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
from functools import lru_cache
from itertools import chain

import numpy as np

from app import metrics
from app.codec import decode, encode
from app.errors import Poison, is_transient
from app.faults import Faults
from app.gate import Record, RetryPolicy, key_hash, publish, publish_until_acknowledged
from app.scorer import Scorer
from app.usecases import UseCase

log = logging.getLogger(__name__)

DEAD_LETTER_TOPIC = "dead_letters"
# Headers that carry a record's first coordinates through the repartition hop, so that dead
# letters and idempotency refer to the record the producer actually wrote.
ORIGIN = ("origin.topic", "origin.partition", "origin.offset")
# Set by the dead-letter replay: how often this record was replayed, and the coordinates of the
# record its lineage started from (so the replay command can pick the latest letter of each).
REPLAY_HEADERS = ("replay.count", "replay.of")


_NO_HEADERS: dict = {}  # shared, read only
ROUTES_MAX = 1 << 17  # cached key routes (bytes, partition); cleared when full


@lru_cache(maxsize=4096)
def _source_name(topic: str, partition: int) -> str:
    """Key of a source partition in a state record's `applied` map."""
    return f"{topic}:{partition}"


class Item:
    """One source record on its way through the batch."""

    __slots__ = ("record", "origin", "source", "headers", "value", "key", "features", "state",
                 "score", "reasons", "stage", "error", "attempts", "output", "encoded")

    def __init__(self, record) -> None:
        self.record = msg = record
        self.headers = dict(msg.headers) if msg.headers else _NO_HEADERS
        if ORIGIN[0] in self.headers:
            self.origin = (self.headers[ORIGIN[0]].decode(), int(self.headers[ORIGIN[1]]),
                           int(self.headers[ORIGIN[2]]))
        else:
            self.origin = (msg.topic, msg.partition, msg.offset)
        self.source = _source_name(self.origin[0], self.origin[1])
        self.value = None
        self.key = None
        self.features = None
        self.state = None
        self.score = None
        self.reasons = None
        self.stage = None
        self.error = None
        self.attempts = 1
        self.output = None
        self.encoded = None

    def fail(self, stage: str, error: BaseException, attempts: int = 1) -> None:
        self.stage, self.error, self.attempts = stage, error, attempts

    @property
    def ok(self) -> bool:
        return self.stage is None


def dead_letter(item: Item) -> Record:
    """Original key and value bytes untouched; the error context in headers (as KIP-1034)."""
    msg = item.record
    topic, partition, offset = item.origin
    headers = [
        ("errors.exception", type(item.error).__name__.encode()),
        ("errors.message", str(item.error)[:1000].encode()),
        ("errors.stage", item.stage.encode()),
        ("errors.topic", topic.encode()),
        ("errors.partition", str(partition).encode()),
        ("errors.offset", str(offset).encode()),
        ("errors.attempts", str(item.attempts).encode()),
        ("errors.ts", str(int(time.time() * 1000)).encode()),
    ]
    headers += [(h, item.headers[h]) for h in REPLAY_HEADERS if h in item.headers]
    return Record(DEAD_LETTER_TOPIC, msg.key, msg.value, headers, owner=item)


class Processor:
    def __init__(self, app, usecase: UseCase, table, scorer: Scorer, repartition_topic: str,
                 policy: RetryPolicy, faults: Faults, max_event_bytes: int, flush_events: int,
                 flush_ms: float) -> None:
        self.app = app
        self.uc = usecase
        self.table = table
        self.scorer = scorer
        self.repartition_topic = repartition_topic
        self.policy = policy
        self.faults = faults
        self.max_event_bytes = max_event_bytes
        self.partitions = app.conf.topic_partitions
        self.m = metrics.for_pipeline(usecase.name)
        self.on_scored = None  # set by the web view: fed the scored items of each batch
        self.on_failure = None  # set by the agent: an unexpected error while confirming a state write
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
        """Decode and validate; group the valid items by state key (arrival order within a key), or
        set them aside for the repartition hop when they are not keyed by the state key or not on
        its partition."""
        schema, max_bytes, check, key_field = self.uc.schema, self.max_event_bytes, self.uc.check, self.uc.key_field
        hop = self.repartition_topic
        by_key: dict[str, list[Item]] = {}
        forward = []
        for it in items:
            msg = it.record
            try:
                it.value = value = decode(msg.value, schema, max_bytes, check)
            except Poison as exc:
                it.fail(exc.stage, exc)
                continue
            it.key = key = value[key_field]
            raw, partition = self._route(key)
            if msg.topic != hop and (msg.key != raw or msg.partition != partition):
                forward.append(it)
            elif key in by_key:
                by_key[key].append(it)
            else:
                by_key[key] = [it]
        return by_key, forward

    def _fold(self, by_key: dict[str, list[Item]], generation) -> dict[str, list]:
        """Apply events to state per key, in arrival order.

        Returns key -> [record before, items, record to write]; the last is None when nothing is
        to be written (no event changed the state and none was a replay).
        """
        # Unwritten records first; the others read per partition (all events of a key are on the
        # key's partition).
        unwritten, records = self._unwritten, {}
        keys_of: dict[int, list[str]] = defaultdict(list)
        for key, its in by_key.items():
            if key in unwritten:
                records[key] = unwritten[key][1]
            else:
                keys_of[its[-1].record.partition].append(key)
        for partition, keys in keys_of.items():
            records.update(zip(keys, self.table.read_many(partition, keys, generation)))
        apply, features, new_state = self.uc.apply, self.uc.features, self.uc.new_state
        folded = {}
        for key, its in by_key.items():
            record = records[key]
            if record is None:
                state, applied = new_state(), {}
            else:
                state, applied = record["state"], record["applied"]
            changed = replayed = False
            for it in its:
                offset = it.origin[2]
                if applied.get(it.source, -1) >= offset:
                    it.stage = "duplicate"  # already in the state: its output was delivered before
                    replayed = True
                    continue
                try:
                    new = apply(state, it.value)
                    it.features = features(new, it.value)
                except Exception as exc:
                    it.fail("features", exc)
                    continue
                state = it.state = new
                if not changed:
                    applied, changed = dict(applied), True
                applied[it.source] = offset
            after = {"state": state, "applied": applied} if changed else record if replayed else None
            folded[key] = [record, its, after]
        return folded

    async def _score(self, items: list[Item]) -> None:
        if not items:
            return
        t0 = time.perf_counter()
        width = len(self.uc.feature_names)
        rows = np.fromiter(chain.from_iterable(it.features for it in items), dtype=np.float64,
                           count=len(items) * width).reshape(len(items), width)
        for attempt in range(1, self.policy.attempts + 1):
            try:
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
        contributions = self.scorer.contributions(rows) if self.uc.reasons else None
        for i, (it, score) in enumerate(zip(items, scores.tolist())):
            if not it.ok:
                continue
            if not 0.0 <= score <= 1.0:  # NaN too
                it.fail("score", ValueError(f"model returned {score!r}"))
                continue
            it.score = score
            if contributions is not None:
                it.reasons = self._reasons(contributions[i])

    def _score_each(self, items: list[Item], rows: np.ndarray) -> np.ndarray:
        """A batch predict raised: isolate the row(s) that the model rejects."""
        scores = np.full(len(items), np.nan)
        for i, it in enumerate(items):
            try:
                if self.faults.poisoned([it.value[self.uc.id_field]]):
                    raise ValueError("model rejected this input row")
                scores[i] = self.scorer.predict(rows[i:i + 1])[0]
            except Exception as exc:
                it.fail("score", exc)
        return scores

    def _reasons(self, contrib: np.ndarray) -> list[dict]:
        top = np.argsort(-contrib[:-1])[: self.uc.reasons]
        return [{"feature": self.uc.feature_names[j], "contribution": round(float(contrib[j]), 4)}
                for j in top if contrib[j] > 0]

    def _output(self, item: Item, now_ms: int) -> Record:
        uc, v = self.uc, item.value
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
        item.output = body
        item.encoded = encoded = encode(body)
        return Record(uc.output_topic, self._route(item.key)[0], encoded, owner=item)

    def _forward(self, item: Item) -> Record:
        msg = item.record
        headers = [(k, v) for k, v in (msg.headers or ()) if k not in ORIGIN]
        headers += [(ORIGIN[0], item.origin[0].encode()), (ORIGIN[1], str(item.origin[1]).encode()),
                    (ORIGIN[2], str(item.origin[2]).encode())]
        return Record(self.repartition_topic, self._route(item.key)[0], msg.value, headers, owner=item)

    # -- the batch ------------------------------------------------------------------------------

    async def handle(self, batch) -> None:
        """Process an `app.intake.Batch`. It is acked once its state is written and confirmed, which
        may be after this returns (see `flush`); `drain()` writes and waits for that."""
        # the consumer generation the batch was taken in: state cached by the table is only
        # trusted within one generation, and what was folded in another is written first
        generation = batch.generation
        if self._waiting and self._waiting[-1].generation != generation:
            await self.flush()
        items = [Item(r) for r in batch.records]
        by_key, forward = self._admit(items)
        folded = self._fold(by_key, generation)
        local = [it for its in by_key.values() for it in its]
        await self._score([it for it in local if it.ok])

        now_ms = int(time.time() * 1000)
        records = [self._output(it, now_ms) for it in local if it.ok]
        records += [self._forward(it) for it in forward]
        failed = await publish(self.app.producer, records, self.policy,
                               on_retry=lambda rs: self.m.retries.labels("publish").inc(len(rs)))
        for r in failed:
            r.owner.fail("publish", r.error, attempts=r.attempts)
        letters = [dead_letter(it) for it in items if it.stage not in (None, "duplicate")]
        await publish_until_acknowledged(self.app.producer, letters, self.policy,
                                         on_retry=lambda rs: self.m.retries.labels("dead_letter").inc(len(rs)))

        self._count(items, local, now_ms)

        clean = all(it.stage is None or it.stage == "duplicate" for it in local)
        unwritten = self._unwritten
        for key, (record, its, after) in folded.items():
            new = after if clean else self._new_record(record, its)
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
        await self.table.put_many(list(rows.values()), generation)
        self._confirming = asyncio.ensure_future(self._confirm(batches, rows, generation))
        self._confirming.add_done_callback(self._confirmed)

    async def _confirm(self, batches: list, rows: dict, generation) -> None:
        await self.table.confirm(self.policy, lambda keys: self.table.put_many([rows[k] for k in keys], generation))
        for batch in batches:
            batch.ack()

    def _confirmed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())

    async def drain(self) -> None:
        """Write what is unwritten; wait until it is confirmed and every batch handed over is acked."""
        await self.flush()
        await self._written()

    async def _written(self) -> None:
        if self._confirming is not None:
            await self._confirming

    def _new_record(self, record: dict | None, its: list[Item]) -> dict | None:
        """The state after the delivered events of one key, refolded without those that failed."""
        delivered = [it for it in its if it.ok]
        if not delivered:
            return record if any(it.stage == "duplicate" for it in its) else None
        state = record["state"] if record else self.uc.new_state()
        for it in delivered:
            state = self.uc.apply(state, it.value)
        applied = dict(record["applied"]) if record else {}
        for it in delivered:
            applied[it.source] = it.origin[2]
        return {"state": state, "applied": applied}

    def _count(self, items: list[Item], local: list[Item], now_ms: int) -> None:
        m = self.m
        m.events_in.inc(len(items))
        scored = [it for it in local if it.stage is None and it.score is not None]  # by key
        others = Counter(it.stage for it in items if it.stage is not None)
        # histograms and counters once per batch, not per event
        if scored:
            ts = np.fromiter((it.value["ts"] for it in scored), dtype=np.float64, count=len(scored))
            metrics.observe_many(m.latency, np.maximum(0.0, (now_ms - ts) / 1000.0))
            metrics.observe_many(m.scores, np.fromiter((it.score for it in scored), dtype=np.float64,
                                                       count=len(scored)))
            if "decision" in scored[0].output:
                for decision, n in Counter(it.output["decision"] for it in scored).items():
                    m.decisions.labels(decision).inc(n)
        for stage, n in others.items():
            if stage == "duplicate":
                m.duplicates.inc(n)
            else:
                m.dead_letters.labels(stage).inc(n)
        m.scored.inc(len(scored))
        m.batch_size.observe(len(items))
        if self.on_scored is not None and scored:
            self.on_scored(scored)
