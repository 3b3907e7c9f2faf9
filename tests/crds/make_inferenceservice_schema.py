"""Writes inferenceservice_v1beta1.json: the JSON Schema of KServe's InferenceService (v1beta1), made
from the model classes of KServe's Python SDK, which are generated from the same Go types as the CRD.

KServe's own CRD schema is about 0.9 MB because it repeats the Kubernetes pod and container schemas
for every component. Here the KServe types are written out (with ``additionalProperties: false``, as
kubectl's strict field validation treats unknown fields) and every Kubernetes type is a ``$ref`` into
the Kubernetes 1.30 definitions that kubernetes-validate ships; ``status`` is left as an object
(nothing here writes it). Regenerate after a KServe upgrade:

    pip download kserve==0.21.0 --no-deps -d /tmp/kserve && unzip -q /tmp/kserve/*.whl -d /tmp/kserve/x
    python tests/crds/make_inferenceservice_schema.py /tmp/kserve/x/kserve/models
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import kubernetes_validate

K8S_VERSION = "1.30.0"
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
OUT = Path(__file__).with_name("inferenceservice_v1beta1.json")
ROOT_TYPE = "V1beta1InferenceService"
SPECIAL = {  # SDK type -> Kubernetes definition, where the name alone does not say
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior",
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
}
PRIMITIVES = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
              "float": {"type": "number"}, "datetime": {"type": "string"}, "object": {}}


def load_models(models: Path) -> dict[str, dict]:
    """SDK class name -> {properties: {json name: sdk type}, required: [json names]}."""
    found = {}
    for path in sorted(models.glob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            values = {t.targets[0].id: ast.literal_eval(t.value) for t in cls.body
                      if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                      and t.targets[0].id in ("openapi_types", "attribute_map")}
            if "openapi_types" not in values:
                continue
            names = values["attribute_map"]
            required = re.findall(r"client_side_validation and (\w+) is None", path.read_text())
            found[cls.name] = {"properties": {names[a]: t for a, t in values["openapi_types"].items()},
                               "required": sorted(names[a] for a in required)}
    return found


def kubernetes_definitions() -> set[str]:
    raw = kubernetes_validate.utils.schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    return set(raw["$defs"])


def build(models: dict[str, dict], k8s: set[str]) -> dict:
    defs: dict[str, dict] = {}
    missing: list[str] = []

    def k8s_ref(name: str) -> dict:
        if name in SPECIAL:
            return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{SPECIAL[name]}"}
        short = re.sub(r"^V\d+(alpha\d+|beta\d+)?", "", name)
        candidates = sorted(d for d in k8s if d.endswith(f".v1.{short}"))
        preferred = [d for d in candidates if d.startswith(("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."))]
        if (preferred or candidates):
            return {"$ref": f"{K8S_DEFINITIONS}#/$defs/{(preferred or candidates)[0]}"}
        missing.append(name)  # newer than Kubernetes 1.30, or not a Kubernetes type
        return {"$comment": f"{name}: no Kubernetes {K8S_VERSION} definition; not checked"}

    def schema_of(sdk_type: str) -> dict:
        if sdk_type in PRIMITIVES:
            return dict(PRIMITIVES[sdk_type])
        if m := re.fullmatch(r"list\[(.+)\]", sdk_type):
            return {"type": "array", "items": schema_of(m.group(1))}
        if m := re.fullmatch(r"dict\(str, (.+)\)", sdk_type):
            return {"type": "object", "additionalProperties": schema_of(m.group(1))}
        if sdk_type in models and sdk_type.startswith(("V1beta1", "V1alpha1")):
            if sdk_type not in defs:
                defs[sdk_type] = {}  # placeholder: recursion
                defs[sdk_type] = object_schema(models[sdk_type])
            return {"$ref": f"#/$defs/{sdk_type}"}
        return k8s_ref(sdk_type)

    def object_schema(model: dict) -> dict:
        out = {"type": "object", "additionalProperties": False,
               "properties": {name: schema_of(t) for name, t in sorted(model["properties"].items())}}
        if model["required"]:
            out["required"] = model["required"]
        return out

    root = models[ROOT_TYPE]
    properties = {name: schema_of(t) for name, t in sorted(root["properties"].items()) if name != "status"}
    properties["status"] = {"type": "object", "$comment": "not checked: written by KServe"}
    properties["apiVersion"] = {"type": "string", "enum": ["serving.kserve.io/v1beta1"]}
    properties["kind"] = {"type": "string", "enum": ["InferenceService"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by tests/crds/make_inferenceservice_schema.py from the KServe Python SDK's models; "
                    f"Kubernetes types refer to the Kubernetes {K8S_VERSION} definitions (kubernetes-validate). "
                    f"Types without a {K8S_VERSION} definition, not checked: {sorted(set(missing))}",
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": properties, "$defs": dict(sorted(defs.items())),
    }


def main(models_dir: str) -> None:
    schema = build(load_models(Path(models_dir)), kubernetes_definitions())
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(schema['$defs'])} KServe types)")


if __name__ == "__main__":
    main(sys.argv[1])
