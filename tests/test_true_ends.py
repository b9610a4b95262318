"""`read_true_ends` (app/kafka/probes.py) on the embedded broker, whose reported ends lag.

Issue 14: on a partition that others keep writing (a standby's changelog) it read for as long as
records kept coming; recovery waited on it. It is bounded now, and still finds the true end of a
partition at rest.
"""
from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.kafka.probes import read_true_ends


async def _ends(bootstrap: str, tp: TopicPartition) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.end_offsets([tp])
    finally:
        await consumer.stop()


def test_true_ends_of_a_resting_partition_and_of_one_that_keeps_growing(broker):
    tp = TopicPartition("busy", 0)

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=50)
        await producer.start()
        try:
            await asyncio.gather(*[await producer.send("busy", b"x", partition=0) for _ in range(500)])
            reported = await _ends(broker.bootstrap, tp)
            assert (await read_true_ends(broker.bootstrap, reported))[tp] == 500

            async def keep_writing():
                while True:
                    await producer.send("busy", b"y", partition=0)
                    await asyncio.sleep(0.002)

            writer = asyncio.ensure_future(keep_writing())
            try:
                t0 = time.monotonic()
                ends = await read_true_ends(broker.bootstrap, await _ends(broker.bootstrap, tp), limit_s=2.0)
                assert time.monotonic() - t0 < 6, "bounded, although the partition never stops growing"
                assert ends[tp] > 500
            finally:
                writer.cancel()
        finally:
            await producer.stop()

    asyncio.run(main())


def test_the_first_record_at_or_after_an_offset_below_the_log_start_is_the_start(broker):
    """Found in review: the probe left an offset below the log's start to aiokafka's default reset
    (latest), so it answered with the next new record, and the guard took the records before it for
    a gap: a group's first start on a topic whose retention had moved its start lost the backlog.
    Tansu has no DeleteRecords to move a log's start: its consumer is told, as a broker after
    retention would answer, that the log starts at 5; the records are real."""
    from app.kafka.probes import LogProbe
    from faust.types import TP

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait("retained", b"r%d" % i, partition=0)
        finally:
            await producer.stop()
        probe = LogProbe(broker.bootstrap, "g")
        try:
            assert await probe.first_offset(TP("retained", 0), 3) == 3
            real = probe._consumer.beginning_offsets

            async def after_retention(tps):
                return {tp: max(5, o) for tp, o in (await real(tps)).items()}
            probe._consumer.beginning_offsets = after_retention
            assert await probe.first_offset(TP("retained", 0), 0) == 5
            assert await probe.first_offset(TP("retained", 0), 7) == 7
        finally:
            await probe.stop()
    asyncio.run(main())
