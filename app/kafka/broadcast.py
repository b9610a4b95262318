"""A topic every worker reads whole: all partitions, with a consumer of its own and no group.

A consumer group splits a topic's partitions among the workers; a control topic must instead reach
every worker, as Flink's broadcast state does. `follow` reads the topic from its beginning (or its
end) to the end it has now, hands those records over at once (`on_start`), then every record that
comes after (`on_record`), until cancelled. A broker that is away is waited out, with one log line a
minute; nothing raised by a callback stops the following.
"""
from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app import security
from app.kafka.probes import read_true_ends

log = logging.getLogger(__name__)


async def ensure_topic(bootstrap: str, topic: str, compacted: bool, partitions: int = 1) -> None:
    """Create `topic` if it does not exist (compacted: a control topic keeps the last record per key)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_kwargs())
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            configs = {"cleanup.policy": "compact"} if compacted else {"retention.ms": str(7 * 86_400_000)}
            await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def read_all(bootstrap: str, topic: str) -> list:
    """Every record of `topic` up to its end now (a command's view of a control topic); raises if
    the broker cannot be read."""
    consumer = await _assigned(bootstrap, topic)
    try:
        return await _to_end(consumer, bootstrap, from_beginning=True)
    finally:
        await consumer.stop()


async def _assigned(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=200,
                                **security.client_kwargs())
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def _to_end(consumer: AIOKafkaConsumer, bootstrap: str, from_beginning: bool) -> list:
    """The records up to each partition's end now (none if not `from_beginning`); the consumer is
    left at those ends."""
    tps = sorted(consumer.assignment())
    if not tps:
        return []
    ends = await read_true_ends(bootstrap, dict(await consumer.end_offsets(tps)))
    records = []
    if from_beginning:
        await consumer.seek_to_beginning(*tps)
        waiting = {tp for tp in tps if ends[tp] > 0}
        while waiting:
            batch = await consumer.getmany(*waiting, timeout_ms=500)
            for tp, got in batch.items():
                records += [r for r in got if r.offset < ends[tp]]
                if got and got[-1].offset + 1 >= ends[tp]:
                    waiting.discard(tp)
            for tp in list(waiting):  # an end past records compacted away
                if await consumer.position(tp) >= ends[tp]:
                    waiting.discard(tp)
    for tp in tps:
        consumer.seek(tp, ends[tp])
    return records


async def follow(bootstrap: str, topic: str, on_start, on_record, from_beginning: bool = True,
                 compacted: bool = True) -> None:
    """`await on_start(records up to the end now)` (none unless `from_beginning`), then
    `await on_record(record)` for each later one, until cancelled; the topic is created if it does
    not exist."""
    positions: dict | None = None  # where to go on after a reconnect
    last_warning = 0.0
    while True:
        consumer = None
        try:
            await ensure_topic(bootstrap, topic, compacted)
            consumer = await _assigned(bootstrap, topic)
            if positions is None:
                first = await _to_end(consumer, bootstrap, from_beginning)
                positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                await on_start(first)
            else:
                for tp, offset in positions.items():
                    consumer.seek(tp, offset)
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, records in batch.items():
                    for r in records:
                        await on_record(r)
                        positions[tp] = r.offset + 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - last_warning > 60:
                last_warning = time.monotonic()
                log.warning("reading %s failed (%r); trying again", topic, exc)
            await asyncio.sleep(1)
        finally:
            if consumer is not None:
                await consumer.stop()
