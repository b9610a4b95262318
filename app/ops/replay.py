"""`scoring replay-dead-letters`: send chosen dead letters back to their input topic, once.

- Only into the pipelines' input topics: a letter names its source topic in a header anyone can
  write, and a changelog or an output topic must never receive a producer's bytes.
- Each letter at most once: a replayed letter's coordinates are written to a compacted topic
  (`<DEAD_LETTER_TOPIC>.replayed`) after its record is acknowledged, and the next run skips it unless
  `--again`. A crash between the two replays it again; the worker still applies it once, since a
  replayed record carries the identity of the event (`replay.of`, the coordinates of its first
  record) and each key remembers the replays it applied (app/pipeline/lineage.py).
- A record that failed again after a replay has several letters: only the newest of each event
  counts, and it is skipped once the event was replayed `--max-replays` times. An event is its
  lineage and its value: anyone can write a letter claiming a lineage, and one of another value
  must not take the real letter's place.
- The scan reads each partition up to the end it had when the run started, then stops.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson

from app.pipeline import deadletters, lineage
from app.pipeline.deadletters import Letter
from app.topology import REPLAYED_SUFFIX


@dataclass(frozen=True)
class Choice:
    stage: str | None = None
    exception: str | None = None
    topic: str | None = None
    partition: int | None = None
    offsets: tuple[int, int] | None = None  # source offsets, inclusive
    max_replays: int = 3
    again: bool = False

    def wants(self, letter: Letter) -> bool:
        return ((self.stage is None or letter.stage == self.stage)
                and (self.exception is None or letter.exception == self.exception)
                and (self.topic is None or letter.topic == self.topic)
                and (self.partition is None or letter.partition == self.partition)
                and (self.offsets is None or letter.offset is not None
                     and self.offsets[0] <= letter.offset <= self.offsets[1]))


@dataclass
class Outcome:
    replayed: list[str] = field(default_factory=list)   # one line per letter sent (or to send)
    already: int = 0      # replayed by an earlier run (--again sends them anyway)
    at_limit: int = 0     # the event was replayed --max-replays times
    refused: int = 0      # names a topic that is not an input topic
    unreplayable: int = 0  # no valid coordinates, or its value was cut
    superseded: int = 0   # an older letter of an event that has a newer one
    other: int = 0        # not chosen by the filters

    def summary(self, dry_run: bool) -> str:
        verb = "would replay" if dry_run else "replayed"
        return (f"{verb} {len(self.replayed)} dead letter(s); skipped: {self.already} already replayed "
                f"(--again to send them again), {self.at_limit} at the replay limit, {self.refused} naming a "
                f"topic that is not an input topic, {self.unreplayable} unreplayable, {self.superseded} "
                f"superseded by a newer letter, {self.other} not chosen")


def letter_id(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}:{partition}:{offset}".encode()


def choose(topic: str, letters: list[tuple[int, int, object]], done: set[bytes], inputs: set[str], choice: Choice,
           outcome: Outcome) -> list[tuple[bytes, Letter, object]]:
    """The letters to replay, from (partition, offset, record) of every letter read on `topic`; pure."""
    newest: dict[str, tuple[bytes, Letter, object]] = {}
    for partition, offset, record in letters:
        letter = Letter.parse(record.headers)
        if letter.problem is not None:
            outcome.unreplayable += 1
            continue
        event = lineage.identity(letter.lineage, record.value)
        held = newest.get(event)
        if held is not None:
            outcome.superseded += 1
            if held[1].replay_count > letter.replay_count:
                continue
        newest[event] = (letter_id(topic, partition, offset), letter, record)
    chosen = []
    for ident, letter, record in newest.values():
        if not choice.wants(letter):
            outcome.other += 1
        elif letter.topic not in inputs:
            outcome.refused += 1
        elif ident in done and not choice.again:
            outcome.already += 1
        elif letter.replay_count >= choice.max_replays:
            outcome.at_limit += 1
        else:
            chosen.append((ident, letter, record))
            outcome.replayed.append(f"{ident.decode()} -> {letter.topic} (event {letter.lineage}, stage "
                                    f"{letter.stage}, {letter.exception}: {(letter.message or '')[:80]})")
    return chosen


def replay_headers(record, letter: Letter) -> list[tuple[str, bytes]]:
    """The record's own headers as the letter kept them, with the event's lineage and replay count."""
    own = [(k, v) for k, v in (record.headers or ()) if not k.startswith(deadletters.OWN_PREFIXES)]
    return [(deadletters.sendable_name(k), v) for k, v in own] + [
        (deadletters.REPLAY_OF, letter.lineage.encode()),
        (deadletters.REPLAY_COUNT, str(letter.replay_count + 1).encode())]


async def read_to_ends(topic: str, kw: dict) -> list[tuple[int, int, object]]:
    """Every record of `topic` up to the end each partition had when this was called."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from app.kafka.probes import read_true_ends

    # a consumer of its own per topic: one without a group keeps metadata of what it was assigned only
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **kw)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        reported = await consumer.end_offsets(tps)
        ends = await read_true_ends(kw["bootstrap_servers"], dict(reported))  # Tansu's lag
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, int, object]] = []
        open_tps = {tp for tp in tps if ends[tp] > 0}
        while open_tps:
            batch = await consumer.getmany(*open_tps, timeout_ms=500)
            for tp, records in batch.items():
                out += [(tp.partition, r.offset, r) for r in records if r.offset < ends[tp]]
                if records and records[-1].offset + 1 >= ends[tp]:
                    open_tps.discard(tp)
            for tp in list(open_tps):  # an end that lies past records deleted or compacted away
                if await consumer.position(tp) >= ends[tp]:
                    open_tps.discard(tp)
        return out
    finally:
        await consumer.stop()


async def _ensure_compacted(topic: str, kw: dict) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**kw)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def replay(bootstrap: str, dead_letters: str, inputs: set[str], choice: Choice, dry_run: bool) -> Outcome:
    """Replay the chosen letters of the topic `dead_letters` into the topics `inputs`."""
    from aiokafka import AIOKafkaProducer

    from app import security
    from app.kafka import records

    records.install()  # a letter keeps its record's headers, and their names may not be UTF-8
    kw = {"bootstrap_servers": bootstrap, **security.client_kwargs()}
    replayed_topic = dead_letters + REPLAYED_SUFFIX
    await _ensure_compacted(replayed_topic, kw)
    done = {r.key for _, _, r in await read_to_ends(replayed_topic, kw) if r.key is not None and r.value is not None}
    outcome = Outcome()
    chosen = choose(dead_letters, await read_to_ends(dead_letters, kw), done, inputs, choice, outcome)
    if dry_run or not chosen:
        return outcome
    producer = AIOKafkaProducer(**kw)
    await producer.start()
    try:
        # 1. the records, acknowledged; 2. only then the marks that they were replayed
        sent = [await producer.send(letter.topic, record.value, key=record.key, headers=replay_headers(record, letter))
                for _, letter, record in chosen]
        await asyncio.gather(*sent)
        now = int(time.time() * 1000)
        marks = [await producer.send(replayed_topic, orjson.dumps({"replayed_at": now, "event": letter.lineage}),
                                     key=ident)
                 for ident, letter, _ in chosen]
        await asyncio.gather(*marks)
    finally:
        await producer.stop()
    return outcome
