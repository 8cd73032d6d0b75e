"""deploy/k8s: the Kustomize base and every overlay render, validate against the Kubernetes
schemas, and agree with the code (settings, ports, health routes, stream and consumer names).

Rendering: `kubectl kustomize` (Debian's kubectl carries kustomize), else `kustomize build`.
Validation, offline: kubernetes-validate's bundled JSON schemas (strict: unknown fields are
errors) for the built-in kinds, and KEDA's ScaledObject CRD schema (tests/unit/k8s_schemas,
made strict the same way) for the ScaledObject. kubeconform runs too where it is on PATH.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from api.app import health
from broker import names, nats_helm, permissions
from chatq.errors import ConfigError
from chatq.settings import REPO_ROOT, jwt_secret_problem, load

K8S = REPO_ROOT / "deploy" / "k8s"
TREES = ["base", *(f"overlays/{p.name}" for p in sorted((K8S / "overlays").iterdir()) if p.is_dir())]
KUBERNETES_VERSION = "1.32.0"
SCHEMAS = Path(__file__).parent / "k8s_schemas"
WORKLOADS = ("Deployment", "StatefulSet")
# What a secretKeyRef to a Secret the rendered tree does not hold stands for in load():
# CloudNativePG's, and chatq-secrets where an overlay leaves it to be made outside.
OUTSIDE_SECRETS = {
    ("chatq-pg-app", "uri"): "postgresql://chatq:pw@chatq-pg-rw:5432/chatq",
    ("chatq-secrets", "JWT_SECRET"): "k8s-test-jwt-0123456789abcdefghijklmnopqrstuvwxyz",
    ("chatq-secrets", "CHATQ_API_KEYS"): "",
}


def _renderer() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.skip(
        "deploy/k8s is NOT rendered or validated: neither kubectl (Debian package kubectl) nor "
        "kustomize is on PATH"
    )


@cache
def _render(tree: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [*_renderer(), str(K8S / tree)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"rendering {tree} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


@pytest.fixture(params=TREES)
def docs(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return _render(request.param)


def _of(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _containers(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in docs:
        if workload["kind"] in WORKLOADS:
            spec = workload["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield workload, container


# --- schemas --------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """kubeconform's -strict for a CRD schema: no properties but the ones it names."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            if not out.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_every_manifest_validates_against_its_schema(docs: tuple[dict[str, Any], ...]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="deploy/k8s is NOT schema-validated: kubernetes-validate (the test extra) is not installed",
    )
    keda = _strict(json.loads((SCHEMAS / "scaledobject-keda-v1alpha1.json").read_text()))
    checked = set()
    for doc in docs:
        if doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject":
            jsonschema.Draft7Validator(keda).validate(doc)
        else:
            # Raises ValidationError for a wrong field, SchemaNotFoundError for an unknown kind.
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= checked
    assert {"PodDisruptionBudget", "ScaledObject"} <= checked


def test_a_wrong_field_fails_validation() -> None:
    """The validators do refuse: a misspelt field in a Deployment and in the ScaledObject."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _render("base")
    deployment = copy.deepcopy(_of(docs, "Deployment", "chatq-api")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(_of(docs, "ScaledObject")[0])
    scaled["spec"]["minReplicas"] = 1
    keda = _strict(json.loads((SCHEMAS / "scaledobject-keda-v1alpha1.json").read_text()))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(keda).validate(scaled)


@pytest.mark.parametrize("tree", TREES)
def test_kubeconform_where_installed(tree: str, tmp_path: Path) -> None:
    kubeconform = shutil.which("kubeconform")
    if kubeconform is None:
        pytest.skip(
            "kubeconform is not on PATH (a Go binary: no Go toolchain or release download here); "
            "the schema test validates with kubernetes-validate instead"
        )
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(_render(tree)))
    # kubeconform's template names the kind in lower case: scaledobject-keda-v1alpha1.json.
    keda = tmp_path / "scaledobject-keda-v1alpha1.json"
    keda.write_text(json.dumps(_strict(json.loads((SCHEMAS / keda.name).read_text()))))
    done = subprocess.run(
        [kubeconform, "-strict", "-summary", "-kubernetes-version", KUBERNETES_VERSION,
         "-schema-location", "default",
         "-schema-location", str(tmp_path / "{{ .ResourceKind }}-keda-{{ .ResourceAPIVersion }}.json"),
         str(rendered)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "failed downloading schema" in done.stdout + done.stderr:
        pytest.skip(f"kubeconform could not download the Kubernetes schemas (no network?):\n{done.stdout}")
    assert done.returncode == 0, done.stdout + done.stderr


# --- settings -------------------------------------------------------------------------


@cache
def _settings_names() -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    """Every variable chatq/settings.py reads through Env, and the f-string names as patterns."""
    tree = ast.parse((REPO_ROOT / "chatq" / "settings.py").read_text())
    plain: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "env"
            and node.args
        ):
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            plain.add(first.value)
        elif isinstance(first, ast.JoinedStr):
            parts = [
                re.escape(v.value) if isinstance(v, ast.Constant) else "[A-Z0-9_]+" for v in first.values
            ]
            patterns.append(re.compile("".join(parts)))
    return frozenset(plain), tuple(patterns)


def _read_by_settings(name: str) -> bool:
    plain, patterns = _settings_names()
    return name in plain or any(p.fullmatch(name) for p in patterns)


def test_the_settings_parser_finds_what_settings_reads() -> None:
    plain, _ = _settings_names()
    assert {"NATS_URL", "JWT_SECRET", "DATABASE_URL", "WORKER_METRICS_PORT", "MODEL_ID"} <= plain
    assert _read_by_settings("RATE_LIMIT_USER_RPM") and not _read_by_settings("RATE_LIMIT_USER")
    assert not _read_by_settings("LOG_LEVEL") and not _read_by_settings("HF_HOME")


def _container_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets, with secret values from the manifests' Secrets."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (config,) = _of(docs, "ConfigMap", source["configMapRef"]["name"])
            env.update(config.get("data", {}))
        else:
            (secret,) = _of(docs, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "fieldRef" in ref:
            env[entry["name"]] = "chatq-pod-0"
        elif "secretKeyRef" in ref:
            key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            secrets = _of(docs, "Secret", key[0])
            outside = OUTSIDE_SECRETS.get(key, "a-secret-made-outside-the-manifests")
            env[entry["name"]] = secrets[0]["stringData"][key[1]] if secrets else outside
        else:
            (config,) = _of(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
            env[entry["name"]] = config["data"][ref["configMapKeyRef"]["key"]]
    return env


def test_every_variable_is_one_settings_reads_and_loads(docs: tuple[dict[str, Any], ...]) -> None:
    for kind in ("ConfigMap", "Secret"):
        for doc in _of(docs, kind):
            keys = {*doc.get("data", {}), *doc.get("stringData", {})}
            unknown = sorted(k for k in keys if not _read_by_settings(k))
            assert not unknown, f"{kind} {doc['metadata']['name']}: chatq/settings.py reads no {unknown}"
    for secret in _of(docs, "Secret", "chatq-secrets"):
        # An example's placeholder, which the API refuses to start with; never a real one.
        assert jwt_secret_problem(secret["stringData"]["JWT_SECRET"]) is not None
    for workload, container in _containers(docs):
        if container["image"].startswith("redis:"):
            continue
        env = _container_env(docs, container)
        unknown = sorted(k for k in env if not _read_by_settings(k))
        assert not unknown, f"{workload['metadata']['name']}: chatq/settings.py reads no {unknown}"
        try:
            load(env)
        except ConfigError as exc:
            pytest.fail(f"{workload['metadata']['name']}: the settings refuse its environment: {exc}")


# --- containers -----------------------------------------------------------------------

_PINNED = re.compile(r"[^@\s]+(@sha256:[0-9a-f]{64}|:[\w][\w.-]*\d[\w.-]*)")


def test_images_are_pinned_and_every_container_has_resources_and_probes(
    docs: tuple[dict[str, Any], ...],
) -> None:
    seen = 0
    for workload, container in _containers(docs):
        where = f"{workload['metadata']['name']}/{container['name']}"
        image = container["image"]
        assert _PINNED.fullmatch(image) and not image.endswith(":latest"), f"{where}: {image} is not pinned"
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: no cpu/memory requests"
        assert "memory" in resources.get("limits", {}), f"{where}: no memory limit"
        assert "readinessProbe" in container, f"{where}: no readinessProbe"
        # A container serving a port is probed on it; one that serves none (persistence)
        # has an exec readiness probe, and restarts by exiting.
        if container.get("ports"):
            assert "livenessProbe" in container, f"{where}: no livenessProbe"
        else:
            assert "exec" in container["readinessProbe"], f"{where}: no port and no exec probe"
        seen += 1
    assert seen >= 5


def _workload(docs: tuple[dict[str, Any], ...], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == name]
    return found, found["spec"]["template"]["spec"]["containers"][0]


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_probes_point_at_the_routes_and_ports_the_code_serves(docs: tuple[dict[str, Any], ...]) -> None:
    _, api = _workload(docs, "chatq-api")
    api_settings = load(_container_env(docs, api))
    assert health.paths == {"/health"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/health"
        assert _port(api, api[probe]["httpGet"]["port"]) == api_settings.port
    assert api_settings.host == "0.0.0.0"

    inference, worker = _workload(docs, "chatq-inference")
    worker_settings = load(_container_env(docs, worker))
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port(worker, worker[probe]["httpGet"]["port"]) == worker_settings.worker_metrics_port
    resources = worker["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    pod = inference["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    # Room to drain: the grace period outlasts DRAIN_GRACE_S.
    assert pod["terminationGracePeriodSeconds"] > worker_settings.drain_grace_s

    telemetry, exporter = _workload(docs, "chatq-telemetry")
    port = load(_container_env(docs, exporter)).telemetry_port
    assert _port(exporter, exporter["livenessProbe"]["httpGet"]["port"]) == port
    for workload, settings_port in ((telemetry, port), (inference, worker_settings.worker_metrics_port)):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(settings_port)

    _, persistence = _workload(docs, "chatq-persistence")
    assert persistence["readinessProbe"]["exec"]["command"] == ["python", "-m", "workers.persistence.probe"]
    assert (REPO_ROOT / "workers" / "persistence" / "probe.py").is_file()


def test_the_keda_trigger_names_the_real_stream_and_consumer(docs: tuple[dict[str, Any], ...]) -> None:
    (scaled,) = _of(docs, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    inference, worker = _workload(docs, target["name"])
    assert inference["kind"] == target["kind"] and "replicas" not in inference["spec"]
    model = load(_container_env(docs, worker)).model_name
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "nats-jetstream"]
    meta = trigger["metadata"]
    assert meta["stream"] == names.JOBS_STREAM
    assert meta["consumer"] == names.jobs_consumer(model, "interactive"), f"the workers serve {model!r}"
    # What KEDA's nats-jetstream scaler requires (pkg/scalers/nats_jetstream_scaler.go).
    assert {"natsServerMonitoringEndpoint", "account", "stream", "consumer"} <= set(meta)
    assert int(meta["lagThreshold"]) > 0
    for other in scaled["spec"]["triggers"]:
        if other["type"] == "prometheus":  # on the workers' load: the same model's series
            assert f'model="{model}"' in other["metadata"]["query"]
            assert float(other["metadata"]["threshold"]) > 0


def test_every_workload_has_a_disruption_budget_and_services_find_their_pods(
    docs: tuple[dict[str, Any], ...],
) -> None:
    budgets = _of(docs, "PodDisruptionBudget")
    services = _of(docs, "Service")
    for workload in docs:
        if workload["kind"] not in WORKLOADS:
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, f"{workload['metadata']['name']}: {len(matching)} budgets"
    for service in services:
        pods = [
            (w, c)
            for w, c in _containers(docs)
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            _port(pods[0][1], port["targetPort"])  # a named port the container has


def test_the_helm_values_agree_with_the_manifests(docs: tuple[dict[str, Any], ...]) -> None:
    """The NATS and CloudNativePG releases deploy/k8s/helm describes are the ones the pods use."""
    nats = yaml.safe_load((K8S / "helm" / "nats-values.yaml").read_text())
    assert nats["config"]["cluster"]["enabled"] and nats["config"]["cluster"]["replicas"] == 3
    assert nats["config"]["jetstream"]["enabled"] and nats["config"]["monitor"]["enabled"]
    postgres = yaml.safe_load((K8S / "helm" / "postgres-values.yaml").read_text())
    assert postgres["cluster"]["instances"] == 3
    _, api = _workload(docs, "chatq-api")
    # Release `nats`: its client Service is `nats`, its headless one `nats-headless`.
    assert load(_container_env(docs, api)).nats_url == "nats://nats:4222"
    (scaled,) = _of(docs, "ScaledObject")
    endpoint = scaled["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
    assert endpoint.startswith("nats-headless.") and endpoint.endswith(":8222")
    if "namespace" in scaled["metadata"]:  # an overlay: KEDA's operator resolves it from its own
        assert endpoint.split(".")[1] == scaled["metadata"]["namespace"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _, c in _containers(docs)
        for e in c.get("env", [])
        if e["name"] == "DATABASE_URL"
    }
    assert refs == {f"{postgres['fullnameOverride']}-app"}


def test_each_service_connects_as_its_own_nats_user(docs: tuple[dict[str, Any], ...]) -> None:
    """NATS_USER is the service's user of broker/permissions.py, NATS_PASSWORD the key of the
    Secret that the NATS release's values (python -m broker.nats_helm) read for that user."""
    values = nats_helm.helm_values()
    users = {u["user"]: u for u in values["config"]["merge"]["authorization"]["users"]}
    nats_env = values["container"]["env"]
    for workload, container in _containers(docs):
        service = workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        if service is None:  # Redis
            continue
        env = {e["name"]: e for e in container.get("env", [])}
        user = permissions.user_name(service)
        assert env["NATS_USER"]["value"] == user and user in users
        ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": nats_helm.SECRET, "key": user}
        variable = users[user]["password"].removeprefix("<< $").removesuffix(" >>")
        assert nats_env[variable]["valueFrom"]["secretKeyRef"] == ref
        assert users[user]["permissions"] == permissions.permissions(service)
