"""The Faust app: settings in, topics, tables, processors and agents wired. Nothing else here."""
from __future__ import annotations

import logging

import faust

from app import collector, deadletters, faust_patches, intake, logs, security
from app.faults import Faults, install_publish_faults
from app.gate import RetryPolicy
from app.kafka import records
from app.processor import Processor
from app.scorer import ModelMismatch, Scorer
from app.settings import settings
from app.usecases import USE_CASES
from tables.store import declare

log = logging.getLogger(__name__)

faust_patches.install(settings.fetch_wait_ms)
intake.install()
records.install()

app = faust.App(
    settings.app_id,
    broker=settings.broker_url,
    # KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_*, KAFKA_SASL_* (app/security.py); a broker certificate that
    # will not verify stops the worker here with one line.
    broker_credentials=security.broker_credentials(settings.broker_url),
    store="rocksdb://",
    logging_config=logs.logging_config(),  # LOG_FORMAT=json: one JSON object per line (app/logs.py)
    datadir=str(settings.data_dir),
    web_host=settings.web_host,
    web_port=settings.web_port,
    # Peers forward table lookups here (table_route); a wildcard bind is not an address.
    canonical_url=f"http://{settings.advertised_host}:{settings.web_port}",
    # Faust's /table/{name}/{key} views read any key of any table, unchecked: the routed views of
    # app.web answer those questions with the checks a key from a URL needs.
    web_tables_enabled=False,
    topic_partitions=settings.partitions,
    table_standby_replicas=settings.standby_replicas,
    broker_rebalance_timeout=settings.rebalance_timeout_s,
    broker_session_timeout=settings.session_timeout_s,
    broker_heartbeat_interval=settings.heartbeat_s,
    broker_commit_interval=settings.commit_interval_s,
    producer_linger=settings.linger_ms / 1000.0,
    producer_max_batch_size=settings.producer_max_batch_bytes,
    consumer_auto_offset_reset=settings.auto_offset_reset,  # AUTO_OFFSET_RESET
)

faults = Faults(settings.fault_file) if settings.fault_file else None
policy = RetryPolicy(settings.retry_attempts, settings.retry_base_ms, settings.retry_max_ms)


def raw_topic(*names: str, **kw) -> faust.TopicT:
    # Raw bytes in and out: decoding happens inside the agent, where a bad record can become a
    # dead letter (Faust's own deserializer would log it and commit it).
    # internal=True: Faust creates (if missing) the topics an agent reads, with TOPIC_PARTITIONS,
    # before it subscribes; otherwise the broker auto-creates them with its own default count and the
    # first table write fails with PartitionsMismatch against the changelog (TOPIC_PARTITIONS).
    kw.setdefault("internal", True)
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=settings.partitions, **kw)


dead_letter_topic = raw_topic(deadletters.TOPIC)


class Pipeline:
    """A use case's topics, table, model and processor."""

    def __init__(self, name: str) -> None:
        self.usecase = uc = USE_CASES[name]
        self.repartition_topic_name = f"{settings.app_id}-{uc.source_topic}-by-{uc.key_field}"
        # One agent consumes both: records already keyed by the state key are processed where they
        # are; the others make one hop through the repartition topic (co-partitioned with it).
        self.input = raw_topic(uc.source_topic, self.repartition_topic_name)
        self.output = raw_topic(uc.output_topic)
        self.repartition = raw_topic(self.repartition_topic_name, internal=True)
        self.table = declare(app, uc.table_name, help=f"{uc.name} state per {uc.key_field}")
        self.scorer = None
        self.processor = None

    def load_model(self) -> None:
        try:
            self.scorer = Scorer(settings.model_dir / self.usecase.name, self.usecase.feature_names)
        except ModelMismatch as exc:
            raise SystemExit(f"cannot start {self.usecase.name} pipeline: {exc}") from None
        self.processor = Processor(app, self.usecase, self.table, self.scorer, self.repartition_topic_name,
                                   policy, faults, settings.max_event_bytes, settings.state_flush_events,
                                   settings.state_flush_ms, settings.dead_letter_max_bytes)
        log.info("%s model %s loaded (%d features)", self.usecase.name, self.scorer.version,
                 len(self.usecase.feature_names))


if not settings.pipelines or set(settings.pipelines) - set(USE_CASES):
    raise SystemExit(f"configuration error: PIPELINES={','.join(settings.pipelines)!r}: "
                     f"name one or more of {', '.join(USE_CASES)}")
pipelines = {name: Pipeline(name) for name in settings.pipelines}


# Loaded at import, so a worker with a missing or mismatched model refuses to start at all.
for _p in pipelines.values():
    _p.load_model()


@app.on_worker_init.connect
def _install_faults(*args, **kwargs) -> None:
    if faults is not None:
        install_publish_faults(app, faults)


import agents  # noqa: E402,F401  (registers the agents on `app`)
from app import web as _web  # noqa: E402,F401  (registers the web views)

collector.install()
