"""Generate the TrainingJob CustomResourceDefinition from the pydantic models.

    python -m finetune_operator.api.crd                 # print the CRD
    python -m finetune_operator.api.crd --write crds/   # write crds/finetune.dev_trainingjobs.yaml
    python -m finetune_operator.api.crd --check crds/   # exit 1 when the file is stale

The apiserver wants a *structural* schema: every node typed, no $ref, no anyOf/oneOf except the
int-or-string idiom, properties and additionalProperties never together. pydantic's JSON schema
is rewritten into that shape here; CEL rules (x-kubernetes-validations) are added per field path.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .models import (
    API_VERSION,
    CATEGORIES,
    DNS_LABEL_PATTERN,
    GROUP,
    KIND,
    MAX_JOB_NAME_LENGTH,
    PLURAL,
    RUN_CHECKPOINT_FIELDS,
    RUN_FIELDS,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    TrainingJobSpec,
    TrainingJobStatus,
)

CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

# JSON Schema keywords the apiserver's JSONSchemaProps does not know, or that we never want.
_DROPPED_KEYS = {"title", "const", "$defs", "examples", "discriminator"}

# Fields that define a run can only be set at creation, like a Job's pod template.
_IMMUTABLE_HINT = (
    "it defines the run; create a new TrainingJob (checkpoint.resumeFrom can start it from this one's checkpoint)"
)

# CEL rules, keyed by the path of the node they sit on ("" = spec, "[]" = list items).
# Each message is what `kubectl apply` prints; keep them actionable.
SPEC_RULES: dict[str, list[dict[str, str]]] = {
    "image": [{"rule": "self.size() > 0", "message": "image must not be empty"}],
    "model": [{"rule": "self.size() > 0", "message": "model must not be empty (a hub id or an absolute path)"}],
    "dataset.path": [{"rule": "self.size() > 0", "message": "dataset.path must not be empty"}],
    "hyperparameters": [
        {
            "rule": "has(self.maxSteps) || has(self.epochs)",
            "message": "hyperparameters must set maxSteps or epochs",
        }
    ],
    "runPolicy": [
        {
            "rule": "!has(self.backoffSeconds) || !has(self.maxBackoffSeconds) "
            "|| self.maxBackoffSeconds >= self.backoffSeconds",
            "message": "runPolicy.maxBackoffSeconds must be greater than or equal to runPolicy.backoffSeconds",
        }
    ],
    "dataset": [
        {
            "rule": "has(self.promptField) == has(self.completionField)",
            "message": "dataset.promptField and dataset.completionField must be set together "
            "(or neither, to train on dataset.textField)",
        }
    ],
    "checkpoint": [
        {
            "rule": "!has(self.resumeFrom) || (has(self.claimName) "
            "&& self.resumeFrom.startsWith('pvc://' + self.claimName + '/'))",
            "message": "checkpoint.resumeFrom must be a path on the job's own claim: pvc://<checkpoint.claimName>/<path>",
        },
        *[
            {
                "rule": f"has(self.{field}) == has(oldSelf.{field}) "
                f"&& (!has(self.{field}) || self.{field} == oldSelf.{field})",
                "message": f"checkpoint.{field} is immutable: {_IMMUTABLE_HINT}",
            }
            for field in RUN_CHECKPOINT_FIELDS
        ],
    ],
    "": [
        {
            "rule": "!has(self.workloadPriorityClassName) || has(self.queueName)",
            "message": "workloadPriorityClassName needs queueName: it is the priority of the job's Kueue Workloads",
        },
        {
            "rule": "!has(self.strategy) || self.strategy != 'FSDP' || !has(self.method) || self.method != 'QLoRA'",
            "message": "strategy FSDP does not support method QLoRA (4-bit weights are not sharded): use strategy "
            "DDP with QLoRA, or method LoRA with FSDP",
        },
        {
            "rule": "!has(self.strategy) || self.strategy != 'FSDP' "
            "|| (has(self.resources) && has(self.resources.gpus) ? self.resources.gpus : 1) "
            "* (has(self.workers) ? self.workers : 1) >= 2",
            "message": "strategy FSDP shards the model across GPUs: it needs resources.gpus x workers >= 2",
        },
    ],
    "failurePolicy.rules[]": [
        {
            "rule": "has(self.onExitCodes) != has(self.onPodConditions)",
            "message": "each failurePolicy rule needs exactly one of onExitCodes or onPodConditions",
        }
    ],
}

for _field in RUN_FIELDS:  # transition rules: checked on updates only
    SPEC_RULES.setdefault(_field, []).append(
        {"rule": "self == oldSelf", "message": f"{_field} is immutable: {_IMMUTABLE_HINT}"}
    )

ROOT_RULES = [
    {
        "rule": f"self.metadata.name.size() <= {MAX_JOB_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters (it becomes a pod label value)",
    },
    {
        "rule": f"!has(self.spec) || !has(self.spec.workers) || self.spec.workers == 1 "
        f"|| self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
        "message": "with spec.workers > 1, metadata.name must be a DNS label (lowercase letters, digits and '-', "
        "starting with a letter): it names the gang's headless Service",
    },
]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ranks.display"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve_ref(ref: str, defs: dict[str, Any]) -> dict[str, Any]:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise ValueError(f"unsupported $ref {ref!r}")
    return defs[ref[len(prefix) :]]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one pydantic JSON-schema node (recursively) into a structural OpenAPI v3 node."""
    node = dict(node)

    if "$ref" in node:
        target = _resolve_ref(node.pop("$ref"), defs)
        # Keywords next to $ref (description, default) describe the field and win over the type's.
        node = {**target, **node}

    if node.get("x-kubernetes-int-or-string"):
        int_or_string = {
            k: v for k, v in node.items() if k in ("description", "pattern", "x-kubernetes-int-or-string")
        }
        int_or_string["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return int_or_string

    if "anyOf" in node:
        # Optional[X] is `anyOf: [X, null]`: keep X, the field is simply not required.
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express anyOf with {len(branches)} non-null branches structurally")
        if node.get("default", ...) is None:
            node.pop("default")
        node = {**branches[0], **node}
        if "$ref" in node:
            return _structural(node, defs)

    if "const" in node and "enum" not in node:
        node["enum"] = [node["const"]]  # Literal["X"]: JSONSchemaProps has enum, not const

    for key in ("oneOf", "allOf", "not"):
        if key in node:
            raise ValueError(f"{key} is not allowed in a structural schema")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict) and "properties" not in node:
                out["additionalProperties"] = _structural(value, defs)
            # additionalProperties: false (extra=forbid) is implied by pruning.
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = copy.deepcopy(value)

    if out.get("type") == "object" and "properties" in out:
        out.pop("x-kubernetes-preserve-unknown-fields", None)
    if "type" not in out:
        if out.get("x-kubernetes-preserve-unknown-fields"):
            out["type"] = "object"
        else:
            raise ValueError(f"schema node without a type: {node}")
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as a structural OpenAPI v3 schema (no $refs)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in filter(None, path.split(".")):
        is_items = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if is_items:
            node = node["items"]
    return node


def spec_schema() -> dict[str, Any]:
    schema = structural_schema(TrainingJobSpec)
    for path, rules in SPEC_RULES.items():
        _node_at(schema, path).setdefault("x-kubernetes-validations", []).extend(copy.deepcopy(rules))
    return schema


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def status_schema() -> dict[str, Any]:
    # Only the operator writes status; apiserver defaulting there would only hide its omissions.
    schema = _without_defaults(structural_schema(TrainingJobStatus))
    conditions = schema["properties"]["conditions"]
    # Conditions are a map keyed by type, like every built-in API's conditions.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["maxItems"] = 32
    return schema


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"TrainingJob ({API_VERSION}) fine-tunes a causal language model "
                            "with LoRA in a pod that the operator creates, resumes and cleans up.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "APIVersion of this object."},
                                "kind": {"type": "string", "description": "Kind of this object."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": copy.deepcopy(ROOT_RULES),
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """Deterministic YAML (sorted keys) so a stale file is a plain text difference."""
    header = "# Generated by `make manifests` (python -m finetune_operator.api.crd). Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=True, default_flow_style=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.api.crd", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DIR", help=f"write DIR/{CRD_FILENAME}")
    group.add_argument("--check", metavar="DIR", help=f"exit 1 when DIR/{CRD_FILENAME} is out of date")
    args = parser.parse_args(argv)
    text = render_crd_yaml()
    if args.write:
        target = Path(args.write) / CRD_FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}")
    elif args.check:
        target = Path(args.check) / CRD_FILENAME
        if not target.exists() or target.read_text() != text:
            print(f"{target} is out of date; run `make manifests`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
