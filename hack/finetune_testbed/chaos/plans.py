"""The workload: which jobs run, how each simulated trainer behaves, and the kwok stages
that make a stopped trainer take its time to exit."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import cluster as cluster_mod
from ..jobs import job_manifest, sim

KINDS = (("succeed", 0.45), ("fail", 0.15), ("run", 0.25), ("evict", 0.15))
# Every GANG_EVERY-th job is a 2-pod gang (spec.workers: 2), so even a small run has some. In a
# gang's `fail` and `evict` jobs one rank (sim.finetune.dev/outcome-rank) meets the outcome and
# the other keeps running until the operator stops the gang; in `succeed` jobs both ranks complete.
GANG_EVERY = 3


def chaos_stages(out: Path) -> Path:
    """stages.yaml with one addition: a deleted Running pod takes the time in its
    `sim.finetune.dev/terminate-after` annotation to exit (a trainer writing its checkpoint
    after SIGTERM), instead of 200 ms. Without it a replaced pod is always gone long before
    the next attempt starts, and overlapping attempts could never be seen."""
    docs = list(yaml.safe_load_all(cluster_mod.STAGES.read_text()))
    for doc in docs:
        if doc and doc.get("metadata", {}).get("name") == "pod-terminate":
            doc["spec"]["delay"]["durationFrom"] = {
                "expressionFrom": '.metadata.annotations["sim.finetune.dev/terminate-after"]'}
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


@dataclass
class JobPlan:
    name: str
    kind: str
    gpus: int
    run_for: float | None = None
    terminate_after: float | None = None
    backoff_limit: int = 3
    max_resumes: int = 1000
    workers: int = 1
    outcome_rank: int | None = None  # in a gang: the one rank that fails or is evicted

    def manifest(self) -> dict:
        annotations: dict[str, object] = {"outcome": {"succeed": "succeed", "fail": "fail", "run": "run",
                                                      "evict": "evict"}[self.kind]}
        if self.outcome_rank is not None:
            annotations["outcome_rank"] = self.outcome_rank
        if self.run_for is not None:
            annotations["run_for"] = f"{int(self.run_for * 1000)}ms"
        if self.terminate_after is not None:
            annotations["terminate_after"] = f"{int(self.terminate_after * 1000)}ms"
        return job_manifest(self.name, resources={"gpus": self.gpus}, workers=self.workers,
                            runPolicy={"backoffLimit": self.backoff_limit,
                                       "maxResumes": self.max_resumes},
                            template=sim(**annotations))


def plan_jobs(n: int, rng: random.Random, fault_seconds: float) -> list[JobPlan]:
    # The draws from rng are in a fixed order: a --seed replays the same job mix.
    kinds, weights = [k for k, _ in KINDS], [w for _, w in KINDS]
    longest = max(4.0, min(30.0, 0.5 * fault_seconds))
    plans = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        plan = JobPlan(f"job-{i:04d}-{kind}", kind, rng.choice((1, 1, 2)))
        if i % GANG_EVERY == GANG_EVERY - 1:
            plan.workers = 2
            if kind in ("fail", "evict"):
                plan.outcome_rank = rng.choice((0, 1))
        if rng.random() < 0.5:
            plan.terminate_after = rng.uniform(1.0, 6.0)
        if kind == "succeed":
            plan.run_for = rng.uniform(3.0, longest)
        elif kind == "fail":
            plan.run_for = rng.uniform(1.0, 5.0)
            plan.backoff_limit = rng.choice((0, 1, 2))
        elif kind == "evict":
            plan.run_for = rng.uniform(2.0, 6.0)
            plan.max_resumes = rng.choice((1, 2))
            plan.backoff_limit = 20
        plans.append(plan)
    return plans
