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
    # two listeners: containers use the inter-broker one (kafka:9092), host clients localhost:<published>
    listeners = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    bound = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    assert set(listeners) | {"CONTROLLER"} == set(bound) == set(
        item.split(":")[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    advertised = listeners[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert advertised.split(":")[0] == kafka["hostname"] == "kafka"
    external = [addr for addr in listeners.values() if addr.startswith("localhost:")]
    assert len(external) == 1, listeners
    external_port = external[0].split(":")[1]
    # published on the host at the advertised port, and only on the loopback interface
    assert f"127.0.0.1:{external_port}:{external_port}" in kafka["ports"]
    assert {bound[name].rsplit(":", 1)[1] for name, addr in listeners.items() if addr in external} == {external_port}

    worker = services["worker"]
    assert worker["build"] == "." and (ROOT / "Dockerfile").exists()
    wenv = worker["environment"]
    assert wenv["BROKER_URL"] == f"kafka://{advertised}"
    assert wenv["WEB_HOST"] == "0.0.0.0"
    # a bare container port, so `--scale worker=3` does not fight over a host port
    assert worker["ports"] == [wenv["WEB_PORT"]]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    # every variable given to the worker is one the app reads
    known = {"BROKER_URL", "WEB_HOST", "WEB_PORT", "WEB_TOKEN", "DATA_DIR", "MODEL_DIR", "TOPIC_PARTITIONS",
             "STANDBY_REPLICAS", "FETCH_WAIT_MS", "BROKER_REBALANCE_TIMEOUT", "BROKER_SESSION_TIMEOUT",
             "BROKER_HEARTBEAT_INTERVAL"}
    # bound to every interface: a token is required (compose refuses to start without one), no default
    assert wenv["WEB_TOKEN"].startswith("${WEB_TOKEN:?")
    assert set(wenv) <= known
    settings_src = (ROOT / "app" / "settings.py").read_text()
    assert all(f'"{name}"' in settings_src for name in wenv)

    gen = services["generator"]
    assert f"kafka://{advertised}" in gen["command"]
    assert gen["command"][:2] == ["scoring", "generate"]


def test_compose_prometheus_scrapes_workers_and_grafana_has_the_dashboard():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    worker_port = int(services["worker"]["environment"]["WEB_PORT"])

    def mounts(service):
        """container path -> host path (relative to the checkout), each host path existing."""
        out = {}
        for volume in services[service]["volumes"]:
            host, container = volume.split(":")[:2]
            assert (ROOT / host).exists(), f"{service} mounts {host}, which is missing"
            out[container] = host
        return out

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    pm = mounts("prometheus")
    config = yaml.safe_load((ROOT / pm["/etc/prometheus/prometheus.yml"]).read_text())
    # the rule files the config names are mounted beside it
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in pm, rule_file
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["scoring-workers"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # every replica of `worker` on its web port: compose's DNS answers the service name
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["type"] == "A" and sd["port"] == worker_port
    # /metrics is open (app/web/auth.py), so the scrape needs no token; if that changes, this must too
    from app.web.auth import OPEN_PATHS

    assert "/metrics" in OPEN_PATHS
    assert "worker" in prom["depends_on"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    gm = mounts("grafana")
    provisioning = ROOT / gm["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (prom_ds,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prom_ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "scoring.yml").read_text())["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    dashboards = [c for c in gm if c.startswith(dashboard_dir + "/") and c.endswith(".json")]
    assert [gm[c] for c in dashboards] == ["./deploy/grafana/scoring-dashboard.json"]
    assert "prometheus" in grafana["depends_on"]
    # published on the loopback interface only
    assert prom["ports"] == ["127.0.0.1:9090:9090"] and grafana["ports"] == ["127.0.0.1:3000:3000"]
