"""The worker's parts in one process, without a broker: every record batch acknowledged at once.

`build(tmp_dir)` is the real wiring (app/main.py) with the table stores under `tmp_dir` and
`client` (an `AckingProducer`, or one that records or refuses) in place of the aiokafka producer.
The tests of the processor and the in-process benchmark run the real processors and RocksDB tables
this way.
"""
from __future__ import annotations

import asyncio
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

from aiokafka.producer.message_accumulator import BatchBuilder

from app.kafka.producer import BatchProducer

ConsumerRecord = namedtuple("ConsumerRecord", "topic partition offset key value headers")


class AckingProducer:
    """What the batch producer needs of aiokafka's producer; every batch is acknowledged immediately."""

    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))
        self.offsets: dict = {}

    def create_batch(self):
        return BatchBuilder(512 * 1024, 0)

    async def partitions_for(self, topic):
        return self.partitions

    async def send_batch(self, batch, topic, partition):
        fut = asyncio.get_running_loop().create_future()
        base = self.offsets.get((topic, partition), 0)
        self.offsets[(topic, partition)] = base + batch.record_count()
        fut.set_result(SimpleNamespace(offset=base))
        return fut


class FakeBatch:
    """An `app.kafka.intake.Batch` of given records, that notes its ack."""

    def __init__(self, records, generation=1) -> None:
        self.records, self.generation, self.acked = records, generation, False

    def ack(self, owned=None) -> None:
        self.acked = True


def build(tmp_dir: Path, client=None, **settings):
    """The worker (app.main.Service) with its stores under `tmp_dir`, sending through `client` (by
    default an `AckingProducer`); `settings` override the environment's, by field name
    (state_flush_ms=..., fault_file=...)."""
    from app import main
    from app.settings import current

    configured = current().model_copy(update={"data_dir": Path(tmp_dir), **settings})
    client = client or AckingProducer(configured.partitions)
    return main.build(configured, producer=BatchProducer(None, client=client))
