"""Real parts for integration tests: embedded broker, `faust -A app worker` processes, Kafka I/O.

Every process is started on free ports and stopped by its PID, also when a test fails.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.dev.broker import free_port
from app.dev.launcher import READY, WorkerExited, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("MODEL_DIR", ROOT / "models")).resolve()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie still answers kill(0)
        return f.read().split()[2] != "Z"


class Worker(WorkerProcess):
    """One `faust -A app worker` process with its own web port and data dir; a failure to come up
    fails the test."""

    def __init__(self, broker_url: str, data_dir: Path, log_dir: Path, name: str = "w1",
                 env: dict | None = None, app: str = "app", args: list[str] | None = None) -> None:
        self.name = name
        self.web_port = free_port()
        self.data_dir = data_dir
        super().__init__({
            **os.environ,
            "BROKER_URL": broker_url,
            "WEB_PORT": str(self.web_port),
            "DATA_DIR": str(data_dir),
            "MODEL_DIR": str(MODEL_DIR),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }, log_dir / f"{name}.log", cwd=ROOT, app=app, args=args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "Worker":
        super().start()
        if wait_ready:
            self.wait_for(READY, timeout)
        return self

    def wait_for(self, needle: str = READY, timeout: float = 60) -> None:
        try:
            super().wait_for(needle, timeout)
        except (WorkerExited, TimeoutError) as exc:
            raise AssertionError(f"worker {self.name}: {exc}") from None


def bootstrap(broker) -> str:
    return broker.bootstrap


def partition_as_producers_do(key: bytes | None, partitions: int = 4) -> int | None:
    """Keyed records as both kinds of producer write them: about half the keys hashed with murmur2
    (aiokafka, Java clients: None here, the client's default) and the others with CRC32 (librdkafka's
    default), each key always the same way, so its events stay in order. Most CRC32 partitions are
    not the state key's: those records take the repartition hop."""
    if key is None:
        return None
    from app.kafka.partitioner import key_hash

    return crc32_partition(key, partitions) if (key_hash(key) >> 7) & 1 else None


def written_partition(key: bytes, partitions: int = 4) -> int:
    """The partition `produce` writes a record with this key to."""
    from app.kafka.partitioner import key_hash

    chosen = partition_as_producers_do(key, partitions)
    return key_hash(key) % partitions if chosen is None else chosen


async def produce(broker, topic: str, records: list[tuple[bytes | None, bytes | None]],
                  headers=None) -> None:
    """Produce (key, value) pairs in order, keyed by both partitioners, and wait for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        partitions = len(await producer.partitions_for(topic))
        futs = [await producer.send(topic, value, key=key, headers=headers,
                                    partition=partition_as_producers_do(key, partitions))
                for key, value in records]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def crc32_partition(key: bytes, partitions: int = 4) -> int:
    """librdkafka's default partitioner (confluent-kafka, Go, .NET, node clients): CRC32 of the key."""
    import zlib

    return zlib.crc32(key) % partitions


async def produce_records(broker, topic: str, records: list[tuple]) -> None:
    """Produce (key, value, headers, partition) records in order (partition None: the default
    partitioner); header names may be `tests.hostile.RawName`s (written as their raw bytes)."""
    from tests.hostile import raw_header_keys

    with raw_header_keys():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5, max_request_size=4 << 20)
        await producer.start()
        try:
            futs = [await producer.send(topic, value, key=key, headers=headers or None, partition=partition)
                    for key, value, headers, partition in records]
            await asyncio.gather(*futs)
        finally:
            await producer.stop()


def produce_events(broker, topic: str, events: list[dict], key_field: str | None) -> None:
    records = [((e[key_field].encode() if key_field else None), orjson.dumps(e)) for e in events]
    asyncio.run(produce(broker, topic, records))


async def _read(broker, topic: str, until, timeout: float) -> list:
    return await read_records(broker.bootstrap, topic, until, timeout)


async def read_records(bootstrap: str, topic: str, until, timeout: float, **client_kwargs) -> list:
    """Read a topic from the beginning (all partitions) until `until(records)` or timeout."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50, **client_kwargs)
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while time.monotonic() < deadline and not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.2)
        if not parts:
            return records
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for rs in batch.values():
                records.extend(rs)
            if until(records):
                break
    finally:
        await consumer.stop()
    return records


def read_topic(broker, topic: str, until=lambda rs: False, timeout: float = 30) -> list:
    return asyncio.run(_read(broker, topic, until, timeout))


def read_json(broker, topic: str, count: int, timeout: float = 60, key: str | None = None) -> list[dict]:
    """Read until `count` distinct values of `key` (or `count` records) arrived."""
    def enough(rs):
        if key is None:
            return len(rs) >= count
        return len({orjson.loads(r.value)[key] for r in rs}) >= count
    return [orjson.loads(r.value) for r in read_topic(broker, topic, enough, timeout)]


def latest_states(broker, changelog: str, keys: set[str]) -> dict[str, dict]:
    """The newest state per key in a table's changelog, for `keys`."""
    latest: dict[str, dict] = {}
    for r in read_topic(broker, changelog, timeout=5):
        if r.key and r.value:
            latest[r.key.decode()] = orjson.loads(r.value)
    return {k: v["state"] for k, v in latest.items() if k in keys}


async def _committed(broker, group: str, topic: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        await consumer.stop()


def committed(broker, group: str, topic: str) -> dict[int, int | None]:
    """Committed offsets of a consumer group (without joining it)."""
    return asyncio.run(_committed(broker, group, topic))
