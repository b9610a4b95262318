"""deploy/k8s cannot be applied here (no cluster): render it and check it offline.

The kustomization is rendered by `render` below (the few kustomize features the base uses; any other
key fails the test rather than being ignored), every rendered object is validated against the
Kubernetes API schemas that `kubernetes-validate` ships (strict: unknown fields fail too), KEDA's
ScaledObject (a CRD those schemas lack) by a hand-written check of its fields, and the parts are
checked to fit together and to fit the app (settings it reads, ports, probes, partitions).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.harness import ROOT

K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the base is meant for, and the newest the installed schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
RENDERED_KEYS = {"apiVersion", "kind", "resources", "labels", "images", "namespace"}
EXAMPLES = {"secret.example.yaml"}  # validated, but not applied by the kustomization


# -- rendering ------------------------------------------------------------------------------------

def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(kdir: Path = K8S) -> list[dict]:
    """`kustomize build` for what this base uses: resources (files or bases), namespace, labels
    (metadata only, as kustomize's default includeSelectors: false), images."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    unknown = set(k) - RENDERED_KEYS
    assert not unknown, f"kustomization.yaml uses {unknown}, which this test's renderer does not apply"
    objs: list[dict] = []
    for res in k["resources"]:
        path = kdir / res
        if path.is_dir():
            objs += render(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for obj in objs:
        meta = obj.setdefault("metadata", {})
        if "namespace" in k:
            meta["namespace"] = k["namespace"]
        for entry in k.get("labels", []):
            assert set(entry) <= {"pairs"}, f"labels options {set(entry) - {'pairs'}} not rendered here"
            meta.setdefault("labels", {}).update(entry["pairs"])
        for image in k.get("images", []):
            for c in _containers(obj):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return objs


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return render()


def one(objs: list[dict], kind: str, **match) -> dict:
    found = [o for o in objs if o["kind"] == kind and all(o["metadata"].get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {kind} {match or ''}, found {len(found)}"
    return found[0]


# -- validation -----------------------------------------------------------------------------------

def validate_k8s(obj: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SCALED_OBJECT_SPEC = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "idleReplicaCount",
                      "pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "advanced", "fallback",
                      "triggers"}


def check_scaled_object(obj: dict) -> None:
    """The fields of a KEDA ScaledObject (keda.sh/v1alpha1) that this base uses, with their types, and
    its required ones. The HPA `behavior` inside it is validated with the Kubernetes schema itself."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    assert isinstance(obj["metadata"].get("name"), str) and obj["metadata"]["name"]
    spec = obj["spec"]
    assert isinstance(spec, dict) and set(spec) <= SCALED_OBJECT_SPEC, f"unknown fields {set(spec) - SCALED_OBJECT_SPEC}"
    target = spec["scaleTargetRef"]
    assert isinstance(target, dict) and set(target) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert all(isinstance(target[k], str) and target[k] for k in target), target
    assert "name" in target
    for key in ("minReplicaCount", "maxReplicaCount", "idleReplicaCount", "pollingInterval", "cooldownPeriod",
                "initialCooldownPeriod"):
        if key in spec:
            assert _int(spec[key]) and spec[key] >= 0, f"{key} must be a non-negative integer: {spec[key]!r}"
    if "minReplicaCount" in spec and "maxReplicaCount" in spec:
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    advanced = spec.get("advanced", {})
    assert set(advanced) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
    hpa_config = advanced.get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_config) <= {"name", "behavior"}
    if "behavior" in hpa_config:  # the HPA's own field: its own schema
        validate_k8s({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                      "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "x"},
                               "maxReplicas": 1, "behavior": hpa_config["behavior"]}})
    triggers = spec["triggers"]
    assert isinstance(triggers, list) and triggers, "a ScaledObject needs at least one trigger"
    for t in triggers:
        assert set(t) <= {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}, set(t)
        assert isinstance(t["type"], str) and t["type"]
        # metadata is map[string]string in KEDA's API: a YAML number or boolean there is rejected
        meta = t["metadata"]
        assert isinstance(meta, dict) and meta
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()), \
            f"trigger metadata values must be strings: {meta}"
        if t["type"] == "kafka":
            assert {"bootstrapServers", "consumerGroup", "lagThreshold"} <= set(meta), meta
            for numeric in ("lagThreshold", "activationLagThreshold"):
                if numeric in meta:
                    assert re.fullmatch(r"\d+", meta[numeric]), f"{numeric}={meta[numeric]!r}"
            for flag in ("allowIdleConsumers", "excludePersistentLag", "limitToPartitionsWithLag"):
                if flag in meta:
                    assert meta[flag] in ("true", "false"), f"{flag}={meta[flag]!r}"
            if "offsetResetPolicy" in meta:
                assert meta["offsetResetPolicy"] in ("earliest", "latest")


def validate(obj: dict) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        check_scaled_object(obj)
    else:
        validate_k8s(obj)


def test_every_manifest_is_valid(objs):
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ConfigMap", "Service", "Service", "StatefulSet", "PodDisruptionBudget", "ScaledObject"])
    for obj in objs:
        validate(obj)
    for name in EXAMPLES:
        for obj in yaml.safe_load_all((K8S / name).read_text()):
            validate(obj)
    # every manifest file is applied or a named example: nothing lies about unvalidated
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {p.name for p in K8S.glob("*.yaml")} == set(k["resources"]) | EXAMPLES | {"kustomization.yaml"}


@pytest.mark.parametrize("breakage", [
    ("StatefulSet", lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="6066")),
    ("StatefulSet", lambda o: o["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(periodSecond=10)),
    ("StatefulSet", lambda o: o["spec"].pop("selector")),
    ("Service", lambda o: o["spec"]["ports"][0].update(port="http")),
    ("PodDisruptionBudget", lambda o: o["spec"].update(maxUnavailable=[1])),
    ("ConfigMap", lambda o: o["data"].update(TOPIC_PARTITIONS=4)),
    ("ScaledObject", lambda o: o["spec"].update(maxReplicaCount="4")),
    ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(lagThreshold=20000)),
    ("ScaledObject", lambda o: o["spec"]["scaleTargetRef"].pop("name")),
    ("ScaledObject", lambda o: o["spec"].update(triggers=[])),
    ("ScaledObject", lambda o: o["spec"].update(maxReplicas=4)),
    ("ScaledObject", lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
     .update(stabilizationWindowSeconds="600")),
], ids=lambda b: b[0])
def test_a_broken_manifest_is_rejected(objs, breakage):
    kind, breaks = breakage
    obj = copy.deepcopy(next(o for o in objs if o["kind"] == kind))
    breaks(obj)
    with pytest.raises((kubernetes_validate.ValidationError, AssertionError)):
        validate(obj)


# -- the parts fit together and fit the app -------------------------------------------------------

def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_settings_and_names_fit_the_app(objs):
    config = one(objs, "ConfigMap")["data"]
    # every key is an environment variable the worker reads: named in app/ (or a settings field of
    # that name, for settings read by field name)
    from app.settings import current

    sources = "".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    unread = [k for k in config if f'"{k}"' not in sources and not hasattr(current(), k.lower())]
    assert not unread, f"the ConfigMap sets {unread}, which the worker does not read"
    sts = one(objs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert {"configMapRef": {"name": one(objs, "ConfigMap")["metadata"]["name"]}} in worker["envFrom"]
    assert worker["image"] == "ghcr.io/example/realtime-scoring:0.1.0"  # the kustomization's images
    # the web port everywhere is WEB_PORT, bound on every interface
    (port,) = worker["ports"]
    assert port["containerPort"] == int(config["WEB_PORT"]) and config["WEB_HOST"] == "0.0.0.0"
    for svc in (o for o in objs if o["kind"] == "Service"):
        assert all(p["targetPort"] == port["name"] for p in svc["spec"]["ports"])
        assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"] == sts["spec"]["selector"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # the token comes from the Secret the example shows, never from the ConfigMap
    assert "WEB_TOKEN" not in config
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    ref = _env(worker)["WEB_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # the command is the worker (quiet: with LOG_FORMAT=json every line on stdout/stderr is JSON)
    assert worker["command"][:3] == ["faust", "-A", "app"] and "worker" in worker["command"]
    assert config["LOG_FORMAT"] != "json" or "--quiet" in worker["command"]


def test_each_pod_has_its_own_data_dir_and_a_stable_advertised_name(objs):
    config = one(objs, "ConfigMap")["data"]
    sts = one(objs, "StatefulSet")
    (worker,) = sts["spec"]["template"]["spec"]["containers"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config["DATA_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # the headless Service of the StatefulSet resolves not-ready pods too (owners while starting)
    headless = one(objs, "Service", name=sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    # WEB_ADVERTISED_HOST = <pod>.<headless service>.<namespace>.svc, from variables defined before it
    env = worker["env"]
    names = [e["name"] for e in env]
    advertised = _env(worker)["WEB_ADVERTISED_HOST"]["value"]
    assert advertised == f"$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc"
    for var, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert names.index(var) < names.index("WEB_ADVERTISED_HOST")
        assert _env(worker)[var]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert '"WEB_ADVERTISED_HOST"' in (ROOT / "app" / "settings.py").read_text()
    # the run-as user owns the volume
    sec = sts["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] and sec["fsGroup"] == sec["runAsUser"]
    assert f"--uid {sec['runAsUser']}" in (ROOT / "Dockerfile").read_text()


def test_probes_follow_health_and_ready(objs):
    sts = one(objs, "StatefulSet")
    (worker,) = sts["spec"]["template"]["spec"]["containers"]
    # liveness and readiness on /health: a rebalance (every pod's /ready 503 at once) must not take
    # every pod out of the Service or count the whole group as disrupted
    for probe in ("livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/health", "port": "web"}, probe
    live = worker["livenessProbe"]
    assert live["failureThreshold"] * live["periodSeconds"] >= 60  # outlasts a slow flush or rebalance
    # startup on /ready, with the bearer token from the container's environment
    startup = worker["startupProbe"]
    script = " ".join(startup["exec"]["command"])
    assert "/ready" in script and "Authorization" in script and "WEB_TOKEN" in script and "WEB_PORT" in script
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600  # a long changelog replay
    assert startup["timeoutSeconds"] >= 2
    # /health is open, /ready is not (app/web/auth.py); if /ready became open an httpGet probe would do
    from app.web.auth import OPEN_PATHS

    assert "/health" in OPEN_PATHS and "/ready" not in OPEN_PATHS
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_keda_scales_on_the_group_lag_up_to_the_partition_count(objs):
    from app.pipelines import configured

    config = one(objs, "ConfigMap")["data"]
    sts = one(objs, "StatefulSet")
    scaled = one(objs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]}
    assert spec["maxReplicaCount"] == int(config["TOPIC_PARTITIONS"])
    assert spec["minReplicaCount"] >= 1
    # KEDA owns the replica count: a `replicas` here would be reset by every apply
    assert "replicas" not in sts["spec"]
    brokers = [u.split("://", 1)[1] for u in config["BROKER_URL"].split(";")]
    topics = set()
    for t in spec["triggers"]:
        assert t["type"] == "kafka"
        meta = t["metadata"]
        assert meta["bootstrapServers"].split(",") == brokers
        assert meta["consumerGroup"] == config["APP_ID"]
        assert meta["allowIdleConsumers"] == "false"
        topics.add(meta["topic"])
    # one trigger per topic the scoring agents consume: each pipeline's input and repartition topic
    # (app/pipelines.py names the repartition topic f"{prefix}-{source}-by-{key}", the prefix APP_ID by default)
    expected = set()
    for name in config["PIPELINES"].split(","):
        pipe = configured()[name]
        expected |= {pipe.source_topic, f"{config['APP_ID']}-{pipe.source_topic}-by-{pipe.key_field}"}
    assert topics == expected


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes resource quantity (the schemas only say string-or-integer)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


def test_resources_are_requested_and_limited(objs):
    (worker,) = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    res = worker["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), kind
    # room for the backpressure peak the bench measured (~660 MiB) within the limit
    assert quantity(res["limits"]["memory"]) >= 1 * 2**30
    (claim,) = one(objs, "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0
    with pytest.raises(AssertionError):
        quantity("lots")
