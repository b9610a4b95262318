"""Configuration from environment variables, with defaults for the embedded broker.

Every knob a user may turn is listed here once; the README's configuration table mirrors it, and
`scoring config` prints the effective values (secrets masked) and where each came from.

Read once, when the process first asks (`current()`; the wiring in `app/main.py` does), with
pydantic-settings: each value is parsed to its type and checked against its range, then the values are checked against each other (FRAUD_REVIEW_AT below FRAUD_DECLINE_AT, ...),
and the KAFKA_* security settings of `app/security.py` with them. Whatever is wrong is reported at
once, in one line naming every bad value, and the process stops:

    configuration error: BATCH_MAX=-1 must be at least 1; FRAUD_REVIEW_AT=0.9 must be below FRAUD_DECLINE_AT=0.85

An empty variable counts as unset. Python names differ from some variable names for history's sake
(`partitions` is TOPIC_PARTITIONS, `session_gap_s` is SESSION_GAP_MINUTES in seconds, ...): the
`validation_alias` of each field is its variable.
"""
from __future__ import annotations

import contextvars
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

# The pipelines a worker can run (app/pipelines.py defines them; a test keeps the two the same).
# Named here because their definitions read these settings.
PIPELINE_NAMES = ("cart", "fraud")
_TOPIC = r"^[A-Za-z0-9._-]{1,249}$"  # what Kafka accepts as a topic name
MASK = "***"
# Faust's broker_request_timeout (90 s): Faust refuses a session timeout above it at start.
FAUST_REQUEST_TIMEOUT_S = 90.0
# Faust's producer_max_request_size: the producer refuses a record larger than this.
FAUST_MAX_REQUEST_SIZE = 1_000_000

# Pass-through client options (KAFKA_CONSUMER_* / KAFKA_PRODUCER_*) that a dedicated setting or the
# service's guarantees own, and why; any other keyword of AIOKafkaConsumer / AIOKafkaProducer passes.
_SECURITY = "use KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_* and KAFKA_SASL_*"
_COMMON_RESERVED = {
    "loop": "not an option",
    "bootstrap_servers": "use BROKER_URL",
    "security_protocol": _SECURITY, "ssl_context": _SECURITY, "sasl_mechanism": _SECURITY,
    "sasl_plain_username": _SECURITY, "sasl_plain_password": _SECURITY,
    "sasl_kerberos_service_name": _SECURITY, "sasl_kerberos_domain_name": _SECURITY,
    "sasl_oauth_token_provider": _SECURITY,
}
CONSUMER_RESERVED = {
    **_COMMON_RESERVED,
    "group_id": "use APP_ID",
    "key_deserializer": "Faust reads raw bytes", "value_deserializer": "Faust reads raw bytes",
    "enable_auto_commit": "the commit gate commits offsets (app/pipeline/publish.py)",
    "auto_commit_interval_ms": "use COMMIT_INTERVAL_S",
    "auto_offset_reset": "use AUTO_OFFSET_RESET",
    "fetch_max_wait_ms": "use FETCH_WAIT_MS",
    "partition_assignment_strategy": "Faust's assignor places the table partitions",
    "session_timeout_ms": "use BROKER_SESSION_TIMEOUT",
    "heartbeat_interval_ms": "use BROKER_HEARTBEAT_INTERVAL",
    "rebalance_timeout_ms": "use BROKER_REBALANCE_TIMEOUT",
}
PRODUCER_RESERVED = {
    **_COMMON_RESERVED,
    "key_serializer": "Faust writes raw bytes", "value_serializer": "Faust writes raw bytes",
    "partitioner": "the worker routes state by Faust's murmur2 partitioner",
    "acks": "an output counts as delivered only when all in-sync replicas have it (acks=all)",
    "linger_ms": "use PRODUCER_LINGER_MS",
    "max_batch_size": "use PRODUCER_MAX_BATCH_BYTES",
    "transactional_id": "transactions are not offered",
}
COMPRESSION_TYPES = ("gzip", "snappy", "lz4", "zstd")

# Fields whose own checks failed, while the cross-field checks run (one validation at a time).
_failed: contextvars.ContextVar[dict | None] = contextvars.ContextVar("failed_settings", default=None)


class _PassThroughOptions(PydanticBaseSettingsSource):
    """KAFKA_CONSUMER_<OPTION> / KAFKA_PRODUCER_<OPTION> variables, collected per prefix."""

    PREFIXES = {"KAFKA_CONSUMER_*": "KAFKA_CONSUMER_", "KAFKA_PRODUCER_*": "KAFKA_PRODUCER_"}

    def get_field_value(self, field, field_name):  # unused: __call__ answers for all fields
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out = {}
        for alias, prefix in self.PREFIXES.items():
            found = {k: v for k, v in os.environ.items() if k.startswith(prefix) and len(k) > len(prefix)
                     and v.strip()}
            if found:
                out[alias] = found
        return out


def _option_value(raw: str):
    """An option's value: int if it looks like one, true/false as bool, else the string."""
    text = raw.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _client_options(raw: dict, prefix: str, client: str, reserved: dict) -> dict:
    """{'KAFKA_PRODUCER_COMPRESSION_TYPE': 'lz4'} -> {'compression_type': 'lz4'}, every bad name at once."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix}*: give one variable per option")
    if all(isinstance(k, str) and k.islower() for k in raw):  # already options (Settings(**kwargs))
        raw = {prefix + k.upper(): str(v) for k, v in raw.items()}
    import inspect

    import aiokafka  # only when options are given: keeps reading the settings cheap

    cls = getattr(aiokafka, client)
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "topics"}
    options, errors = {}, []
    for name in sorted(raw):
        option, value = name[len(prefix):].lower(), _option_value(raw[name])
        if option in reserved:
            errors.append(f"{name} is not passed through: {reserved[option]}")
        elif option not in known:
            errors.append(f"{name}: {cls.__name__} has no option {option!r}")
        elif option == "compression_type" and value not in COMPRESSION_TYPES:
            errors.append(f"{name}={raw[name]!r} is not one of {', '.join(COMPRESSION_TYPES)}")
        elif option == "compression_type" and not getattr(aiokafka.codec, f"has_{value}")():
            errors.append(f"{name}={value}: the {value} library is not installed")
        else:
            options[option] = value
    if errors:
        raise PydanticCustomError("pass_through", "{problems}", {"problems": "; ".join(errors)})
    return options


def _shown(raw) -> str:
    """A raw value as the error names it: numbers bare (BATCH_MAX=-1), anything else quoted."""
    text = str(raw)
    return text if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text.strip()) else repr(text)


def _phrase(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be at least {_num(ctx['ge'])}"
    if kind == "greater_than":
        return f"must be above {_num(ctx['gt'])}"
    if kind == "less_than_equal":
        return f"must be at most {_num(ctx['le'])}"
    if kind == "less_than":
        return f"must be below {_num(ctx['lt'])}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "is not an integer"
    if kind in ("float_parsing", "float_type"):
        return "is not a number"
    if kind == "finite_number":
        return "is not a finite number"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return "is not a Kafka topic name (1-249 letters, digits, '.', '_' or '-')"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"]


def _describe_error(alias: str, raw, err: dict) -> str:
    if err["type"] == "pass_through":  # names its variables itself
        return err["msg"]
    return f"{alias}={_shown(raw)} {_phrase(err)}"


def _var(name: str, default, **constraints):
    """A setting read from the environment variable `name`."""
    return Field(default, validation_alias=name, **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore",
                                      frozen=True, allow_inf_nan=False)

    app_id: str = _var("APP_ID", "scoring", min_length=1)
    broker_url: str = _var("BROKER_URL", "kafka://127.0.0.1:9092", min_length=1)
    web_host: str = _var("WEB_HOST", "127.0.0.1")
    web_port: int = _var("WEB_PORT", 6066, ge=1, le=65535)
    web_token: str = Field("", validation_alias="WEB_TOKEN", repr=False)  # secret: never shown
    # The host peers reach this worker by for routed lookups (on Kubernetes the pod's DNS name under
    # the headless Service); empty: the bind address, or the hostname for a wildcard bind.
    web_advertised_host: str = _var("WEB_ADVERTISED_HOST", "")
    data_dir: Path = _var("DATA_DIR", Path("data"))
    model_dir: Path = _var("MODEL_DIR", Path("models"))
    partitions: int = _var("TOPIC_PARTITIONS", 4, ge=1)
    # The pipelines this worker runs (app/pipelines.py). Separate worker groups per pipeline scale and
    # fail independently; on the embedded broker every subscribed partition also costs each fetch.
    pipelines: Annotated[tuple[str, ...], NoDecode] = _var("PIPELINES", PIPELINE_NAMES)
    standby_replicas: int = _var("STANDBY_REPLICAS", 0, ge=0)
    # Session ends after this much event-time inactivity: SESSION_GAP_MINUTES, kept in seconds (the
    # default too is in minutes: defaults go through the same validation as the environment's values).
    session_gap_s: float = _var("SESSION_GAP_MINUTES", 30.0, gt=0)
    # Micro-batch: at most this many events per predict/publish round. No fixed wait: a batch is
    # whatever has been fetched when the previous round ends. Each round costs two broker round
    # trips (outputs, then state), so under load larger rounds drain faster (bench: 2000 -> 5000
    # gave about +15%); the agent's intake holds at most twice this many fetched records.
    batch_max: int = _var("BATCH_MAX", 5000, ge=1)
    # State is written behind, for several batches at once while records are waiting (see
    # app/pipeline/writer.py): at most this many events or this long. A key several batches touch is
    # written and changelogged once; offsets are committed once their state is written.
    state_flush_events: int = _var("STATE_FLUSH_EVENTS", 20_000, ge=1)
    state_flush_ms: float = _var("STATE_FLUSH_MS", 500.0, gt=0)
    retry_attempts: int = _var("RETRY_ATTEMPTS", 5, ge=1)
    retry_base_ms: float = _var("RETRY_BASE_MS", 50.0, ge=0)
    retry_max_ms: float = _var("RETRY_MAX_MS", 2000.0, ge=0)
    max_event_bytes: int = _var("MAX_EVENT_BYTES", 65536, ge=1)
    # A dead letter keeps the failed record's bytes up to this size in all (value cut beyond, with its
    # size and SHA-256 in headers): below the broker's message.max.bytes, or it is refused forever.
    dead_letter_max_bytes: int = _var("DEAD_LETTER_MAX_BYTES", 512 * 1024, ge=1024)
    # Fetched records waiting for an agent, in bytes (besides 2 x BATCH_MAX records): a burst of large
    # records holds up the fetcher instead of filling memory.
    intake_max_bytes: int = _var("INTAKE_MAX_BYTES", 64 << 20, ge=1)
    # Kafka client tuning; chosen per broker (see README's configuration table, FETCH_WAIT_MS).
    fetch_wait_ms: int = _var("FETCH_WAIT_MS", 10, ge=0)
    linger_ms: int = _var("PRODUCER_LINGER_MS", 2, ge=0)
    # Per topic-partition record batch. aiokafka queues one batch per partition at a time, so a
    # micro-batch's outputs that overflow Faust's 16 KB default wait one broker round trip per
    # extra batch. Must stay below the broker's message.max.bytes (1 MB by default).
    producer_max_batch_bytes: int = _var("PRODUCER_MAX_BATCH_BYTES", 512 * 1024, ge=1)
    commit_interval_s: float = _var("COMMIT_INTERVAL_S", 1.0, gt=0)
    rebalance_timeout_s: float = _var("BROKER_REBALANCE_TIMEOUT", 3.0, gt=0)
    session_timeout_s: float = _var("BROKER_SESSION_TIMEOUT", 6.0, gt=0)
    heartbeat_s: float = _var("BROKER_HEARTBEAT_INTERVAL", 1.0, gt=0)
    # Topic names. Internal topics (the repartition hops, the tables' changelogs) are named
    # <INTERNAL_TOPIC_PREFIX>-<input>-by-<key> and <INTERNAL_TOPIC_PREFIX>-<table>-changelog; the
    # prefix defaults to APP_ID (the consumer group), as Faust names them. Faust's own leader topic
    # is always <APP_ID>-__assignor-__leader.
    cart_input_topic: str = _var("CART_INPUT_TOPIC", "cart_events", pattern=_TOPIC)
    cart_output_topic: str = _var("CART_OUTPUT_TOPIC", "personalization_scores", pattern=_TOPIC)
    fraud_input_topic: str = _var("FRAUD_INPUT_TOPIC", "transactions", pattern=_TOPIC)
    fraud_output_topic: str = _var("FRAUD_OUTPUT_TOPIC", "fraud_decisions", pattern=_TOPIC)
    dead_letter_topic: str = _var("DEAD_LETTER_TOPIC", "dead_letters", pattern=_TOPIC)
    internal_topic_prefix: str = _var("INTERNAL_TOPIC_PREFIX", "", pattern=r"^[A-Za-z0-9._-]{0,200}$")
    # Where `scoring models promote|rollback|shadow` tell every worker which model to score with
    # (compacted, one partition; app/models/control.py); empty: <INTERNAL_TOPIC_PREFIX>-model-control.
    model_control_topic: str = _var("MODEL_CONTROL_TOPIC", "", pattern=r"^([A-Za-z0-9._-]{1,249})?$")
    # Labels that come back later (fraud: chargebacks, reviews), JSON {"<id field>": ..., "label": 0|1}:
    # matched with the champion's and the challenger's recent scores, for their AUC on the same events.
    cart_label_topic: str = _var("CART_LABEL_TOPIC", "cart_labels", pattern=_TOPIC)
    fraud_label_topic: str = _var("FRAUD_LABEL_TOPIC", "fraud_labels", pattern=_TOPIC)
    # Where a consumer group without a committed offset starts reading an input topic.
    auto_offset_reset: Literal["earliest", "latest"] = _var("AUTO_OFFSET_RESET", "earliest")
    # Thresholds of the fraud decision: score >= review -> review, >= decline -> decline.
    fraud_review_at: float = _var("FRAUD_REVIEW_AT", 0.5, ge=0, le=1)
    fraud_decline_at: float = _var("FRAUD_DECLINE_AT", 0.85, ge=0, le=1)
    # Which decisions carry their reasons: `flagged` (review and decline, the ones a person reads) or
    # `all`. Explaining every approval costs about 0.75 ms per transaction (docs/fraud.md).
    fraud_reasons: Literal["flagged", "all"] = _var("FRAUD_REASONS", "flagged")
    # Fault injection for failure tests and drills (see app/dev/faults.py); empty = off.
    fault_file: str = _var("FAULT_FILE", "")
    # Read by app/logs.py, which applies it; here so that it is checked and shown with the rest.
    log_format: Literal["text", "json"] = _var("LOG_FORMAT", "text")
    # Any other keyword of AIOKafkaConsumer / AIOKafkaProducer, for the worker's Faust clients
    # (app/kafka/patches.py): KAFKA_PRODUCER_COMPRESSION_TYPE=lz4 -> compression_type='lz4'.
    consumer_options: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict,
                                                                  validation_alias="KAFKA_CONSUMER_*")
    producer_options: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict,
                                                                  validation_alias="KAFKA_PRODUCER_*")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The environment only (no .env or secrets directory), plus the pass-through prefixes.
        return init_settings, env_settings, _PassThroughOptions(settings_cls)

    # -- parsing ----------------------------------------------------------------------------------

    @field_validator("pipelines", mode="before")
    @classmethod
    def _pipeline_list(cls, value):
        names = tuple(p.strip() for p in value.split(",") if p.strip()) if isinstance(value, str) else tuple(value)
        unknown = [n for n in names if n not in PIPELINE_NAMES]
        if not names or unknown:
            which = ("names no pipeline" if not unknown else f"names {unknown[0]}, which is not a pipeline"
                     if len(unknown) == 1 else f"names {', '.join(unknown)}, which are not pipelines")
            raise ValueError(f"{which}: name one or more of {', '.join(PIPELINE_NAMES)}")
        return names

    @field_validator("auto_offset_reset", "log_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("session_gap_s", mode="after")
    @classmethod
    def _minutes(cls, value: float) -> float:
        return value * 60  # SESSION_GAP_MINUTES, kept in seconds

    @field_validator("consumer_options", mode="before")
    @classmethod
    def _consumer_options(cls, value):
        return _client_options(value, "KAFKA_CONSUMER_", "AIOKafkaConsumer", CONSUMER_RESERVED)

    @field_validator("producer_options", mode="before")
    @classmethod
    def _producer_options(cls, value):
        return _client_options(value, "KAFKA_PRODUCER_", "AIOKafkaProducer", PRODUCER_RESERVED)

    # -- one error for everything ---------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _start_collecting(cls, data):
        _failed.set({})
        return data

    @field_validator("*", mode="wrap")
    @classmethod
    def _collect(cls, value, handler, info: ValidationInfo):
        """A bad value is noted (and the default stands in for it) so that every other value, and
        every cross-field check not involving it, is still checked: one error lists them all."""
        try:
            return handler(value)
        except ValidationError as exc:
            failed = _failed.get()
            if failed is None:
                raise
            alias = cls.model_fields[info.field_name].validation_alias
            failed[info.field_name] = "; ".join(_describe_error(alias, value, e) for e in exc.errors())
            return handler(cls.model_fields[info.field_name].get_default(call_default_factory=True))

    @model_validator(mode="after")
    def _check_together(self):
        failed = _failed.get() or {}
        _failed.set(None)
        problems = [failed[name] for name in type(self).model_fields if name in failed]
        ok = lambda *names: not any(n in failed for n in names)  # noqa: E731

        def below(a: str, b: str, value_a, value_b, strict: bool = True) -> None:
            if ok(a, b) and (value_a >= value_b if strict else value_a > value_b):
                word = "below" if strict else "at most"
                problems.append(f"{_alias(a)}={_num(value_a)} must be {word} {_alias(b)}={_num(value_b)}")

        below("fraud_review_at", "fraud_decline_at", self.fraud_review_at, self.fraud_decline_at)
        below("heartbeat_s", "session_timeout_s", self.heartbeat_s, self.session_timeout_s)
        below("retry_base_ms", "retry_max_ms", self.retry_base_ms, self.retry_max_ms, strict=False)
        topics = [(a, getattr(self, a)) for a in ("cart_input_topic", "cart_output_topic", "fraud_input_topic",
                                                   "fraud_output_topic", "dead_letter_topic", "model_control_topic",
                                                   "cart_label_topic", "fraud_label_topic") if ok(a) and getattr(self, a)]
        for i, (a, name) in enumerate(topics):
            clash = next((b for b, other in topics[:i] if other == name), None)
            if clash is not None:
                problems.append(f"{_alias(a)}={name!r} must differ from {_alias(clash)}={name!r}")
        if ok("session_timeout_s") and self.session_timeout_s > FAUST_REQUEST_TIMEOUT_S:
            problems.append(f"BROKER_SESSION_TIMEOUT={_num(self.session_timeout_s)} must be at most "
                            f"{_num(FAUST_REQUEST_TIMEOUT_S)} (Faust's broker_request_timeout)")
        max_request = self.producer_options.get("max_request_size", FAUST_MAX_REQUEST_SIZE)
        if ok("dead_letter_max_bytes", "producer_options") and isinstance(max_request, int) \
                and self.dead_letter_max_bytes >= max_request:
            where = ("KAFKA_PRODUCER_MAX_REQUEST_SIZE" if "max_request_size" in self.producer_options
                     else "the producer's max_request_size")
            problems.append(f"DEAD_LETTER_MAX_BYTES={self.dead_letter_max_bytes} must be below {where}="
                            f"{max_request} (a larger letter could never be sent)")
        if problems:
            raise PydanticCustomError("configuration", "{problems}", {"problems": "; ".join(problems)})
        return self

    # -- reading ---------------------------------------------------------------------------------

    @property
    def topic_prefix(self) -> str:
        """INTERNAL_TOPIC_PREFIX, or APP_ID when it is not set."""
        return self.internal_topic_prefix or self.app_id

    @property
    def advertised_host(self) -> str:
        # WEB_ADVERTISED_HOST: the name peers reach this worker by for routed lookups (on Kubernetes
        # the pod's DNS name under the headless Service); else the bind address, or the hostname.
        if self.web_advertised_host.strip():
            return self.web_advertised_host.strip()
        return socket.gethostname() if self.web_host in ("", "0.0.0.0", "::") else self.web_host

    def describe(self) -> dict:
        """Every setting by its Python name, as text; the token left out."""
        return {name: str(getattr(self, name)) for name in type(self).model_fields if name != "web_token"}

    def effective(self, environ=None) -> list[tuple[str, str, str]]:
        """(variable, value as the variable means it, 'env' or 'default') for every setting; the
        token masked. Pass-through options are listed one per variable."""
        environ = os.environ if environ is None else environ
        rows = []
        for name, field in type(self).model_fields.items():
            alias, value = field.validation_alias, getattr(self, name)
            if name in ("consumer_options", "producer_options"):
                prefix = alias[:-1]
                rows += [(prefix + option.upper(), str(v).lower() if isinstance(v, bool) else str(v), "env")
                         for option, v in sorted(value.items())]
                continue
            if name == "session_gap_s":
                value = _num(value / 60)
            elif name == "pipelines":
                value = ",".join(value)
            elif name == "web_token":
                value = MASK if value else ""
            elif name == "web_advertised_host":
                value = self.advertised_host  # what peers are told, set or derived
            source = "env" if (environ.get(alias) or "").strip() else "default"
            rows.append((alias, str(value), source))
        return rows


def _alias(name: str) -> str:
    return Settings.model_fields[name].validation_alias


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def bootstrap_servers(url: str) -> str:
    """A Faust broker URL (kafka://h:p[;kafka://h2:p2]) as an aiokafka bootstrap list."""
    return ",".join(u.split("://", 1)[-1] for u in url.replace(";", ",").split(","))


class ConfigurationError(ValueError):
    """Bad settings; the message names every bad value, on one line."""


def load() -> Settings:
    """The settings of this process and the KAFKA_* security settings, checked together.
    ConfigurationError lists every bad value of both."""
    problems = []
    try:
        s = Settings()
    except ValidationError as exc:
        s = None
        problems += [e["msg"] if e["type"] == "configuration" else
                     _describe_error(".".join(map(str, e["loc"])), e.get("input"), e) for e in exc.errors()]
    from app import security  # stdlib only at import: no cycle

    try:
        security.load()
    except security.SecurityConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigurationError("; ".join(problems))
    return s


_current: Settings | None = None


def current() -> Settings:
    """The settings of this process, read from the environment at the first call; bad settings
    stop the process with one line naming each."""
    global _current
    if _current is None:
        try:
            _current = load()
        except ConfigurationError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
    return _current
