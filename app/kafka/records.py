"""Fetched records whose header keys are not UTF-8 are read, not refused.

A record header's key is a Kafka `String`, but no broker checks that it is UTF-8. aiokafka decodes
it strictly while it iterates a fetched batch, so one such record makes every fetch of its partition
raise `CorruptRecordException`: the consumer can never move past it, and no dead letter can be made
of it (seen with the embedded broker: the partition stalls and every later record waits forever).

Installed, a fetched batch is still read by aiokafka's C reader; only a batch whose reading fails on
a header key is read again here, from its bytes, with the invalid bytes of the key kept as lone
surrogates (`surrogateescape`). The records before the bad one are not delivered twice.
"""
from __future__ import annotations

import struct

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecord, _DefaultRecordBatchPy
from aiokafka.record.util import decode_varint

_MemoryRecords = fetcher.MemoryRecords
_LENGTH = struct.Struct(">i")  # after the base offset: the batch's length from the next field on
_MAGIC_AT = 16  # base offset (8), length (4), partition leader epoch (4)


class TolerantRecords:
    """aiokafka's MemoryRecords over one fetched partition, with the bytes of each batch at hand."""

    __slots__ = ("_records", "_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._records = _MemoryRecords(data)
        self._data = data
        self._pos = 0

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self):
        batch = self._records.next_batch()
        if batch is None:
            return None
        start = self._pos
        self._pos = end = start + 12 + _LENGTH.unpack_from(self._data, start + 8)[0]
        if self._data[start + _MAGIC_AT] != 2:  # message formats 0 and 1 have no headers
            return batch
        return _Batch(batch, self._data[start:end])


class _Batch:
    """One record batch: aiokafka's reader, and ours when a header key is not UTF-8."""

    __slots__ = ("_batch", "_raw")

    def __init__(self, batch, raw: bytes) -> None:
        self._batch, self._raw = batch, raw

    def __getattr__(self, name):  # base_offset, next_offset, is_control_batch, validate_crc, ...
        return getattr(self._batch, name)

    def __next__(self):  # control batches are read one record at a time
        return next(self._batch)

    def __iter__(self):
        read = 0
        try:
            for record in self._batch:
                yield record
                read += 1
        except (UnicodeDecodeError, CorruptRecordException) as exc:
            # aiokafka's C reader raises the first, its Python reader wraps it in the second
            if not isinstance(exc, UnicodeDecodeError) and "UnicodeDecodeError" not in str(exc):
                raise
            for i, record in enumerate(read_batch(self._raw)):
                if i >= read:
                    yield record


def _nullable(buf, pos: int) -> tuple[bytes | None, int]:
    n, pos = decode_varint(buf, pos)
    if n < 0:
        return None, pos
    return bytes(buf[pos:pos + n]), pos + n


def read_batch(raw: bytes):
    """The records of one v2 record batch, header keys decoded with `surrogateescape`."""
    batch = _DefaultRecordBatchPy(raw)
    batch._maybe_uncompress()
    buf, pos = batch._buffer, batch._pos
    log_append = batch.timestamp_type == batch.LOG_APPEND_TIME
    for _ in range(batch._num_records):
        length, pos = decode_varint(buf, pos)
        end = pos + length
        _, pos = decode_varint(buf, pos)  # attributes: unused in v2 records
        ts_delta, pos = decode_varint(buf, pos)
        offset_delta, pos = decode_varint(buf, pos)
        key, pos = _nullable(buf, pos)
        value, pos = _nullable(buf, pos)
        count, pos = decode_varint(buf, pos)
        headers = []
        for _ in range(count):
            name, pos = _nullable(buf, pos)
            header_value, pos = _nullable(buf, pos)
            headers.append(((name or b"").decode("utf-8", "surrogateescape"), header_value))
        if pos != end:
            raise CorruptRecordException(f"record size {length} does not match its fields")
        timestamp = batch.max_timestamp if log_append else batch.first_timestamp + ts_delta
        yield DefaultRecord(batch.base_offset + offset_delta, timestamp, batch.timestamp_type, key, value,
                            headers)
        pos = end


def install() -> None:
    """Process-wide: every aiokafka consumer of this process reads such records."""
    fetcher.MemoryRecords = TolerantRecords
