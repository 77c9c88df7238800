"""One chaos run, step by step (see the package docstring), and its command line."""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .. import cluster as cluster_mod
from ..cluster import ClusterConfig, LocalCluster
from ..procs import wait_for
from ..reliability import apply_crd, create_namespace
from . import __doc__ as PACKAGE_DOC
from .common import GROUP_PATH, MANAGED_PODS, NAMESPACE, log, pods_by_job
from .faults import FAULT_WEIGHTS, Chaos
from .invariants import (
    all_resting,
    attempt_overlaps,
    event_problems,
    inconsistent_jobs,
    job_violations,
    lingering_gang_problems,
    operator_tracebacks,
    overlap_violations,
    own_tracebacks,
)
from .plans import chaos_stages, plan_jobs
from .report import Report, describe, phase_counts


class TruthWatch(threading.Thread):
    """From the end of the faults: remembers the last moment any status disagreed with
    the pods (time to truth = that moment, or the last status change, minus the fault)."""

    def __init__(self, chaos: Chaos):
        super().__init__(daemon=True)
        self.chaos = chaos
        self.stopping = threading.Event()
        self.last_inconsistent = time.monotonic()

    def run(self) -> None:
        self.last_inconsistent = time.monotonic()
        while not self.stopping.is_set():
            try:
                if inconsistent_jobs(self.chaos.jobs.snapshot(), self.chaos.pods.snapshot()):
                    self.last_inconsistent = time.monotonic()
            except Exception:  # a snapshot taken mid-update
                self.last_inconsistent = time.monotonic()
            self.stopping.wait(0.5)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


class ChaosRun:
    """The state one run carries from step to step; run() below is the sequence."""

    def __init__(self, n_jobs: int, fault_seconds: float, seed: int | None, settle_seconds: float,
                 fault_rate: float | None, log_dir: Path | None, weights: dict | None,
                 artifacts: Path | None):
        self.n_jobs, self.fault_seconds, self.settle_seconds = n_jobs, fault_seconds, settle_seconds
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.rng = random.Random(self.seed)  # jobs first, then faults: a seed replays both
        self.t_start = time.monotonic()
        self.plans = plan_jobs(n_jobs, self.rng, fault_seconds)
        self.gpus = sum(p.gpus * p.workers for p in self.plans)
        self.nodes = max(3, math.ceil(self.gpus * 1.2 / 8))  # every job at once, plus 20 %
        self.rate = fault_rate or 1.0  # faults per second
        self.log_dir, self.weights, self.artifacts = log_dir, weights, artifacts
        self._cluster: LocalCluster | None = None
        self._chaos: Chaos | None = None

    @property
    def cluster(self) -> LocalCluster:
        assert self._cluster is not None, "start_cluster() first"
        return self._cluster

    @property
    def chaos(self) -> Chaos:
        assert self._chaos is not None, "start_workload() first"
        return self._chaos

    def start_cluster(self) -> None:
        gangs = sum(1 for p in self.plans if p.workers > 1)
        log(f"seed {self.seed}: {self.n_jobs} jobs ({dict(Counter(p.kind for p in self.plans))}; "
            f"{gangs} of them 2-pod gangs), {self.gpus} GPUs on {self.nodes} nodes")
        cluster = LocalCluster(config=ClusterConfig(gpu_nodes=self.nodes, node_prefix="chaos-node"))
        stages, cluster_mod.STAGES = cluster_mod.STAGES, chaos_stages(
            cluster.workdir / "chaos-stages.yaml")  # read by kwok's command line in start()
        try:
            cluster.start()
        finally:
            cluster_mod.STAGES = stages
        self._cluster = cluster
        log(f"control plane up in {cluster.startup_seconds:.1f}s at {cluster.workdir}")

    def start_workload(self) -> None:
        """CRD, namespace, watches, the operator, then every job, until each has a phase."""
        cluster = self.cluster
        apply_crd(cluster)
        create_namespace(cluster, NAMESPACE)
        # set before starting anything, so that teardown() stops what did start
        self._chaos = chaos = Chaos(cluster, NAMESPACE, self.plans, self.rng, self.log_dir or cluster.log_dir)
        chaos.pods.start()
        chaos.jobs.start()
        chaos.operator.start()
        chaos.create_jobs()
        wait_for(lambda: all(((j.get("status") or {}).get("phase"))
                             for j in chaos.jobs.snapshot().values())
                 and len(chaos.jobs.snapshot()) == self.n_jobs, 180, "every job has a phase",
                 interval=1.0)
        log(f"all {self.n_jobs} jobs have a phase; injecting faults for {self.fault_seconds:.0f}s")

    def settle(self, t_recovered: float) -> tuple[bool, dict[str, list[str]]]:
        """Waits (until the deadline) for statuses that match the pods, jobs at rest, and 10 s
        without a status change; returns whether that happened and the last problems seen."""
        chaos = self.chaos
        log("waiting for the statuses to settle")
        deadline = time.monotonic() + self.settle_seconds
        problems: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            chaos.check_operator()
            jobs, pods = chaos.jobs.snapshot(), chaos.pods.snapshot()
            problems = inconsistent_jobs(chaos.jobs.snapshot(), chaos.pods.snapshot())
            now = time.monotonic()
            resting = all_resting(chaos.plans, jobs, pods)
            quiet = now - max(chaos.jobs.last_change, t_recovered) >= 10.0
            if not problems and resting and quiet and len(jobs) == self.n_jobs:
                return True, problems
            time.sleep(1.0)
        return False, problems

    def final_state(self) -> tuple[dict[str, dict], list[dict], list[dict]]:
        """Jobs by name, pods and Events straight from the API server (not the watch caches)."""
        kube = self.chaos.kube
        jobs = {j["metadata"]["name"]: j for j in kube.get(
            f"{GROUP_PATH}/namespaces/{NAMESPACE}/trainingjobs")["items"]}
        pods = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods",
                        query={"labelSelector": MANAGED_PODS})["items"]
        events = kube.get(f"/api/v1/namespaces/{NAMESPACE}/events")["items"]
        return jobs, pods, events

    def check(self, jobs: dict[str, dict], pods: list[dict], events: list[dict], settled: bool,
              problems: dict[str, list[str]]) -> tuple[list[str], list[str], int, int]:
        """Every invariant over the final state. Returns the violations, the details for the
        report, the Warning Events missing, and the number of operator tracebacks."""
        chaos = self.chaos
        violations, unexpected = job_violations(chaos.plans, jobs, pods, chaos.exit_faulted, chaos.disrupted)
        by_job = pods_by_job(pods)
        details = [describe(n, jobs[n], by_job[n], chaos.faults + chaos.recoveries) for n in unexpected]
        history, conclusions = chaos.pods.history(), chaos.jobs.conclusions()
        violations += overlap_violations(attempt_overlaps(history))
        lingering = lingering_gang_problems(conclusions, history, chaos.pods.now())
        violations += lingering
        for job in sorted({v.split(":")[0] for v in lingering}):  # the histories behind them
            details.append(f"  {job}: status {chaos.jobs.timeline.get(job)}"
                           + "".join(f"\n    {s}" for s in history if s.job == job))
        if not settled:
            violations.append(f"did not settle within {self.settle_seconds:.0f}s after the last fault; "
                              f"inconsistent: {dict(list(problems.items())[:5])}")
        event_violations, missing = event_problems(jobs, events)
        violations += event_violations
        violations += [f"operator: {e}" for e in chaos.unexpected_exits]
        tracebacks = operator_tracebacks(chaos.operator.proc.log_path.read_text(errors="replace"))
        for tb in own_tracebacks(tracebacks):
            violations.append("operator traceback: " + " | ".join(tb.splitlines()[-2:]))
            details.append(tb)
        return violations, details, missing, len(tracebacks)

    def report(self, settled: bool, problems: dict[str, list[str]], t_recovered: float,
               last_inconsistent: float) -> Report:
        chaos = self.chaos
        last_change = chaos.jobs.last_change
        jobs, pods, events = self.final_state()
        violations, details, missing, tracebacks = self.check(jobs, pods, events, settled, problems)
        t_fault = chaos.last_fault
        ttc = max(0.0, last_inconsistent - t_fault) if settled else None
        ttq = max(0.0, last_change - t_fault)
        phases, phases_by_kind = phase_counts(jobs, chaos.plans)
        gangs = {p.name for p in self.plans if p.workers > 1}
        return Report(
            jobs=self.n_jobs, nodes=self.nodes, seed=self.seed, fault_seconds=self.fault_seconds,
            faults=dict(Counter(f.kind for f in chaos.faults)),
            recoveries=dict(Counter(f.kind for f in chaos.recoveries)),
            phases=phases, phases_by_kind=phases_by_kind,
            time_to_consistent=ttc, time_to_quiet=ttq,
            time_to_truth=None if ttc is None else max(ttc, ttq),
            recovery_seconds=max(0.0, t_recovered - t_fault),
            settled=settled, violations=violations, missing_events=missing,
            operator_kills=chaos.killed_by_us, operator_tracebacks=tracebacks,
            pods_created=len(chaos.pods.seen),
            overlaps=attempt_overlaps(chaos.pods.history()), wall_seconds=time.monotonic() - self.t_start,
            fault_log=[asdict(f) for f in chaos.faults + chaos.recoveries], details=details,
            gang_jobs=len(gangs),
            gang_attempts_concluded=sum(1 for job, _ in chaos.jobs.conclusions() if job in gangs))

    def teardown(self) -> None:
        if self._chaos is not None:
            self._chaos.pods.stop()
            self._chaos.jobs.stop()
            self._chaos.operator.stop()
        self.cluster.stop()
        if self.artifacts is not None:  # component and operator logs, for the post-mortem
            dest = Path(self.artifacts) / f"chaos-{self.seed}"
            shutil.copytree(self.cluster.log_dir, dest, dirs_exist_ok=True)
            log(f"logs copied to {dest}")
        self.cluster.cleanup()


def run(n_jobs: int = 300, fault_seconds: float = 90.0, seed: int | None = None,
        settle_seconds: float = 240.0, fault_rate: float | None = None,
        log_dir: Path | None = None, weights: dict | None = None,
        artifacts: Path | None = None) -> Report:
    r = ChaosRun(n_jobs, fault_seconds, seed, settle_seconds, fault_rate, log_dir, weights, artifacts)
    r.start_cluster()
    try:
        r.start_workload()
        r.chaos.inject(r.fault_seconds, r.rate, r.weights)
        truth = TruthWatch(r.chaos)
        truth.start()
        log(f"{len(r.chaos.faults)} faults injected; recovering nodes and the operator")
        r.chaos.recover_all()
        t_recovered = r.chaos.last_world_change
        settled, problems = r.settle(t_recovered)
        truth.stop()
        return r.report(settled, problems, t_recovered, truth.last_inconsistent)
    finally:
        r.teardown()


def parse_weights(text: str, error) -> dict[str, float]:
    """`kind=w,...` over the default weights; kinds weighted 0 are left out."""
    weights: dict[str, float] = dict(FAULT_WEIGHTS)
    for item in filter(None, text.split(",")):
        kind, _, value = item.partition("=")
        if kind not in FAULT_WEIGHTS:
            error(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_WEIGHTS)}")
        weights[kind] = float(value)
    return {k: w for k, w in weights.items() if w > 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune_testbed.chaos", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=300, help="number of TrainingJobs (default 300)")
    p.add_argument("--fault-seconds", type=float, default=90.0, help="how long faults are injected")
    p.add_argument("--fault-rate", type=float, default=1.0, help="faults per second (mean)")
    p.add_argument("--settle-seconds", type=float, default=240.0,
                   help="deadline for statuses to settle after the last fault")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="copy the component and operator logs into this directory")
    p.add_argument("--weights", default="",
                   help="fault weights, e.g. node_delete=5,operator_pause=2 (others keep their "
                        f"defaults; 0 disables a kind). Defaults: {FAULT_WEIGHTS}")
    args = p.parse_args(argv)
    weights = parse_weights(args.weights, p.error)
    report = run(args.jobs, args.fault_seconds, args.seed, args.settle_seconds, args.fault_rate,
                 weights=weights, artifacts=args.artifacts)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 1 if report.violations else 0
