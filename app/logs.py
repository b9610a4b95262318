"""Log format of the worker: `LOG_FORMAT=json` writes one JSON object per line, for log shippers.

Faust (mode) configures logging itself when the worker starts, from the app's `logging_config`
setting (a `logging.config.dictConfig` dict). With `"merge": True` mode keeps its own root logger and
level (`faust worker -l info`) and takes our `default` handler in place of its coloured one, so every
log record of the worker, Faust's and aiokafka's included, goes through `JsonFormatter`.

A line: {"ts": "2026-12-02T10:00:00.123Z", "level": "INFO", "logger": "app.main",
"message": "...", "exc": "Traceback ..."} (`exc` only with an exception; fields given with
`log.info(..., extra={...})` are added as they are). A traceback stays inside its line.

`LOG_FORMAT` unset, empty or `text`: Faust's usual text lines.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        return orjson.dumps(out, default=repr).decode()


def log_format(environ=os.environ) -> str:
    fmt = environ.get("LOG_FORMAT", "").strip().lower() or "text"
    if fmt not in FORMATS:
        raise SystemExit(f"configuration error: LOG_FORMAT={fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def logging_config(environ=os.environ) -> dict | None:
    """The `logging_config` for `faust.App`: None (Faust's default) unless LOG_FORMAT=json.

    With json, records logged before the worker sets logging up (at import: WARNING and above, which
    Python would print as bare text) get a JSON handler on the root logger too; the worker replaces it.
    """
    if log_format(environ) != "json":
        return None
    root = logging.getLogger()
    if not root.handlers:
        early = logging.StreamHandler(sys.stderr)
        early.setFormatter(JsonFormatter())
        root.addHandler(early)
    return {
        "version": 1,
        "merge": True,  # mode merges this into its own config: root logger and `-l` level stay
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        # stderr, as mode's own handler (stdout may be redirected into logging by the worker)
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
    }
