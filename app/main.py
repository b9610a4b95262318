"""The worker, wired: settings in, the Faust app out. Every part is built here and handed in.

`faust -A app worker` finds the app as `app.app` (app/__init__.py builds it on first access); no
module of the service imports this one, and importing any of them builds, loads or patches nothing.

    settings ─► topology (topic names) ─► Faust app, its raw topics, the tables
                 │
                 ├─ per pipeline: live models ─► processor (app/pipeline) ◄─ state writer ◄─ table
                 │     ▲ promotions from the model control topic (app/models/control.py, live.py)
                 │                            ▲ records from the intake (app/kafka/intake.py)
                 │                            └── agents/scoring.py: one loop per pipeline
                 ├─ dead letters: agents/dead_letters.py ─► stats table
                 └─ web views (app/web), metrics, the GC policy
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faust

from agents import dead_letters, scoring
from app import gc_policy, logs, metrics, security, web
from app.kafka import broadcast, intake, patches, records, restore, standby, store
from app.kafka.producer import BatchProducer
from app.models.live import LiveModels, ModelControl
from app.models.quality import ShadowQuality
from app.models.scorer import ModelMismatch, Scorer
from app.pipeline.processor import Processor
from app.pipeline.writer import StateWriter
from app.pipelines import Pipeline
from app.retry import RetryPolicy
from app.settings import Settings, bootstrap_servers
from app.topology import Topology, raw_topic

log = logging.getLogger(__name__)


@dataclass
class Running:
    """One pipeline as this worker runs it."""

    pipeline: Pipeline
    topic: faust.TopicT  # its input topic and its repartition topic: one agent reads both
    sink: intake.RecordSink
    table: store.GatedTable
    writer: StateWriter
    models: LiveModels
    processor: Processor
    quality: ShadowQuality  # the champion and a challenger on the same events, as labels come back


@dataclass
class DeadLetters:
    topic: faust.TopicT
    sink: intake.RecordSink
    table: store.GatedTable
    writer: StateWriter


@dataclass
class Service:
    """The built worker: the Faust app and the parts the agents and web views were handed."""

    faust: faust.App
    settings: Settings
    topology: Topology
    producer: BatchProducer
    pipelines: dict[str, Running]
    dead_letters: DeadLetters
    control: ModelControl


def faust_app(settings: Settings) -> faust.App:
    return faust.App(
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


def load_model(settings: Settings, pipeline: Pipeline) -> Scorer:
    """The pipeline's model at start (a promotion on the control topic replaces it once read); a
    worker with a missing or mismatched one does not start at all."""
    try:
        model = Scorer(settings.model_dir / pipeline.name, pipeline.feature_names)
    except ModelMismatch as exc:
        raise SystemExit(f"cannot start {pipeline.name} pipeline: {exc}") from None
    log.info("%s model %s loaded (%d features)", pipeline.name, model.version, len(pipeline.feature_names))
    return model


def labels_of(bootstrap: str, running: Running):
    """The task that reads the pipeline's label topic from its end, for the shadow's AUC."""
    async def follow_labels() -> None:
        async def nothing(records) -> None:
            pass

        async def label(record) -> None:
            running.quality.label(record.value)

        await broadcast.follow(bootstrap, running.pipeline.label_topic, nothing, label, from_beginning=False,
                               compacted=False)

    follow_labels.__name__ = follow_labels.__qualname__ = f"labels_{running.pipeline.name}"
    return follow_labels


def build(settings: Settings | None = None, *, producer: BatchProducer | None = None) -> Service:
    """The worker from `settings` (default: this process's, from the environment). `producer` replaces
    the sender of every record the worker writes (tests and the in-process benchmark acknowledge
    them without a broker)."""
    from app import settings as configuration

    settings = settings or configuration.current()
    # Process-wide changes to Faust and aiokafka, each explained where it is made.
    patches.install(settings.fetch_wait_ms, settings.producer_options, settings.consumer_options)
    intake.install()
    records.install()
    ours = lambda table: isinstance(table, store.GatedTable)  # noqa: E731
    restore.install(bootstrap_servers(settings.broker_url), ours)
    standby.install(bootstrap_servers(settings.broker_url), ours)

    app = faust_app(settings)
    topology = Topology.from_settings(settings)
    faults = None
    if settings.fault_file:
        from app.dev.faults import Faults

        faults = Faults(settings.fault_file)
    producer = producer or BatchProducer(app, faults)
    policy = RetryPolicy(settings.retry_attempts, settings.retry_base_ms, settings.retry_max_ms)

    def sink_for(topic) -> intake.RecordSink:
        return intake.sink_for(app, topic, capacity=2 * settings.batch_max, capacity_bytes=settings.intake_max_bytes)

    def writer_for(table, name: str) -> StateWriter:
        writer = StateWriter(table, policy, settings.state_flush_events, settings.state_flush_ms, name,
                             flush_seconds=metrics.STATE_FLUSH.labels(name))
        writer.on_written = gc_policy.state_written
        return writer

    running = {}
    for name in settings.pipelines:
        pipeline = topology.pipelines[name]
        topic = raw_topic(app, settings.partitions, pipeline.source_topic, pipeline.repartition_topic)
        raw_topic(app, settings.partitions, pipeline.output_topic)
        raw_topic(app, settings.partitions, pipeline.repartition_topic)
        table = store.declare(app, pipeline.table_name, f"{name} state per {pipeline.key_field}", producer,
                              topology.prefix)
        writer = writer_for(table, name)
        models = LiveModels(pipeline, load_model(settings, pipeline), settings.data_dir / "models")
        processor = Processor(pipeline, producer=producer, writer=writer, models=models, policy=policy,
                              partitions=settings.partitions, dead_letter_topic=topology.dead_letters,
                              max_event_bytes=settings.max_event_bytes,
                              dead_letter_max_bytes=settings.dead_letter_max_bytes, faults=faults)
        quality = ShadowQuality(pipeline)
        processor.observers.append(quality.record)
        running[name] = Running(pipeline, topic, sink_for(topic), table, writer, models, processor, quality)

    letters_topic = raw_topic(app, settings.partitions, topology.dead_letters)
    letters_table = store.declare(app, "dead_letter_stats", "dead letters per dead-letter partition", producer,
                                  topology.prefix)
    letters = DeadLetters(letters_topic, sink_for(letters_topic), letters_table,
                          writer_for(letters_table, "dead_letters"))
    control = ModelControl({name: r.models for name, r in running.items()}, topology.pipelines,
                           bootstrap_servers(settings.broker_url), topology.model_control)
    service = Service(app, settings, topology, producer, running, letters, control)

    for name, r in running.items():
        metrics.watch_intake(name, r.sink)
        scoring.register(app, name, r.topic, r.sink, r.processor, settings.batch_max, settings.data_dir,
                         before_first=control.wait_ready)
    dead_letters.register(app, letters.topic, letters.sink, letters.writer, settings.batch_max)
    # Every worker follows the model control topic, and the labels that come back
    bootstrap = bootstrap_servers(settings.broker_url)
    app.task(control.run)
    for r in running.values():
        app.task(labels_of(bootstrap, r))
    web.register(service)
    app.on_worker_init.connect(lambda *a, **kw: gc_policy.install())
    return service
