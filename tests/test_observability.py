"""Metrics, alerts, dashboard and logs as operators consume them.

- deploy/prometheus/alerts.yml passes `promtool check rules` and its unit tests (`promtool test rules`),
  and those unit tests fail when a rule is broken;
- the Grafana dashboard and the alert rules use only metric names a worker exports;
- a real Prometheus (Debian's package, `make promtool`) scrapes a real worker and loads the rules;
- LOG_FORMAT=json: a worker started as deploy/k8s starts it writes only JSON lines, and the probe
  commands of deploy/k8s answer as they should.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from app.dev.broker import free_port
from tests.harness import ROOT, Worker

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "scoring-dashboard.json"
TOKEN = "test-token-7d1c"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make promtool` installs Debian's prometheus package"
    return path


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_names() -> set[str]:
    return {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}


# -- alert rules ----------------------------------------------------------------------------------

def test_alert_rules_pass_promtool_and_their_unit_tests():
    rules = alert_names()
    check = promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout
    unit = promtool("test", "rules", "alerts.test.yml")
    assert unit.returncode == 0, unit.stdout + unit.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    # the unit tests cover the lag and dead-letter alerts (and the others)
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == rules


def test_the_unit_tests_fail_when_a_rule_is_broken(tmp_path):
    rules = (PROM / "alerts.yml").read_text()
    broken = rules.replace(") > 10000", ") > 1000000").replace("> 0.01", "> 0.5")
    assert broken.count("1000000") == 1 and "> 0.5" in broken
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    unit = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert unit.returncode != 0
    assert "ScoringConsumerLagGrowing" in unit.stdout + unit.stderr
    assert "ScoringDeadLetterRateHigh" in unit.stdout + unit.stderr


# -- metric names ---------------------------------------------------------------------------------

def exported_names() -> set[str]:
    """Every series name a worker's /metrics can have (app/metrics.py), and Prometheus' `up`."""
    from app import metrics

    names = {"up"}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    for family in metrics.registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def test_metric_names_carry_their_units_and_the_helpers_fill_them():
    from prometheus_client import CollectorRegistry, generate_latest

    from app import metrics

    units = ("_seconds", "_bytes", "_records", "_events", "_ratio", "_keys")
    for family in metrics.registry.collect():
        if not family.name.startswith("scoring_"):
            continue
        if family.type == "counter":
            assert any(s.name == family.name + "_total" for s in family.samples) or not family.samples
        elif family.type == "info":
            pass  # scoring_model_info: 1 with the labels
        elif family.name != "scoring_ready":  # 0/1
            assert family.name.endswith(units), f"{family.name} ({family.type}) has no unit suffix"
    names = exported_names()
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_collections_total",
            "scoring_model_info", "scoring_intake_records", "scoring_intake_bytes",
            "scoring_state_flush_seconds_bucket"} <= names
    # the helpers, on a registry of the test's own so the module's stays as a worker has it
    registry = CollectorRegistry()
    saved = (metrics.MODEL, metrics.INTAKE_RECORDS, metrics.INTAKE_BYTES, metrics.READY)
    try:
        metrics.MODEL = metrics.Info("scoring_model", "m", ["pipeline"], registry=registry)
        metrics.INTAKE_RECORDS = metrics.Gauge("scoring_intake_records", "r", ["pipeline"], registry=registry)
        metrics.INTAKE_BYTES = metrics.Gauge("scoring_intake_bytes", "b", ["pipeline"], registry=registry)
        metrics.READY = metrics.Gauge("scoring_ready", "r", registry=registry)

        class Sink:
            size, bytes = 3, 300

        metrics.set_model("cart", "abc123")
        metrics.set_model("cart", "def456")  # a reload replaces the version
        metrics.watch_intake("cart", Sink)
        readiness = [(False, "rebalancing")]
        metrics.watch_readiness(lambda: readiness[0])
        text = generate_latest(registry).decode()
        assert 'scoring_model_info{pipeline="cart",version="def456"} 1.0' in text and "abc123" not in text
        assert 'scoring_intake_records{pipeline="cart"} 3.0' in text
        assert 'scoring_intake_bytes{pipeline="cart"} 300.0' in text
        assert "scoring_ready 0.0" in text
        readiness[0] = (True, "ready")
        assert "scoring_ready 1.0" in generate_latest(registry).decode()
    finally:
        metrics.MODEL, metrics.INTAKE_RECORDS, metrics.INTAKE_BYTES, metrics.READY = saved


PROMQL_WORDS = {"sum", "max", "min", "avg", "by", "and", "or", "unless", "on", "rate", "increase", "deriv",
                "histogram_quantile", "min_over_time", "max_over_time", "resets", "changes", "le",
                "label_values", "offset", "bool", "ignoring", "group_left", "count"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words - PROMQL_WORDS if not w.startswith("$") and not re.fullmatch(r"\d.*", w)
            and w not in {"pipeline", "stage", "topic", "partition", "instance", "job", "table", "decision",
                          "version", "generation"}}


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_and_alerts_use_only_exported_metrics():
    known = exported_names()
    dash = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dash)
    rules = [r["expr"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    for expr in exprs + rules:
        used = metric_names(expr)
        assert used, expr
        assert used <= known, f"{sorted(used - known)} not exported by the worker, in: {expr}"
    # what the dashboard must show
    by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dash["panels"]}
    wanted = {
        "lag per partition": r"scoring_consumer_lag_records.*by \(topic, partition\)|by \(topic, partition\).*scoring_consumer_lag_records",
        "throughput": r"rate\(scoring_events_in_total",
        "latency quantiles": r"histogram_quantile\(0\.99, sum by \(le, pipeline\) \(rate\(scoring_end_to_end_seconds_bucket",
        "dead letters by stage": r"by \(pipeline, stage\) \(rate\(scoring_dead_letters_total",
        "model version": r"scoring_model_info",
        "rebalances": r"scoring_rebalances_total",
        "flush latency": r"histogram_quantile\(.*scoring_state_flush_seconds_bucket",
        "intake fill": r"scoring_intake_records",
        "standby lag": r"scoring_standby_lag_records",
    }
    for what, pattern in wanted.items():
        assert any(re.search(pattern, e) for e in by_title.values()), f"no panel shows {what}"
    # panel ids unique, every panel on the provisioned data source variable
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"] if p["type"] != "row")
    # and the check itself sees a wrong name
    assert not metric_names("rate(scoring_batch_size_sum[5m])") <= known


# -- logs -----------------------------------------------------------------------------------------

def test_json_formatter_keeps_a_traceback_in_its_line():
    from app.logs import JsonFormatter, logging_config

    assert logging_config({}) is None and logging_config({"LOG_FORMAT": "text"}) is None
    handlers = logging.root.handlers[:]
    try:
        logging.root.handlers.clear()
        assert logging_config({"LOG_FORMAT": "JSON"})["merge"] is True
        # until the worker sets logging up, records are JSON too
        (early,) = logging.root.handlers
        assert isinstance(early.formatter, JsonFormatter)
    finally:
        logging.root.handlers[:] = handlers
    with pytest.raises(SystemExit, match="LOG_FORMAT"):
        logging_config({"LOG_FORMAT": "xml"})
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed %s", ("x",),
                                                   sys.exc_info(), extra={"pipeline": "cart"})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "t" and out["message"] == "failed x"
    assert out["exc"].startswith("Traceback") and "ValueError: bad\nthing" in out["exc"]
    assert out["pipeline"] == "cart"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["ts"])


class K8sWorker(Worker):
    """A worker started with the command of deploy/k8s/statefulset.yaml (`faust` -> this venv's)."""

    def __init__(self, *args, **kwargs) -> None:
        sts = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/statefulset.yaml").read_text()))
        command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[0] == "faust"
        super().__init__(*args, args=["-m", *command], **kwargs)


def _probe_commands() -> tuple[list[str], dict]:
    sts = yaml.safe_load((ROOT / "deploy/k8s/statefulset.yaml").read_text())
    container = sts["spec"]["template"]["spec"]["containers"][0]
    command = container["startupProbe"]["exec"]["command"]
    assert command[0] == "python"
    return [sys.executable, *command[1:]], container["livenessProbe"]["httpGet"]


def _status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_worker_as_deployed_logs_json_lines_and_answers_its_probes(broker, tmp_path):
    startup, liveness = _probe_commands()
    w = K8sWorker(broker.url, tmp_path / "data", tmp_path / "logs", "k8s",
                  {"LOG_FORMAT": "json", "WEB_TOKEN": TOKEN, "WEB_ADVERTISED_HOST": "w-0.scoring-workers.ns.svc"})
    try:
        w.start()
        env = {**os.environ, "WEB_PORT": str(w.web_port), "WEB_TOKEN": TOKEN}
        deadline = time.monotonic() + 30
        while subprocess.run(startup, env=env, capture_output=True, timeout=10).returncode != 0:
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(0.5)
        wrong = subprocess.run(startup, env={**env, "WEB_TOKEN": "wrong"}, capture_output=True, text=True, timeout=10)
        assert wrong.returncode != 0 and "401" in wrong.stderr
        # liveness / readiness: open, no token
        assert _status(f"{w.url}{liveness['path']}") == 200
        # the advertised host is what peers are told to forward to
        assert _status(f"{w.url}/tables", TOKEN) == 200
        with urllib.request.urlopen(urllib.request.Request(
                f"{w.url}/tables", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=5) as r:
            assert json.loads(r.read())["worker"] == f"http://w-0.scoring-workers.ns.svc:{w.web_port}"
        w.stop()
        assert w.proc.returncode == 0
    finally:
        w.kill()
    lines = [line for line in w.log().splitlines() if line.strip()]
    assert len(lines) > 20
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert "[^Worker]: Ready" in messages and "[^Worker]: Stopping..." in messages
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


# -- a real Prometheus scraping a real worker -----------------------------------------------------

def _api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_prometheus_scrapes_a_worker_and_evaluates_the_rules(workers, tmp_path):
    w = workers("w1", env={"WEB_TOKEN": TOKEN})  # /metrics is open: no token in the scrape config
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{w.web_port}"]}]
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        shutil.copy(PROM / rule_file, prom_dir / rule_file)
    port = free_port()
    log = open(prom_dir / "prometheus.log", "wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={prom_dir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        series, rules = [], []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (prom_dir / "prometheus.log").read_text()[-3000:]
            try:
                series = _api(port, "query", query='{__name__=~"scoring_.+", job="scoring-workers"}')["data"]["result"]
                rules = [r for g in _api(port, "rules")["data"]["groups"] for r in g["rules"]]
            except (urllib.error.URLError, ConnectionError):
                series = []
            if series and rules and all(r.get("health") == "ok" for r in rules):
                break
            time.sleep(0.5)
        names = {s["metric"]["__name__"] for s in series}
        assert "scoring_rebalances_total" in names, (names, (prom_dir / "prometheus.log").read_text()[-3000:])
        assert {s["metric"]["instance"] for s in series} == {f"127.0.0.1:{w.web_port}"}
        assert {r["name"] for r in rules} == alert_names() and all(r["health"] == "ok" for r in rules), rules
        up = _api(port, "query", query='up{job="scoring-workers"}')["data"]["result"]
        assert [s["value"][1] for s in up] == ["1"]
        # every dashboard query is valid PromQL on real data (Grafana's variables filled in)
        for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
            if expr.startswith("label_values"):
                continue
            q = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
            assert _api(port, "query", query=q)["status"] == "success", q
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
