"""TrainingJob manifests and a small client for tests, the demo, chaos and benchmarks."""
from __future__ import annotations

import copy
import json
from typing import Any

from .procs import wait_for


def job_manifest(name: str, **spec_overrides: Any) -> dict:
    spec: dict[str, Any] = {
        "image": "example.invalid/trainer:1",
        "model": "/models/tiny",
        "dataset": {"path": "/data/train.jsonl"},
        "hyperparameters": {"maxSteps": 100},
        "resources": {"gpus": 1},
        "runPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 2},
    }
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name}, "spec": copy.deepcopy(spec)}


def sim(**annotations) -> dict:
    """spec.template carrying kwok simulation annotations (docs/CONTRACTS.md)."""
    return {"metadata": {"annotations": {f"sim.finetune.dev/{k.replace('_', '-')}": str(v)
                                         for k, v in annotations.items()}}}


class Jobs:
    def __init__(self, cluster, namespace):
        self.cluster, self.ns = cluster, namespace

    def apply(self, manifest: dict):
        return self.cluster.apply(manifest, "-n", self.ns)

    def get(self, name: str) -> dict | None:
        res = self.cluster.kubectl("get", "tj", name, "-n", self.ns, "-o", "json", check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def wait(self, name: str, predicate, timeout: float = 60, what: str = "") -> dict:
        def check():
            status = self.status(name)
            return status if predicate(status) else None
        try:
            return wait_for(check, timeout, what or f"{name} condition", interval=0.25)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(self.status(name))}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict:
        return self.wait(name, lambda s: s.get("phase") == phase, timeout, f"{name} {phase}")

    def pods(self, name: str) -> list[dict]:
        res = self.cluster.get_json("pods", "-n", self.ns, "-l", f"finetune.dev/job-name={name}")
        return res["items"]

    def live_pods(self, name: str) -> list[dict]:
        return [p for p in self.pods(name)
                if p["status"].get("phase") not in ("Succeeded", "Failed")]

    def events(self, name: str) -> list[dict]:
        res = self.cluster.get_json("events", "-n", self.ns,
                                    "--field-selector", f"involvedObject.name={name}")
        return res["items"]
