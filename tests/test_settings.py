"""Settings (app/settings.py): types, ranges, cross-field checks, one error naming every bad value,
pass-through client options, `scoring config`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from app import settings as settings_module
from app.settings import ConfigurationError, Settings, load
from tests.harness import MODEL_DIR, ROOT, produce_events, read_json

# What app/settings.py read before pydantic-settings, by variable: the defaults must not move.
DEFAULTS = {
    "APP_ID": ("app_id", "scoring"), "BROKER_URL": ("broker_url", "kafka://127.0.0.1:9092"),
    "WEB_HOST": ("web_host", "127.0.0.1"), "WEB_PORT": ("web_port", 6066), "WEB_TOKEN": ("web_token", ""),
    "DATA_DIR": ("data_dir", Path("data")), "MODEL_DIR": ("model_dir", Path("models")),
    "TOPIC_PARTITIONS": ("partitions", 4), "PIPELINES": ("pipelines", ("cart", "fraud")),
    "STANDBY_REPLICAS": ("standby_replicas", 0), "SESSION_GAP_MINUTES": ("session_gap_s", 1800.0),
    "BATCH_MAX": ("batch_max", 5000), "STATE_FLUSH_EVENTS": ("state_flush_events", 20_000),
    "STATE_FLUSH_MS": ("state_flush_ms", 500.0), "RETRY_ATTEMPTS": ("retry_attempts", 5),
    "RETRY_BASE_MS": ("retry_base_ms", 50.0), "RETRY_MAX_MS": ("retry_max_ms", 2000.0),
    "MAX_EVENT_BYTES": ("max_event_bytes", 65536), "DEAD_LETTER_MAX_BYTES": ("dead_letter_max_bytes", 524288),
    "INTAKE_MAX_BYTES": ("intake_max_bytes", 64 << 20), "FETCH_WAIT_MS": ("fetch_wait_ms", 10),
    "PRODUCER_LINGER_MS": ("linger_ms", 2), "PRODUCER_MAX_BATCH_BYTES": ("producer_max_batch_bytes", 524288),
    "COMMIT_INTERVAL_S": ("commit_interval_s", 1.0), "BROKER_REBALANCE_TIMEOUT": ("rebalance_timeout_s", 3.0),
    "BROKER_SESSION_TIMEOUT": ("session_timeout_s", 6.0), "BROKER_HEARTBEAT_INTERVAL": ("heartbeat_s", 1.0),
    "FRAUD_REVIEW_AT": ("fraud_review_at", 0.5), "FRAUD_DECLINE_AT": ("fraud_decline_at", 0.85),
    "FRAUD_REASONS": ("fraud_reasons", "flagged"), "FAULT_FILE": ("fault_file", ""), "AUTO_OFFSET_RESET": ("auto_offset_reset", "earliest"),
    "LOG_FORMAT": ("log_format", "text"), "WEB_ADVERTISED_HOST": ("web_advertised_host", ""),
    # topic names, settings since issue 17, with the names they had as constants
    "CART_INPUT_TOPIC": ("cart_input_topic", "cart_events"),
    "CART_OUTPUT_TOPIC": ("cart_output_topic", "personalization_scores"),
    "FRAUD_INPUT_TOPIC": ("fraud_input_topic", "transactions"),
    "FRAUD_OUTPUT_TOPIC": ("fraud_output_topic", "fraud_decisions"),
    "DEAD_LETTER_TOPIC": ("dead_letter_topic", "dead_letters"), "INTERNAL_TOPIC_PREFIX": ("internal_topic_prefix", ""),
    # the model control topic and the label topics (issue 16)
    "MODEL_CONTROL_TOPIC": ("model_control_topic", ""), "CART_LABEL_TOPIC": ("cart_label_topic", "cart_labels"),
    "FRAUD_LABEL_TOPIC": ("fraud_label_topic", "fraud_labels"),
}


@pytest.fixture
def env(monkeypatch):
    """A clean environment for Settings(): none of its variables set; returns a setter."""
    for name in list(os.environ):
        if name in DEFAULTS or name.startswith("KAFKA_"):
            monkeypatch.delenv(name)

    def set_(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))
    return set_


def problems() -> str:
    """The one error message for the environment as set."""
    with pytest.raises(ConfigurationError) as exc:
        load()
    return str(exc.value)


def test_defaults_names_and_types_are_those_of_before(env):
    s = Settings()
    assert {f.validation_alias for f in Settings.model_fields.values()} == set(DEFAULTS) | {
        "KAFKA_CONSUMER_*", "KAFKA_PRODUCER_*"}
    for var, (attr, default) in DEFAULTS.items():
        assert Settings.model_fields[attr].validation_alias == var
        value = getattr(s, attr)
        assert value == default and type(value) is type(default), (var, value)
    assert s.consumer_options == {} and s.producer_options == {}
    assert s.advertised_host == "127.0.0.1"
    assert "web_token" not in s.describe() and s.describe()["batch_max"] == "5000"


def test_values_are_read_and_converted(env):
    env(SESSION_GAP_MINUTES="5", PIPELINES=" cart , ", DATA_DIR="/tmp/x", BATCH_MAX="7", FRAUD_REVIEW_AT="0.25",
        AUTO_OFFSET_RESET="Latest", LOG_FORMAT="JSON", WEB_HOST="0.0.0.0", WEB_TOKEN="t0k3n", STATE_FLUSH_MS="",
        WEB_ADVERTISED_HOST=" w-0.svc ")
    s = Settings()
    assert s.session_gap_s == 300.0 and s.pipelines == ("cart",) and s.data_dir == Path("/tmp/x")
    assert s.batch_max == 7 and s.fraud_review_at == 0.25
    assert s.auto_offset_reset == "latest" and s.log_format == "json"
    assert s.state_flush_ms == 500.0  # empty = unset
    assert s.advertised_host == "w-0.svc"
    assert "t0k3n" not in repr(s) and "t0k3n" not in str(s.describe())
    rows = {name: (value, source) for name, value, source in s.effective()}
    assert rows["WEB_TOKEN"] == ("***", "env") and rows["SESSION_GAP_MINUTES"] == ("5", "env")
    assert rows["APP_ID"] == ("scoring", "default") and rows["STATE_FLUSH_MS"] == ("500.0", "default")


def test_one_error_names_every_bad_value_and_combination(env):
    env(BATCH_MAX="-1", FRAUD_REVIEW_AT="0.9", FRAUD_DECLINE_AT="0.85")
    assert problems() == "BATCH_MAX=-1 must be at least 1; FRAUD_REVIEW_AT=0.9 must be below FRAUD_DECLINE_AT=0.85"

    env(BATCH_MAX="many", TOPIC_PARTITIONS="0", STATE_FLUSH_MS="0", STATE_FLUSH_EVENTS="-5", FRAUD_REVIEW_AT="1.5",
        AUTO_OFFSET_RESET="none", BROKER_HEARTBEAT_INTERVAL="6", BROKER_SESSION_TIMEOUT="6",
        RETRY_BASE_MS="500", RETRY_MAX_MS="100", PIPELINES="cart,nope", STANDBY_REPLICAS="-1",
        COMMIT_INTERVAL_S="nan", WEB_PORT="70000", LOG_FORMAT="xml", KAFKA_SECURITY_PROTOCOL="TLS")
    got = problems().split("; ")
    assert got == [
        "WEB_PORT=70000 must be at most 65535",
        "TOPIC_PARTITIONS=0 must be at least 1",
        "PIPELINES='cart,nope' names nope, which is not a pipeline: name one or more of cart, fraud",
        "STANDBY_REPLICAS=-1 must be at least 0",
        "BATCH_MAX='many' is not an integer",
        "STATE_FLUSH_EVENTS=-5 must be at least 1",
        "STATE_FLUSH_MS=0 must be above 0",
        "COMMIT_INTERVAL_S='nan' is not a finite number",
        "AUTO_OFFSET_RESET='none' must be one of 'earliest' or 'latest'",
        "FRAUD_REVIEW_AT=1.5 must be at most 1",
        "LOG_FORMAT='xml' must be one of 'text' or 'json'",
        # cross-field checks between values that are themselves fine (FRAUD_REVIEW_AT is not)
        "BROKER_HEARTBEAT_INTERVAL=6 must be below BROKER_SESSION_TIMEOUT=6",
        "RETRY_BASE_MS=500 must be at most RETRY_MAX_MS=100",
        # and the KAFKA_* security settings (app/security.py) in the same line
        "KAFKA_SECURITY_PROTOCOL='TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
    ]


def test_limits_that_faust_and_the_producer_impose(env):
    env(BROKER_SESSION_TIMEOUT="120")
    assert problems() == "BROKER_SESSION_TIMEOUT=120 must be at most 90 (Faust's broker_request_timeout)"
    env(BROKER_SESSION_TIMEOUT="30", DEAD_LETTER_MAX_BYTES=str(2 << 20))
    assert problems() == ("DEAD_LETTER_MAX_BYTES=2097152 must be below the producer's max_request_size=1000000 "
                          "(a larger letter could never be sent)")
    env(KAFKA_PRODUCER_MAX_REQUEST_SIZE=str(4 << 20))
    assert load().producer_options == {"max_request_size": 4 << 20}
    env(DEAD_LETTER_MAX_BYTES="100")
    assert problems() == "DEAD_LETTER_MAX_BYTES=100 must be at least 1024"


def test_pass_through_client_options(env):
    env(KAFKA_PRODUCER_COMPRESSION_TYPE="gzip", KAFKA_PRODUCER_ENABLE_IDEMPOTENCE="true",
        KAFKA_CONSUMER_FETCH_MIN_BYTES="1024", KAFKA_CONSUMER_CLIENT_RACK="eu-1a", KAFKA_CONSUMER_CHECK_CRCS="False",
        KAFKA_CONSUMER_="ignored", KAFKA_SECURITY_PROTOCOL="PLAINTEXT")
    s = load()
    assert s.producer_options == {"compression_type": "gzip", "enable_idempotence": True}
    assert s.consumer_options == {"fetch_min_bytes": 1024, "client_rack": "eu-1a", "check_crcs": False}
    rows = {name: (value, source) for name, value, source in s.effective()}
    assert rows["KAFKA_CONSUMER_FETCH_MIN_BYTES"] == ("1024", "env")
    assert rows["KAFKA_CONSUMER_CHECK_CRCS"] == ("false", "env")

    env(KAFKA_PRODUCER_COMPRESSION_TYPE="brotli", KAFKA_PRODUCER_ACKS="1", KAFKA_PRODUCER_PARTITIONER="x",
        KAFKA_CONSUMER_ENABLE_AUTO_COMMIT="true", KAFKA_CONSUMER_AUTO_OFFSET_RESET="latest",
        KAFKA_CONSUMER_SASL_PLAIN_PASSWORD="x", KAFKA_CONSUMER_FETCH_MAX_WAITMS="5", BATCH_MAX="0")
    assert problems().split("; ") == [
        "BATCH_MAX=0 must be at least 1",
        "KAFKA_CONSUMER_AUTO_OFFSET_RESET is not passed through: use AUTO_OFFSET_RESET",
        "KAFKA_CONSUMER_ENABLE_AUTO_COMMIT is not passed through: the commit gate commits offsets (app/pipeline/publish.py)",
        "KAFKA_CONSUMER_FETCH_MAX_WAITMS: AIOKafkaConsumer has no option 'fetch_max_waitms'",
        "KAFKA_CONSUMER_SASL_PLAIN_PASSWORD is not passed through: use KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_* and "
        "KAFKA_SASL_*",
        "KAFKA_PRODUCER_ACKS is not passed through: an output counts as delivered only when all in-sync "
        "replicas have it (acks=all)",
        "KAFKA_PRODUCER_COMPRESSION_TYPE='brotli' is not one of gzip, snappy, lz4, zstd",
        "KAFKA_PRODUCER_PARTITIONER is not passed through: the worker routes state by Faust's murmur2 partitioner",
    ]


def test_topic_names_are_settings_checked_as_kafka_names_and_kept_apart(env):
    from app.topology import Topology

    env(CART_INPUT_TOPIC="shop.cart", DEAD_LETTER_TOPIC="shop.dlq", INTERNAL_TOPIC_PREFIX="scorer")
    topology = Topology.from_settings(load())
    cart = topology.pipelines["cart"]
    assert (cart.source_topic, cart.output_topic, cart.repartition_topic) == (
        "shop.cart", "personalization_scores", "scorer-shop.cart-by-user_id")
    assert (topology.dead_letters, topology.replayed, topology.changelog("user_sessions")) == (
        "shop.dlq", "shop.dlq.replayed", "scorer-user_sessions-changelog")
    assert topology.inputs == {"shop.cart", "transactions"}
    env(INTERNAL_TOPIC_PREFIX="", APP_ID="risk")
    assert Topology.from_settings(load()).changelog("card_state") == "risk-card_state-changelog", "APP_ID by default"
    env(CART_INPUT_TOPIC="bad topic", FRAUD_OUTPUT_TOPIC="shop.dlq")
    assert problems() == ("CART_INPUT_TOPIC='bad topic' is not a Kafka topic name (1-249 letters, digits, '.', '_' "
                          "or '-'); DEAD_LETTER_TOPIC='shop.dlq' must differ from FRAUD_OUTPUT_TOPIC='shop.dlq'")


def test_the_known_pipelines_are_the_use_cases():
    from app.pipelines import configured

    assert settings_module.PIPELINE_NAMES == tuple(configured())


def test_the_readme_table_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+\*?)`", "\n".join(l.split("|")[1] for l in table.splitlines()
                                                                   if l.startswith("| `"))))
    variables = {f.validation_alias for f in Settings.model_fields.values()}
    assert variables - listed == set(), "variables missing from README's configuration table"
    # and the table names nothing that is not read (the KAFKA_* security rows are app/security.py's)
    assert {v for v in listed - variables if not v.startswith("KAFKA_S")} == set()


def _cli(*args, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in DEFAULTS and not k.startswith("KAFKA_")}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_scoring_config_prints_the_effective_configuration_with_secrets_masked():
    env = {"WEB_TOKEN": "s3cret-token", "BATCH_MAX": "100", "KAFKA_PRODUCER_COMPRESSION_TYPE": "gzip",
           "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "svc",
           "KAFKA_SASL_PASSWORD": "hunter2-pw"}
    done = _cli("config", env=env)
    assert done.returncode == 0, done.stderr
    assert "s3cret-token" not in done.stdout + done.stderr and "hunter2-pw" not in done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert rows["BATCH_MAX"] == ["100", "env"] and rows["APP_ID"] == ["scoring", "default"]
    assert rows["WEB_TOKEN"] == ["***", "env"] and rows["KAFKA_SASL_PASSWORD"] == ["***", "env"]
    assert rows["KAFKA_SASL_USERNAME"] == ["svc", "env"] and rows["KAFKA_SASL_MECHANISM"] == ["PLAIN", "default"]
    assert rows["KAFKA_PRODUCER_COMPRESSION_TYPE"] == ["gzip", "env"]
    assert rows["SESSION_GAP_MINUTES"] == ["30", "default"]  # in the variable's unit
    assert set(DEFAULTS) <= set(rows)

    as_json = orjson.loads(_cli("config", "--json", env=env).stdout)
    assert as_json["BATCH_MAX"] == {"value": "100", "from": "env"} and as_json["WEB_TOKEN"]["value"] == "***"

    bad = _cli("config", env={"BATCH_MAX": "-1", "FRAUD_REVIEW_AT": "0.9"})
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "configuration error: BATCH_MAX=-1 must be at least 1; FRAUD_REVIEW_AT=0.9 must be below FRAUD_DECLINE_AT=0.85"]


PROBE = """
import asyncio, json
from app import app  # the real app, with app/kafka/patches.py installed as a worker has it

async def main():
    producer = app.producer._new_producer()
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    print(json.dumps({"compression_type": producer._compression_type,
                      "request_timeout_ms": producer.client._request_timeout_ms,
                      "fetch_min_bytes": consumer._fetch_min_bytes, "check_crcs": consumer._check_crcs,
                      "auto_offset_reset": consumer._auto_offset_reset,
                      "fetch_max_wait_ms": consumer._fetch_max_wait_ms, "group_id": consumer._group_id}))
    await producer.client.close()
    await consumer._client.close()

asyncio.run(main())
"""


def test_options_reach_the_workers_aiokafka_clients(tmp_path):
    def probe(extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in DEFAULTS and not k.startswith("KAFKA_")}
        env.update(MODEL_DIR=str(MODEL_DIR), DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT), **extra)
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return orjson.loads(done.stdout.strip().splitlines()[-1])

    stock = probe({})
    assert stock == {"compression_type": None, "request_timeout_ms": 1_200_000, "fetch_min_bytes": 1,
                     "check_crcs": True, "auto_offset_reset": "earliest", "fetch_max_wait_ms": 10,
                     "group_id": "scoring"}
    tuned = probe({"KAFKA_PRODUCER_COMPRESSION_TYPE": "gzip", "KAFKA_PRODUCER_REQUEST_TIMEOUT_MS": "12345",
                   "KAFKA_CONSUMER_FETCH_MIN_BYTES": "77", "KAFKA_CONSUMER_CHECK_CRCS": "false",
                   "AUTO_OFFSET_RESET": "latest", "FETCH_WAIT_MS": "25"})
    assert tuned == {"compression_type": "gzip", "request_timeout_ms": 12345, "fetch_min_bytes": 77,
                     "check_crcs": False, "auto_offset_reset": "latest", "fetch_max_wait_ms": 25,
                     "group_id": "scoring"}


def test_a_worker_with_compression_and_consumer_options_still_scores(broker, workers):
    from tests.test_cart_pipeline import sample_events

    w = workers("w1", env={"PIPELINES": "cart", "KAFKA_PRODUCER_COMPRESSION_TYPE": "gzip",
                           "KAFKA_CONSUMER_RETRY_BACKOFF_MS": "50", "KAFKA_CONSUMER_CHECK_CRCS": "true"})
    events = sample_events(n_users=10, seed=5)
    produce_events(broker, "cart_events", events, "user_id")
    out = read_json(broker, "personalization_scores", len(events), key="event_id")
    assert {o["event_id"] for o in out} == {e["event_id"] for e in events}
    assert w.alive()
