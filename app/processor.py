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

Batches overlap by one step: while the changelog delivery of batch N is awaited (step 2), batch N+1
is decoded, scored and its outputs published (step 1, which reads N's state from the local store).
N+1's state is written only once N's is confirmed and N acked, so the order of effects per batch,
the order of state writes, and the rewrite of a failed changelog delivery are as without overlap;
the broker round trip of the changelog just leaves the path from fetch to score.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import chain

import numpy as np
import orjson

from app import metrics
from app.codec import decode
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


@lru_cache(maxsize=4096)
def _source_name(topic: str, partition: int) -> str:
    """Key of a source partition in a state record's `applied` map."""
    return f"{topic}:{partition}"


class Item:
    """One source record on its way through the batch."""

    __slots__ = ("record", "origin", "source", "headers", "value", "key", "features", "state",
                 "score", "reasons", "stage", "error", "attempts", "output")

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
                 policy: RetryPolicy, faults: Faults, max_event_bytes: int) -> None:
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
        self.on_failure = None  # set by the agent: an unexpected error while confirming a batch
        self._confirming: asyncio.Future | None = None  # the last batch's confirmation and ack

    def partition_of(self, key: bytes) -> int:
        """The key's partition: Kafka's default partitioner, as the producer uses for the repartition hop."""
        return key_hash(key) % self.partitions

    # -- stages ---------------------------------------------------------------------------------

    def _decode(self, item: Item) -> None:
        msg = item.record
        try:
            item.value = decode(msg.value, self.uc.schema, self.max_event_bytes, self.uc.check)
        except Poison as exc:
            item.fail(exc.stage, exc)
            return
        item.key = item.value[self.uc.key_field]

    def _needs_forward(self, item: Item) -> bool:
        """Keyed by the state key and on its partition already? Otherwise go through the repartition topic."""
        msg = item.record
        if msg.topic == self.repartition_topic:
            return False
        key = item.key.encode()
        return msg.key != key or msg.partition != self.partition_of(key)

    def _fold(self, items: list[Item], generation) -> dict[str, list]:
        """Apply events to state per key, in arrival order.

        Returns key -> [record before, items, record after all of them]; the last is None when
        none of them changed the state.
        """
        by_key: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_key[it.key].append(it)
        # Read per partition (all events of a key are on the key's partition).
        keys_of: dict[int, list[str]] = defaultdict(list)
        for key, its in by_key.items():
            keys_of[its[-1].record.partition].append(key)
        records = {}
        for partition, keys in keys_of.items():
            records.update(zip(keys, self.table.read_many(partition, keys, generation)))
        apply, features = self.uc.apply, self.uc.features
        folded = {}
        for key, its in by_key.items():
            record = records[key]
            state = record["state"] if record else self.uc.new_state()
            applied = dict(record["applied"]) if record else {}
            changed = False
            for it in its:
                if applied.get(it.source, -1) >= it.origin[2]:
                    it.stage = "duplicate"  # already in the state: its output was delivered before
                    continue
                try:
                    new_state = apply(state, it.value)
                    it.features = features(new_state, it.value)
                except Exception as exc:
                    it.fail("features", exc)
                    continue
                state = it.state = new_state
                applied[it.source] = it.origin[2]
                changed = True
            folded[key] = [record, its, {"state": state, "applied": applied} if changed else None]
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
        for i, it in enumerate(items):
            if not it.ok:
                continue
            score = float(scores[i])
            if not 0.0 <= score <= 1.0:
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
        return Record(uc.output_topic, item.key.encode(), orjson.dumps(body), owner=item)

    def _forward(self, item: Item) -> Record:
        msg = item.record
        headers = [(k, v) for k, v in (msg.headers or ()) if k not in ORIGIN]
        headers += [(ORIGIN[0], item.origin[0].encode()), (ORIGIN[1], str(item.origin[1]).encode()),
                    (ORIGIN[2], str(item.origin[2]).encode())]
        return Record(self.repartition_topic, item.key.encode(), msg.value, headers, owner=item)

    # -- the batch ------------------------------------------------------------------------------

    async def handle(self, batch) -> None:
        """Process an `app.intake.Batch`. It is acked once its state is confirmed, which may be after
        this returns (while the next batch is processed); `drain()` waits for that."""
        # the consumer generation the batch was taken in: state cached by the table is only
        # trusted within one generation
        generation = batch.generation
        items = [Item(r) for r in batch.records]
        local, forward = [], []
        for it in items:
            self._decode(it)
            if it.ok:
                (forward if self._needs_forward(it) else local).append(it)
        folded = self._fold(local, generation)
        await self._score([it for it in local if it.ok and it.features is not None])

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

        self._count(items, now_ms)

        await self.drain()  # the previous batch's state confirmed and acked: the state writes stay in order
        clean = all(it.stage is None or it.stage == "duplicate" for it in local)
        await self._write_state(folded, folded, generation, clean)
        self._confirming = asyncio.ensure_future(self._confirm(batch, folded, generation, clean))
        self._confirming.add_done_callback(self._confirmed)

    async def _confirm(self, batch, folded: dict, generation, clean: bool) -> None:
        await self.table.confirm(self.policy, lambda keys: self._write_state(folded, keys, generation, clean))
        batch.ack()

    def _confirmed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self.on_failure is not None:
            self.on_failure(task.exception())

    async def drain(self) -> None:
        """Wait until the last batch handed to `handle` is confirmed and acked."""
        if self._confirming is not None:
            await self._confirming

    def _new_record(self, record: dict | None, its: list[Item]) -> dict | None:
        """The state after the delivered events of one key, refolded without those that failed."""
        delivered = [it for it in its if it.ok]
        if not delivered:
            return None
        state = record["state"] if record else self.uc.new_state()
        for it in delivered:
            state = self.uc.apply(state, it.value)
        applied = dict(record["applied"]) if record else {}
        for it in delivered:
            applied[it.source] = it.origin[2]
        return {"state": state, "applied": applied}

    async def _write_state(self, folded: dict, keys, generation, clean: bool) -> None:
        """Write the new record of each of `keys` (all keys of the batch, or those to rewrite).

        `clean`: every event of the batch was delivered (or a duplicate), so the fold stands.
        """
        rows = []
        for key in keys:
            record, its, after = folded[key]
            new = after if clean else self._new_record(record, its)
            if new is not None:
                rows.append((its[-1].record.partition, key, new))
        await self.table.put_many(rows, generation)

    def _count(self, items: list[Item], now_ms: int) -> None:
        m = self.m
        m.events_in.inc(len(items))
        scored = [it for it in items if it.stage is None and it.score is not None]
        others = Counter(it.stage for it in items if it.stage is not None)
        # histograms and counters once per batch, not per event
        metrics.observe_many(m.latency, [max(0.0, (now_ms - it.value["ts"]) / 1000.0) for it in scored])
        metrics.observe_many(m.scores, [it.score for it in scored])
        if scored and "decision" in scored[0].output:
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
