"""docker-compose.yml cannot run here; check that its parts fit together."""
from __future__ import annotations

import yaml

from tests.harness import ROOT


def test_compose_services_fit_together():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "worker", "generator"} <= set(services)

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka")
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split("//", 1)[1]

    worker = services["worker"]
    assert worker["build"] == "." and (ROOT / "Dockerfile").exists()
    wenv = worker["environment"]
    assert wenv["BROKER_URL"] == f"kafka://{advertised}"
    assert wenv["WEB_HOST"] == "0.0.0.0"
    # a bare container port, so `--scale worker=3` does not fight over a host port
    assert worker["ports"] == [wenv["WEB_PORT"]]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    # every variable given to the worker is one the app reads
    known = {"BROKER_URL", "WEB_HOST", "WEB_PORT", "DATA_DIR", "MODEL_DIR", "TOPIC_PARTITIONS",
             "STANDBY_REPLICAS", "FETCH_WAIT_MS", "BROKER_REBALANCE_TIMEOUT", "BROKER_SESSION_TIMEOUT",
             "BROKER_HEARTBEAT_INTERVAL"}
    assert set(wenv) <= known
    settings_src = (ROOT / "app" / "settings.py").read_text()
    assert all(f'"{name}"' in settings_src for name in wenv)

    gen = services["generator"]
    assert f"kafka://{advertised}" in gen["command"]
    assert gen["command"][:2] == ["scoring", "generate"]
