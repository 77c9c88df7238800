"""The two workloads: N TrainingJobs, and N batch/v1 Jobs whose pod template is the very
pod the operator builds for a TrainingJob (same image, command, env, resources, ports,
security context, annotations) minus the operator's labels and owner reference.

Pods start with `sim.finetune.dev/outcome: run` (kwok keeps them Running); the benchmark
finishes them by annotating `outcome: succeed, run-for: 0s`, which kwok acts on at the
pod's next MODIFIED event. The same patch is sent to both kinds of pod."""
from __future__ import annotations

import copy

from finetune_operator.api import parse_spec
from finetune_operator.pods import build_pod
from finetune_operator.trainer_env import trainer_env
from finetune_testbed.jobs import job_manifest, sim

BENCH_LABEL = "bench.finetune.dev/run"
RUNNING = sim(outcome="run")
SUCCEED_PATCH = {"metadata": {"annotations": {"sim.finetune.dev/outcome": "succeed",
                                              "sim.finetune.dev/run-for": "0s"}}}


def trainingjob(name: str, run_id: str, template: dict = RUNNING) -> dict:
    m = job_manifest(name, template=copy.deepcopy(template))
    m["metadata"]["labels"] = {BENCH_LABEL: run_id}
    return m


def batch_job(name: str, run_id: str) -> dict:
    tj = trainingjob(name, run_id)
    spec = parse_spec(tj["spec"])
    pod = build_pod(name, "unused", "00000000-0000-0000-0000-000000000000", spec, 1,
                    trainer_env=trainer_env(spec))
    template = {"metadata": {"labels": {BENCH_LABEL: run_id},
                             "annotations": pod["metadata"].get("annotations") or {}},
                "spec": pod["spec"]}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {BENCH_LABEL: run_id}},
            "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0,
                     "template": template}}
