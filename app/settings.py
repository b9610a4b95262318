"""Configuration from environment variables, with defaults for the embedded broker.

Every knob a user may turn is listed here once; the README's configuration table mirrors it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _number(name: str, default, kind=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"configuration error: {name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None


def _int(name: str, default: int) -> int:
    return _number(name, default, int)


def _float(name: str, default: float) -> float:
    return _number(name, default, float)


@dataclass(frozen=True)
class Settings:
    app_id: str = field(default_factory=lambda: _env("APP_ID", "scoring"))
    broker_url: str = field(default_factory=lambda: _env("BROKER_URL", "kafka://127.0.0.1:9092"))
    web_host: str = field(default_factory=lambda: _env("WEB_HOST", "127.0.0.1"))
    web_port: int = field(default_factory=lambda: _int("WEB_PORT", 6066))
    web_token: str = field(default_factory=lambda: _env("WEB_TOKEN", ""))
    data_dir: Path = field(default_factory=lambda: Path(_env("DATA_DIR", "data")))
    model_dir: Path = field(default_factory=lambda: Path(_env("MODEL_DIR", "models")))
    partitions: int = field(default_factory=lambda: _int("TOPIC_PARTITIONS", 4))
    # The pipelines this worker runs (app/usecases.py). Separate worker groups per pipeline scale and
    # fail independently; on the embedded broker every subscribed partition also costs each fetch.
    pipelines: tuple[str, ...] = field(default_factory=lambda: tuple(
        p.strip() for p in _env("PIPELINES", "cart,fraud").split(",") if p.strip()))
    standby_replicas: int = field(default_factory=lambda: _int("STANDBY_REPLICAS", 0))
    # Session ends after this much event-time inactivity.
    session_gap_s: float = field(default_factory=lambda: _float("SESSION_GAP_MINUTES", 30) * 60)
    # Micro-batch: at most this many events per predict/publish round. No fixed wait: a batch is
    # whatever has been fetched when the previous round ends. Each round costs two broker round
    # trips (outputs, then state), so under load larger rounds drain faster (bench: 2000 -> 5000
    # gave about +15%); the agent's intake holds at most twice this many fetched records.
    batch_max: int = field(default_factory=lambda: _int("BATCH_MAX", 5000))
    # State is written behind, for several batches at once while records are waiting (see
    # app/processor.py): at most this many events or this long. A key several batches touch is
    # written and changelogged once; offsets are committed once their state is written.
    state_flush_events: int = field(default_factory=lambda: _int("STATE_FLUSH_EVENTS", 20_000))
    state_flush_ms: float = field(default_factory=lambda: _float("STATE_FLUSH_MS", 500))
    retry_attempts: int = field(default_factory=lambda: _int("RETRY_ATTEMPTS", 5))
    retry_base_ms: float = field(default_factory=lambda: _float("RETRY_BASE_MS", 50))
    retry_max_ms: float = field(default_factory=lambda: _float("RETRY_MAX_MS", 2000))
    max_event_bytes: int = field(default_factory=lambda: _int("MAX_EVENT_BYTES", 65536))
    # Kafka client tuning; chosen per broker (see README "Latency").
    fetch_wait_ms: int = field(default_factory=lambda: _int("FETCH_WAIT_MS", 10))
    linger_ms: int = field(default_factory=lambda: _int("PRODUCER_LINGER_MS", 2))
    # Per topic-partition record batch. aiokafka queues one batch per partition at a time, so a
    # micro-batch's outputs that overflow Faust's 16 KB default wait one broker round trip per
    # extra batch. Must stay below the broker's message.max.bytes (1 MB by default).
    producer_max_batch_bytes: int = field(default_factory=lambda: _int("PRODUCER_MAX_BATCH_BYTES", 512 * 1024))
    commit_interval_s: float = field(default_factory=lambda: _float("COMMIT_INTERVAL_S", 1.0))
    rebalance_timeout_s: float = field(default_factory=lambda: _float("BROKER_REBALANCE_TIMEOUT", 3))
    session_timeout_s: float = field(default_factory=lambda: _float("BROKER_SESSION_TIMEOUT", 6))
    heartbeat_s: float = field(default_factory=lambda: _float("BROKER_HEARTBEAT_INTERVAL", 1))
    # Thresholds of the fraud decision: score >= review -> review, >= decline -> decline.
    fraud_review_at: float = field(default_factory=lambda: _float("FRAUD_REVIEW_AT", 0.5))
    fraud_decline_at: float = field(default_factory=lambda: _float("FRAUD_DECLINE_AT", 0.85))
    # Fault injection for failure tests and drills (see app/faults.py); empty = off.
    fault_file: str = field(default_factory=lambda: _env("FAULT_FILE", ""))

    @property
    def advertised_host(self) -> str:
        return socket.gethostname() if self.web_host in ("", "0.0.0.0", "::") else self.web_host

    def describe(self) -> dict:
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "web_token"}


settings = Settings()
