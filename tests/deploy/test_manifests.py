"""Deployment files, offline: every manifest in deploy/ validates against its schema (Kubernetes'
own, strict, from the `kubernetes-validate` package; KServe's CRDs as written down in
deploy/kserve/schemas/), and the manifests, the compose file and the Dockerfiles agree with each
other and with the service (ports, probe paths, settings names, user, drain timing).

No cluster and no Docker needed; `make docker-test` runs the image for real.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from normserve import __version__
from normserve.service.routes.v2 import router as v2_router
from normserve.service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
KSERVE_DIR = REPO_ROOT / "deploy" / "kserve"
SCHEMA_DIR = KSERVE_DIR / "schemas"
COMPOSE_FILES = [REPO_ROOT / "docker-compose.yml", REPO_ROOT / "deploy" / "compose" / "model-repository.yml"]

# The oldest Kubernetes these manifests promise to work on (autoscaling/v2, policy/v1 and the
# fields used are all GA there), and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ["1.29", kv_utils.latest_version()]
CRD_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
}
K8S_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"


def _documents(folder: Path) -> list[tuple[str, int, dict[str, Any]]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((path.name, i, doc))
    return docs


K8S_DOCS = _documents(K8S_DIR)
KSERVE_DOCS = _documents(KSERVE_DIR)
ALL_DOCS = K8S_DOCS + KSERVE_DOCS


def _by_kind(kind: str, docs: list[tuple[str, int, dict[str, Any]]] = ALL_DOCS) -> dict[str, Any]:
    found = [d for _, _, d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _version() -> str:
    return __version__  # the one place the version is written (pyproject reads it too)


# -- schema validation --------------------------------------------------------------------------
@cache
def _crd_validator(k8s_version: str, schema_file: str) -> jsonschema.Draft202012Validator:
    """A validator for one vendored CRD schema, its core/v1 `$ref`s resolved to kubernetes-validate's
    strict definitions for `k8s_version`."""
    version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= k8s_version][-1]
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", k8s_version
    )
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    registry: Registry[Any] = Registry().with_resources(
        [
            (K8S_DEFINITIONS_URI, Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _validate(doc: dict[str, Any], k8s_version: str) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        _crd_validator(k8s_version, CRD_SCHEMAS[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, k8s_version, strict=True)


def test_there_is_something_to_validate() -> None:
    kinds = sorted(d["kind"] for _, _, d in ALL_DOCS)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "InferenceService",
        "InferenceService",
        "PodDisruptionBudget",
        "Service",
        "ServingRuntime",
    ]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize(("file", "index", "doc"), ALL_DOCS, ids=[f"{f}#{i}" for f, i, _ in ALL_DOCS])
def test_manifest_matches_its_schema(file: str, index: int, doc: dict[str, Any], k8s_version: str) -> None:
    _validate(doc, k8s_version)


_C0 = "spec.template.spec.containers[0]"


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        # A misspelt or mistyped field: strict schemas reject what the API server would drop or refuse.
        pytest.param(
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
            id=f"Deployment-{_C0}.readinesProbe",
        ),
        pytest.param(
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(ports=[{"port": 8000}]),
            id=f"Deployment-{_C0}.ports[0].port",
        ),
        pytest.param("HorizontalPodAutoscaler", lambda d: d["spec"].update(minReplica=2), id="HPA-spec.minReplica"),
        pytest.param(
            "ServingRuntime",
            lambda d: d["spec"].update(supportedModelFormat=[]),
            id="ServingRuntime-spec.supportedModelFormat",
        ),
        pytest.param(
            "ServingRuntime",
            lambda d: d["spec"]["containers"][0].update(imagePullPolicy=3),
            id="ServingRuntime-containers[0].imagePullPolicy=3",
        ),
        pytest.param("ServingRuntime", lambda d: d["spec"].pop("containers"), id="ServingRuntime-no-containers"),
        pytest.param(
            "InferenceService",
            lambda d: d["spec"]["predictor"]["model"].pop("modelFormat"),
            id="InferenceService-no-modelFormat",
        ),
        pytest.param(
            "InferenceService",
            lambda d: d["spec"]["predictor"].update(scaleMetric="gpu"),
            id="InferenceService-scaleMetric=gpu",
        ),
        pytest.param(
            "InferenceService",
            lambda d: d["spec"]["predictor"]["model"]["env"].append({"value": "x"}),
            id="InferenceService-env-without-name",
        ),
    ],
)
def test_validation_catches_mistakes(kind: str, mutate: Any) -> None:
    """The validation is not vacuous: a broken copy of each manifest fails it."""
    doc = copy.deepcopy(_isvc("normserve") if kind == "InferenceService" else _by_kind(kind))
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, K8S_VERSIONS[-1])


# -- Kubernetes: the pieces fit together and fit the service ---------------------------------------
def _pod() -> dict[str, Any]:
    return dict(_by_kind("Deployment")["spec"]["template"]["spec"])


def _container() -> dict[str, Any]:
    (container,) = _pod()["containers"]
    return dict(container)


def _v2_paths() -> set[str]:
    return {getattr(r, "path", "") for r in v2_router.routes}


def test_probes_use_the_v2_health_paths() -> None:
    c = _container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert {"/v2/health/ready", "/v2/health/live"} <= _v2_paths()
    assert ports["http"] == int(_env(c)["NORMSERVE_PORT"])


def test_grpc_port_is_exposed_by_pod_and_service() -> None:
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == int(_env(c)["NORMSERVE_GRPC_PORT"]) == Settings.model_fields["grpc_port"].default
    service = _by_kind("Service")
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "kubernetes.io/h2c"


def test_ort_threads_follow_the_cpu_limit() -> None:
    c = _container()
    env = _env(c)
    assert env["NORMSERVE_WORKERS"] == "1", "one worker per pod: threads = CPU limit only holds then"
    ref = env["NORMSERVE_INTRA_OP_THREADS"]["resourceFieldRef"]
    assert ref == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    assert "cpu" in c["resources"]["limits"]
    assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS"


def _drain_budget(pod: dict[str, Any], container: dict[str, Any]) -> tuple[int, float, int]:
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = float(_env(container)["NORMSERVE_SHUTDOWN_GRACE_S"])
    return sleep, grace, int(pod["terminationGracePeriodSeconds"])


def test_termination_grace_covers_the_drain() -> None:
    sleep, grace, period = _drain_budget(_pod(), _container())
    assert sleep + grace + 5 <= period, f"preStop {sleep}s + drain {grace}s must end before SIGKILL at {period}s"


def test_pod_runs_locked_down_as_the_image_user() -> None:
    pod, c = _pod(), _container()
    uid, gid = _dockerfile_user(REPO_ROOT / "Dockerfile")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "read-only root: /tmp must be a writable emptyDir"


def test_service_hpa_and_pdb_point_at_the_deployment() -> None:
    deployment = _by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns replicas"

    service = _by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in _container()["ports"]}

    hpa = _by_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "with the PDB, one pod can always be evicted"

    pdb = _by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


# -- KServe ------------------------------------------------------------------------------------------
def _isvc(name: str) -> dict[str, Any]:
    (found,) = [d for _, _, d in ALL_DOCS if d["kind"] == "InferenceService" and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize(("name", "protocol"), [("normserve", "v2"), ("normserve-grpc", "grpc-v2")])
def test_inference_service_uses_the_runtime_with_v2(name: str, protocol: str) -> None:
    runtime, isvc = _by_kind("ServingRuntime"), _isvc(name)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == protocol and protocol in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats


def test_grpc_inference_service_routes_to_the_runtimes_grpc_port() -> None:
    """KServe's way to declare gRPC: protocolVersion grpc-v2 and a container port named h2c."""
    runtime, isvc = _by_kind("ServingRuntime"), _isvc("normserve-grpc")
    (c,) = runtime["spec"]["containers"]
    (port,) = isvc["spec"]["predictor"]["model"]["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == int(_env(c)["NORMSERVE_GRPC_PORT"]) == 9000
    assert port["containerPort"] != int(_env(c)["NORMSERVE_PORT"])
    http = _isvc("normserve")["spec"]["predictor"]
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] == http["terminationGracePeriodSeconds"]


def test_runtime_container_serves_kserve_port_and_probes() -> None:
    runtime, isvc = _by_kind("ServingRuntime"), _isvc("normserve")
    (c,) = runtime["spec"]["containers"]
    env = _env(c)
    assert c["name"] == "kserve-container"
    assert [p["containerPort"] for p in c["ports"]] == [int(env["NORMSERVE_PORT"])] == [8080]
    assert env["NORMSERVE_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert env["NORMSERVE_INTRA_OP_THREADS"]["resourceFieldRef"]["containerName"] == c["name"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsUser"] == _dockerfile_user(REPO_ROOT / "Dockerfile")[0]
    assert {"/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}
    sleep, grace, period = _drain_budget(isvc["spec"]["predictor"], c)
    assert sleep + grace + 5 <= period


@pytest.mark.parametrize(("file", "index", "doc"), ALL_DOCS, ids=[f"{f}#{i}" for f, i, _ in ALL_DOCS])
def test_images_are_this_version(file: str, index: int, doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    pod = spec.get("template", {}).get("spec", spec)
    for c in pod.get("containers", []):
        assert c["image"] == f"normserve:{_version()}", f"{file}: bump the image tag with the project version"


# -- settings: every NORMSERVE_* variable the deployment files set is a real setting ----------------
def _compose_env_names() -> set[str]:
    names = set()
    for path in COMPOSE_FILES:
        for service in yaml.safe_load(path.read_text())["services"].values():
            names |= set(service.get("environment", {}))
    return names


def _manifest_env_names() -> set[str]:
    names = set()
    for _, _, doc in ALL_DOCS:
        spec = doc["spec"]
        pod = spec.get("template", {}).get("spec", spec)
        for c in pod.get("containers", []):
            names |= set(_env(c))
        names |= set(_env(spec.get("predictor", {}).get("model", {})))
    return names


def test_environment_variables_are_settings() -> None:
    fields = {f"NORMSERVE_{name.upper()}" for name in Settings.model_fields}
    used = {n for n in _compose_env_names() | _manifest_env_names() if n.startswith("NORMSERVE_")}
    assert used, "no NORMSERVE_* variable found"
    assert used <= fields, f"not settings (typo?): {sorted(used - fields)}"
    example = (REPO_ROOT / ".env.example").read_text()
    documented = {n for n in re.findall(r"^# (NORMSERVE_[A-Z_]+)=", example, re.M) if n in fields}
    settable = {n for n in _compose_env_names() if n.startswith("NORMSERVE_")}
    assert settable <= documented | {"NORMSERVE_HOST", "NORMSERVE_PORT", "NORMSERVE_MODEL_REPOSITORY"}, (
        f".env.example does not document {sorted(settable - documented)}"
    )


# -- compose ---------------------------------------------------------------------------------------------
def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILES[0].read_text()))


def test_compose_serves_on_loopback_8000_with_healthcheck() -> None:
    compose = _compose()
    assert "version" not in compose, "the Compose Specification has no version key (v2 warns)"
    svc = compose["services"]["normserve"]
    assert svc["ports"] == [
        "${NORMSERVE_BIND:-127.0.0.1}:${NORMSERVE_HOST_PORT:-8000}:8000",
        "${NORMSERVE_BIND:-127.0.0.1}:${NORMSERVE_GRPC_HOST_PORT:-8001}:8001",
    ]
    assert svc["environment"]["NORMSERVE_PORT"] == "8000" and svc["environment"]["NORMSERVE_GRPC_PORT"] == "8001"
    assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
    assert svc["restart"] == "unless-stopped"
    assert svc["read_only"] is True and svc["tmpfs"] == ["/tmp"]
    assert svc["build"].get("target") == "runtime"
    grace = float(
        re.sub(r"\$\{NORMSERVE_SHUTDOWN_GRACE_S:-([0-9.]+)\}", r"\1", svc["environment"]["NORMSERVE_SHUTDOWN_GRACE_S"])
    )
    assert grace < float(svc["stop_grace_period"].rstrip("s")), "compose must wait out the drain before SIGKILL"


def test_compose_services_publish_distinct_host_ports() -> None:
    """Both services can run at once (`--profile gpu up`): no host port twice, and each service
    publishes its container's HTTP and gRPC ports."""
    published = []
    for svc in _compose()["services"].values():
        env = svc["environment"]
        targets = [p.rsplit(":", 1)[1] for p in svc["ports"]]
        assert targets == [env["NORMSERVE_PORT"], env["NORMSERVE_GRPC_PORT"]]
        published += [re.sub(r"\$\{[A-Z_]+:-(\d+)\}", r"\1", p.split(":")[-2]) for p in svc["ports"]]
    assert len(published) == len(set(published)), published


def test_compose_gpu_profile_reserves_a_gpu() -> None:
    gpu = _compose()["services"]["normserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "CUDAExecutionProvider" in gpu["environment"]["NORMSERVE_PROVIDERS"]


# -- Dockerfiles ---------------------------------------------------------------------------------------
def _dockerfile_user(path: Path) -> tuple[int, int]:
    (user,) = re.findall(r"^USER\s+(\S+)", path.read_text(), re.M)
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    return uid, gid


def _stages(path: Path) -> list[tuple[str, str, str]]:
    """(base, name, body) per stage."""
    text = path.read_text()
    heads = list(re.finditer(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I))
    return [
        (m.group(1), m.group(2) or "", text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)])
        for i, m in enumerate(heads)
    ]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_runtime_stage(name: str) -> None:
    path = REPO_ROOT / name
    base, stage, body = _stages(path)[-1]
    assert stage == ("runtime" if name == "Dockerfile" else "gpu"), "the image stage is the last (default) one"
    assert base == ("${PYTHON_IMAGE}" if name == "Dockerfile" else "${CUDA_IMAGE}")
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/ready", body, re.M)
    assert 'CMD ["normserve", "serve"]' in body
    assert "NORMSERVE_MODEL_REPOSITORY=/models" in body and "NORMSERVE_HOST=0.0.0.0" in body
    (exposed,) = re.findall(r"^EXPOSE (.+)$", body, re.M)
    ports = [re.search(rf"{name}=(\d+)", body) for name in ("NORMSERVE_PORT", "NORMSERVE_GRPC_PORT")]
    assert exposed.split() == [m.group(1) for m in ports if m], "EXPOSE the HTTP and the gRPC port"
    assert "org.opencontainers.image.version" in body
    assert "pip install" not in body and "torch" not in body
    _dockerfile_user(path)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_installs_the_runtime_dependencies_and_the_tracing_extra(name: str) -> None:
    """The requirements the image installs, computed by the Dockerfile's own command from
    pyproject: `[project] dependencies` and the `tracing` extra, no other extra (and the GPU image
    takes onnxruntime-gpu instead of onnxruntime)."""
    [code] = re.findall(r'python3? -c "(.*?)" \\\n\s*> \S*requirements\.txt', (REPO_ROOT / name).read_text())
    listed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["tracing"]
    if name == "Dockerfile.gpu":
        expected = [d for d in expected if not d.startswith("onnxruntime")]
    assert listed == expected
    assert any(d.startswith("opentelemetry-sdk") for d in listed)


def test_dockerfile_bases() -> None:
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", (REPO_ROOT / "Dockerfile").read_text(), re.M)
    gpu = (REPO_ROOT / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$", gpu, re.M)
    assert re.search(r"^ARG ORT_GPU_VERSION=\d+\.\d+\.\d+$", gpu, re.M), (
        "pin onnxruntime-gpu: its CUDA major must match the base"
    )


def test_dockerignore_is_an_allowlist() -> None:
    lines = [ln for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "service", "models", "export", "model_repository"} <= allowed
    # The image builds the project's wheel: every package pyproject lists must be in the context.
    packages = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= allowed
    assert not allowed & {".venv", ".git", "runs", ".env", "tests"}
