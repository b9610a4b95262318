"""Bytes to validated event: the only place input is trusted.

Agents consume raw bytes and call `decode` inside their loop, so a bad record becomes a dead letter
with its reason instead of an exception inside Faust's deserializer (which would commit it unseen).
A schema is a tuple of `Field`s; unknown extra fields are ignored.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from app.errors import Poison

# Plausible event time: 2001-09-09 .. 2100-01-01 (epoch ms). Outside that, the producer is broken.
MIN_TS_MS = 1_000_000_000_000
MAX_TS_MS = 4_102_444_800_000


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # str, int or float
    required: bool = True
    choices: frozenset | None = None
    minimum: float | None = None
    exclusive_min: bool = False
    maximum: float | None = None
    pattern: re.Pattern | None = None
    max_len: int = 256

    def check(self, value: Any) -> Any:
        if self.kind is float:
            # JSON has no int/float distinction that a producer can be held to.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Poison("validate", f"field {self.name!r} must be a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise Poison("validate", f"field {self.name!r} must be finite")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise Poison("validate", f"field {self.name!r} must be an integer, got {type(value).__name__}")
        elif not isinstance(value, str):
            raise Poison("validate", f"field {self.name!r} must be a string, got {type(value).__name__}")
        elif not value or len(value) > self.max_len:
            raise Poison("validate", f"field {self.name!r} must have 1..{self.max_len} characters")
        if self.choices is not None and value not in self.choices:
            raise Poison("validate", f"field {self.name!r} has unknown value {value!r}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise Poison("validate", f"field {self.name!r} value {value!r} is malformed")
        if self.minimum is not None and (value <= self.minimum if self.exclusive_min else value < self.minimum):
            op = ">" if self.exclusive_min else ">="
            raise Poison("validate", f"field {self.name!r} must be {op} {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise Poison("validate", f"field {self.name!r} must be <= {self.maximum}, got {value!r}")
        return value


def timestamp(name: str = "ts") -> Field:
    return Field(name, int, minimum=MIN_TS_MS, maximum=MAX_TS_MS)


Schema = tuple[Field, ...]
Check = Callable[[dict], None]


def decode(raw: bytes | None, schema: Schema, max_bytes: int, check: Check | None = None) -> dict:
    """Parse and validate one record value; raise `Poison` with the failing stage."""
    if raw is None:
        raise Poison("decode", "record has no value")
    if len(raw) > max_bytes:
        raise Poison("decode", f"value is {len(raw)} bytes, limit is {max_bytes}")
    try:
        obj = orjson.loads(raw)  # rejects invalid UTF-8 as well as invalid JSON
    except orjson.JSONDecodeError as exc:
        raise Poison("decode", f"not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Poison("decode", f"JSON value must be an object, got {type(obj).__name__}")
    event = {}
    for f in schema:
        value = obj.get(f.name)
        if value is None:
            if f.required:
                raise Poison("validate", f"missing field {f.name!r}")
            continue
        event[f.name] = f.check(value)
    if check is not None:
        check(event)
    return event
