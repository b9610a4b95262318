"""`scoring config`: every setting with its value and where it came from; secrets masked."""
from __future__ import annotations

import os

import orjson

from app import security


def rows(settings) -> list[tuple[str, str, str]]:
    """(variable, value, 'env' or 'default'): the settings, and the KAFKA_* security settings as
    `security.describe()` shows them (secrets masked)."""
    out = settings.effective()
    out += [(name, str(value).lower() if isinstance(value, bool) else str(value),
             "env" if os.environ.get(name, "").strip() else "default")
            for name, value in security.describe().items()]
    return out


def show(settings, as_json: bool) -> str:
    found = rows(settings)
    if as_json:
        return orjson.dumps({name: {"value": value, "from": source} for name, value, source in found},
                            option=orjson.OPT_INDENT_2).decode()
    width = max(len(name) for name, _, _ in found)
    vwidth = min(48, max(len(value) for _, value, _ in found))
    return "\n".join(f"{name:<{width}}  {value or '(empty)':<{vwidth}}  {source}" for name, value, source in found)
