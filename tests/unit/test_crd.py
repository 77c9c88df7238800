"""The generated CRD: up to date in crds/, structurally valid apiextensions v1, CEL present."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api import TrainingJobStatus
from finetune_operator.api.crd import CRD_FILENAME, build_crd, main, render_crd_yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / CRD_FILENAME
# Keywords apiextensions.k8s.io/v1 JSONSchemaProps knows (the ones a generator could emit).
ALLOWED_KEYS = {
    "type", "description", "properties", "items", "required", "default", "enum", "format", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
    "maxItems", "minProperties", "maxProperties", "additionalProperties", "nullable", "anyOf",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


def _schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crds_directory_is_up_to_date():
    assert CRD_PATH.exists(), "crds/ has no CRD: run `make manifests`"
    assert CRD_PATH.read_text() == render_crd_yaml(), "crds/ is stale: run `make manifests`"


def test_check_cli_detects_stale_files(tmp_path):
    assert main(["--check", str(tmp_path)]) == 1
    assert main(["--write", str(tmp_path)]) == 0
    assert main(["--check", str(tmp_path)]) == 0
    (tmp_path / CRD_FILENAME).write_text(render_crd_yaml().replace("tj", "xx"))
    assert main(["--check", str(tmp_path)]) == 1


def test_rendering_is_deterministic():
    assert render_crd_yaml() == render_crd_yaml()
    assert yaml.safe_load(render_crd_yaml()) == build_crd()


def test_crd_identity():
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "trainingjobs.finetune.dev"
    spec = crd["spec"]
    assert spec["group"] == "finetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "TrainingJob", "listKind": "TrainingJobList", "plural": "trainingjobs",
                             "singular": "trainingjob", "shortNames": ["tj"], "categories": ["training"]}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"].upper(): c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"PHASE": ".status.phase", "READY": ".status.ranks.display",
                       "PROGRESS": ".status.progress.display", "LOSS": ".status.progress.loss",
                       "RESTARTS": ".status.restarts",
                       "REASON": ".status.reason", "AGE": ".metadata.creationTimestamp"}


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        assert set(node) <= ALLOWED_KEYS, f"{path}: unsupported keys {set(node) - ALLOWED_KEYS}"
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node, f"{path}: anyOf outside int-or-string"
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node and "maxItems" in node, f"{path}: unbounded list"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object" and "properties" not in node, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert node[key] is True, f"{path}: {key} must be a boolean in OpenAPI v3.0"


def test_free_form_fields_preserve_unknown_fields():
    template = _schema()["properties"]["spec"]["properties"]["template"]["properties"]
    for field in ("affinity", "securityContext", "containerSecurityContext"):
        assert template[field]["x-kubernetes-preserve-unknown-fields"] is True
    for field in ("tolerations", "volumes"):
        assert template[field]["items"]["x-kubernetes-preserve-unknown-fields"] is True


def test_cel_rules_are_present_with_messages():
    rules = {}
    for path, node in _walk(_schema()):
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) == {"rule", "message"} and rule["message"], path
            rules[path] = rules.get(path, []) + [rule]
    assert all("self == oldSelf" == r["rule"] for r in rules[".spec.workers"])  # only immutability
    assert any("self.spec.workers == 1" in r["rule"] and "DNS label" in r["message"] for r in rules[""])
    assert "has(self.maxSteps) || has(self.epochs)" in rules[".spec.hyperparameters"][0]["rule"]
    assert rules[".spec.failurePolicy.rules[]"][0]["rule"] == "has(self.onExitCodes) != has(self.onPodConditions)"
    assert "self.maxBackoffSeconds >= self.backoffSeconds" in rules[".spec.runPolicy"][0]["rule"]
    for field in (".spec.model", ".spec.image", ".spec.dataset.path"):
        assert rules[field][0]["rule"] == "self.size() > 0"
    assert "self.metadata.name.size() <= 63" in rules[""][0]["rule"]


def test_strings_under_cel_rules_are_bounded():
    # CEL cost is estimated from maxLength; unbounded strings can make the apiserver refuse the rule.
    spec = _schema()["properties"]["spec"]["properties"]
    for node in (spec["image"], spec["model"], spec["dataset"]["properties"]["path"]):
        assert node["maxLength"] <= 4096


def test_every_status_field_is_declared():
    status = _schema()["properties"]["status"]
    declared = set(status["properties"])
    fields = {info.alias or name for name, info in TrainingJobStatus.model_fields.items()}
    assert declared == fields
    for nested in ("progress", "checkpoint", "lastInterruption"):
        assert status["properties"][nested]["properties"], nested
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "default" not in yaml.safe_dump(status)


def test_spec_defaults_and_descriptions_reach_the_schema():
    spec = _schema()["properties"]["spec"]
    assert spec["required"] == ["image", "model", "dataset", "hyperparameters"]
    run_policy = spec["properties"]["runPolicy"]
    assert run_policy["default"] == {}
    assert run_policy["properties"]["backoffLimit"]["default"] == 3
    assert run_policy["properties"]["backoffLimit"]["maximum"] == 100
    assert spec["properties"]["lora"]["properties"]["r"]["maximum"] == 1024
    assert spec["properties"]["method"]["enum"] == ["LoRA", "QLoRA"]
    for path, node in _walk(spec):
        if path.count(".") == 1:
            assert node.get("description"), f"{path} has no description for kubectl explain"
