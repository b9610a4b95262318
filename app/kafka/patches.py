"""Eight narrow patches to Faust 0.15 and aiokafka, each for a reason that cannot wait upstream.

1. Fetch wait as a setting. Faust hard-codes `fetch_max_wait_ms=1500` for the worker consumer.
   Real Kafka answers a fetch as soon as data arrives, so there it only bounds idle polling; Tansu
   answers only when the wait expires, so there it *is* the latency floor (FETCH_WAIT_MS).

2. True end offsets for table recovery. Tansu reports a partition's end offset as the base offset
   of its last record batch plus one, so the last batch of a changelog is invisible to recovery:
   the newest state is silently lost, or Faust refuses to start ("persisted offset is higher than
   the highwater"). Recovery's end offsets are therefore confirmed by reading past them; on a broker
   that reports them right this costs two empty fetches (about 0.4 s) per recovery.

3. Delivery without four tasks per record. The consumer hands every fetched record it delivers
   itself (the agents' topics go through `app.kafka.intake` instead, standbys through
   `app.kafka.standby`; table changelogs for Faust's own recovery still come this way) with `wait_first(deliver(record), suspend_flow.wait())`, and
   `wait_first` creates four tasks (plus stopped/crashed watchers) and an `asyncio.wait` per record. Delivery (decode, put on the stream's queue) almost
   always completes without suspending, so the patched `wait_first` first runs the delivery
   coroutine up to its first suspension; done there, it is the winner, exactly as it would have
   won the race. Only a delivery that really waits (queue full, flow suspended for a rebalance)
   continues as a task under the original `wait_first`. (Python 3.12's eager tasks do the same.)

4. Table stores without RocksDB's write-ahead log, as Kafka Streams runs them: the changelog topic
   is what makes a table durable, so the WAL only doubled every write (about 1.2 us of 2 per key).
   After a crash a store without WAL holds the state of its last memtable flush, a consistent
   prefix of its writes in which the persisted changelog offset (written after the values it
   covers, in the same database) is never ahead of the values; recovery reads the changelog from
   there. Every write of these databases goes without the WAL, Faust's own recovery writes too: a
   WAL-logged offset beside unlogged values could survive a crash that the values did not.

5. Pass-through client options (below).

6. RocksDB options chosen by measurement (`python -m bench.rocksdb_options`, 1M records of the
   worker's size): Faust gives every database (a table partition: twelve on a worker of both
   pipelines) a block cache of 2 GiB of its own, three 64 MiB memtables and a 3-bit bloom filter.
   Here the databases have no block cache: the table keeps the records it wrote lately in memory
   itself (`app.kafka.store.RECENT_MAX`), so a record read from RocksDB is one it will not read
   there again soon, and caching its block cost time and memory (a fresh worker's first reads at
   1M users with a shared 256 MiB cache: 4.45 instead of 3.43 us per key, and 226 MiB more). Memtables are 16 MiB (state is
   written in batches and flushed behind), the bloom filter has 10 bits per key (a new user's first
   lookup is a key in no database: 0.7 instead of 1.0 us) and blocks are LZ4-compressed (74 bytes
   per record on disk, Snappy 84, none 441).

7. Faust's own recovery skips changelog records no store can hold (`app.kafka.restore.storable`):
   one record without a key made every write of its recovery buffer raise, and the recovery never
   ended (the partitions stayed paused, /ready said 503, at every start).

8. A table recovery step that outlasts `broker_request_timeout` (a broker outage) exits the worker.
   Faust awaits each step with mode's `wait_first`, which reports a timeout as the service stopped:
   the recovery loop ended quietly, and the worker stayed in its group with its partitions paused,
   its /health saying 200, until someone noticed. A restart recovers anew.
"""
from __future__ import annotations

import inspect
import logging
import os
import types

import rocksdict
from faust.stores import rocksdb as faust_rocksdb
from faust.tables import recovery as faust_recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitResults

from app.kafka.probes import read_true_ends
from app.kafka.restore import storable

log = logging.getLogger(__name__)

_open_store = faust_rocksdb.RocksDBOptions.open
_apply_changelog_batch = faust_rocksdb.Store.apply_changelog_batch
_recovery_wait = faust_recovery.Recovery._wait
_as_options = faust_rocksdb.RocksDBOptions.as_options
_Thread = faust_aiokafka.AIOKafkaConsumerThread
_create_worker_consumer = _Thread._create_worker_consumer
_highwaters = _Thread._highwaters


@types.coroutine
def _resume(coro, first):
    """Continue `coro`, already stepped once and suspended on `first`, as plain `await` would."""
    to_yield = first
    while True:
        try:
            sent = yield to_yield
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown in by the task (cancellation): pass it on
            try:
                to_yield = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                to_yield = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _continued(coro, first):
    return await _resume(coro, first)


_wait_first = faust_consumer.Consumer.wait_first


async def eager_wait_first(self, *coros, timeout=None):
    first = coros[0] if coros else None
    if inspect.iscoroutine(first):
        try:
            suspended_on = first.send(None)
        except BaseException as exc:
            for other in coros[1:]:  # never started: close them, as wait_first cancels the losers
                if inspect.iscoroutine(other):
                    other.close()
            if isinstance(exc, StopIteration):  # completed without waiting: the winner
                return WaitResults([first], [exc.value], False)
            raise
        coros = (_continued(first, suspended_on), *coros[1:])
    return await _wait_first(self, *coros, timeout=timeout)


_installed = False


def rocksdb_options() -> rocksdict.Options:
    """Patch 6: the options of every table database."""
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_max_open_files(-1)
    options.set_write_buffer_size(16 << 20)
    options.set_max_write_buffer_number(3)
    options.set_target_file_size_base(64 << 20)
    options.set_compression_type(rocksdict.DBCompressionType.lz4())
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, True)
    table.disable_cache()
    table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
    options.set_block_based_table_factory(table)
    return options


async def recovery_wait_or_exit(self, coro, timeout=None):
    """`Recovery._wait`, except that a step that timed out exits the worker (patch 8)."""
    try:
        return await _recovery_wait(self, coro, timeout=timeout)
    except faust_recovery.ServiceStopped:
        if not self._stopped.is_set() and not self._crashed.is_set():  # not stopped: the step timed out
            log.critical("table recovery: a step took longer than %s s (is the broker reachable?); exiting so "
                         "that a restart recovers anew", timeout)
            os._exit(70)
        raise


def install(fetch_wait_ms: int, producer_options: dict | None = None, consumer_options: dict | None = None) -> None:
    """Install the patches (once per process: the first worker's settings are the process's)."""
    global _installed
    if _installed:
        return
    _installed = True

    def create_worker_consumer(self, transport):
        consumer = _create_worker_consumer(self, transport)
        consumer._fetch_max_wait_ms = fetch_wait_ms  # read by the fetcher, created on start()
        return consumer

    async def highwaters(self, partitions):
        reported = await _highwaters(self, partitions)
        if self.consumer.in_transaction:
            return reported
        return await read_true_ends(self._ensure_consumer()._client._bootstrap_servers, reported)

    def open_without_wal(self, path, *, read_only=False):
        db = _open_store(self, path, read_only=read_only)
        options = rocksdict.WriteOptions()
        options.disable_wal = True
        db.set_write_options(options)
        return db

    # Pass-through client options (KAFKA_CONSUMER_* / KAFKA_PRODUCER_*, app/settings.py). Faust
    # builds its clients from its own settings only. The producer's kwargs end with Faust's
    # `Producer._settings_extra()` (also used by the threaded producer): the options are merged there.
    # The consumer has no such hook (`_create_worker_consumer` / `_create_client_consumer` call
    # `aiokafka.AIOKafkaConsumer(...)` with fixed kwargs), so the driver module's `aiokafka` is given
    # a stand-in whose AIOKafkaConsumer adds the options; every other name is the real module's.
    producer_options, consumer_options = dict(producer_options or {}), dict(consumer_options or {})
    if producer_options:
        settings_extra = faust_aiokafka.Producer._settings_extra

        def settings_extra_with_options(self):
            return {**settings_extra(self), **producer_options}

        faust_aiokafka.Producer._settings_extra = settings_extra_with_options
    if consumer_options:
        real = getattr(faust_aiokafka.aiokafka, "real_module", faust_aiokafka.aiokafka)

        class AiokafkaWithConsumerOptions(types.ModuleType):
            real_module = real

            def __getattr__(self, name):
                return getattr(real, name)

            def AIOKafkaConsumer(self, *topics, **kwargs):  # noqa: N802  (stands in for the class)
                return real.AIOKafkaConsumer(*topics, **{**kwargs, **consumer_options})

        faust_aiokafka.aiokafka = AiokafkaWithConsumerOptions("aiokafka")

    def as_options(self):
        return rocksdb_options() if self.use_rocksdict else _as_options(self)

    def apply_changelog_batch(self, batch, to_key, to_value):
        _apply_changelog_batch(self, [e for e in batch if storable(e.message.key)], to_key, to_value)

    faust_rocksdb.RocksDBOptions.open = open_without_wal
    faust_recovery.Recovery._wait = recovery_wait_or_exit
    faust_rocksdb.Store.apply_changelog_batch = apply_changelog_batch
    faust_rocksdb.RocksDBOptions.as_options = as_options
    _Thread._create_worker_consumer = create_worker_consumer
    _Thread._highwaters = highwaters
    # Consumer.wait_first has one caller, the per-record delivery in Consumer._drain_messages.
    faust_consumer.Consumer.wait_first = eager_wait_first
