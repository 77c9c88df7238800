"""`python -m bench.gang_restart` (make bench BENCH_GANG=1): how long from one rank's failure
to the replacement gang running, for N two-worker TrainingJobs on kwok GPU nodes.

1. One local control plane (as bench.run: no API server limits) with ceil(N*workers/8)+2
   kwok nodes of 8 GPUs; the operator as its own process with production intervals.
2. Submit N jobs (spec.workers, 1 GPU per rank, pods stay Running: sim outcome=run,
   runPolicy.backoffSeconds --backoff-seconds, default 0, so the figure is the operator's
   and the cluster's work, not a configured wait); wait until every job is Running with
   status.ranks.ready == workers on attempt 1.
3. Fail rank 1 of every job at --rate per second (default 5): `evict` (default) posts an Eviction for
   the pod (the Eviction API, as a drain does); `exit` annotates the pod so kwok ends its
   trainer with exit code 1 (a crash; counted as a failure, not a resume).
4. Per job, from an independent watch client (one watch on pods, one on TrainingJobs; each
   time is when the watch delivered the event, time.monotonic()): the failure (rank 1's
   pod first seen with a deletionTimestamp or a finished phase) -> status Resuming ->
   attempt 2's pods created -> all of them Running -> status Running with
   ranks.ready == workers on attempt 2. Prints p50/p95/max of each step and of the total,
   checks every job's counters (one resume, or one failure, per job) and that no job ever
   had pods of two attempts live at once; writes .state/gang-restart-<timestamp>.json."""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune_testbed.cluster import REPO, ClusterConfig, LocalCluster
from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.operator_proc import OperatorProcess

from . import controlplane
from .kubeapi import Api
from .procstat import wait_until
from .report import percentile
from .run import OPERATOR_ARGS, _finite
from .watcher import _Stream

NAMESPACE = "bench-gang"
POD_DONE = ("Succeeded", "Failed")
EXIT_PATCH = {"metadata": {"annotations": {"sim.finetune.dev/outcome": "fail",
                                           "sim.finetune.dev/run-for": "0s",
                                           "sim.finetune.dev/exit-code": "1"}}}
# (name, from, to) of each measured step; the total is failure -> gang running
STEPS = (("failure -> status Resuming", "failed", "resuming"),
         ("Resuming -> new pods created", "resuming", "created"),
         ("created -> all ranks Running", "created", "pods_running"),
         ("ranks Running -> status ready", "pods_running", "ready"),
         ("total: failure -> gang Running", "failed", "ready"))
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[gang-bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class JobTimes:
    """Watch times (monotonic) of one job's restart."""
    failed: float | None = None
    resuming: float | None = None
    created: float | None = None  # the last of attempt 2's pods first seen
    pods_running: float | None = None  # the last of attempt 2's pods first seen Running
    ready: float | None = None
    rank_created: dict[int, float] = field(default_factory=dict)
    rank_running: dict[int, float] = field(default_factory=dict)


class GangWatch:
    """Pods and TrainingJobs of the namespace, reduced to each job's restart times, plus the
    'never pods of two attempts live at once' check on every pod event."""

    def __init__(self, api: Api, workers: int):
        self.workers = workers
        self.lock = threading.Lock()
        self.times: dict[str, JobTimes] = {}
        self.status: dict[str, dict] = {}
        self.live: dict[str, dict[str, int]] = {}  # job -> live pod -> attempt
        self.overlaps: list[str] = []
        self._stop = threading.Event()
        self.streams = [
            _Stream(api, f"/api/v1/namespaces/{NAMESPACE}/pods", self._pod, self._stop),
            _Stream(api, f"/apis/finetune.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs", self._job, self._stop),
        ]

    def start(self) -> GangWatch:
        for s in self.streams:
            s.start()
        for s in self.streams:
            if not s.synced.wait(30):
                raise TimeoutError(f"watch {s.path} did not sync")
        return self

    def stop(self) -> None:
        self._stop.set()

    def _rec(self, job: str) -> JobTimes:
        return self.times.setdefault(job, JobTimes())

    def _pod(self, type_: str, pod: dict, now: float) -> None:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        labels = meta.get("labels") or {}
        job, name = labels.get("finetune.dev/job-name"), meta.get("name")
        if not job or not name:
            return
        attempt, rank = int(labels.get("finetune.dev/attempt", 0)), int(labels.get("finetune.dev/rank", 0))
        live = type_ != "DELETED" and status.get("phase") not in POD_DONE
        with self.lock:
            rec = self._rec(job)
            if attempt == 1 and rank == 1 and rec.failed is None and (
                    meta.get("deletionTimestamp") or not live):
                rec.failed = now
            if attempt == 2 and type_ != "DELETED":
                rec.rank_created.setdefault(rank, now)
                if status.get("phase") == "Running" and not meta.get("deletionTimestamp"):
                    rec.rank_running.setdefault(rank, now)
                if len(rec.rank_created) == self.workers and rec.created is None:
                    rec.created = now
                if len(rec.rank_running) == self.workers and rec.pods_running is None:
                    rec.pods_running = now
            pods = self.live.setdefault(job, {})
            if live:
                pods[name] = attempt
            else:
                pods.pop(name, None)
            if len(set(pods.values())) > 1:
                self.overlaps.append(f"{job}: {sorted(pods)}")

    def _job(self, type_: str, obj: dict, now: float) -> None:
        name = (obj.get("metadata") or {}).get("name")
        status = obj.get("status") or {}
        if not name or type_ == "DELETED":
            return
        ranks = status.get("ranks") or {}
        with self.lock:
            self.status[name] = status
            rec = self._rec(name)
            if status.get("phase") == "Resuming" and status.get("attempt") == 1 and rec.resuming is None:
                rec.resuming = now
            if status.get("phase") == "Running" and status.get("attempt") == 2 and \
                    ranks.get("ready") == self.workers and rec.ready is None:
                rec.ready = now

    def count(self, predicate) -> int:
        with self.lock:
            return sum(1 for s in self.status.values() if predicate(s))

    def snapshot(self) -> tuple[dict[str, JobTimes], dict[str, dict]]:
        with self.lock:
            return dict(self.times), dict(self.status)


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_s": math.nan, "p95_s": math.nan, "max_s": math.nan}
    return {"n": len(values), "p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95),
            "max_s": max(values)}


def step_stats(times: dict[str, JobTimes]) -> dict[str, dict[str, float]]:
    out = {}
    for title, a, b in STEPS:
        values = [getattr(t, b) - getattr(t, a) for t in times.values()
                  if getattr(t, a) is not None and getattr(t, b) is not None]
        out[title] = stats(values)
    return out


def counter_problems(statuses: dict[str, dict], fault: str) -> list[str]:
    """Each job's restart counted once, as the kind of end that was injected."""
    want = {"resumes": 1, "failures": 0} if fault == "evict" else {"resumes": 0, "failures": 1}
    out = []
    for name, st in sorted(statuses.items()):
        got = {k: st.get(k) or 0 for k in want}
        if got != want or st.get("attempt") != 2:
            out.append(f"{name}: attempt {st.get('attempt')}, {got} (expected attempt 2, {want})")
    return out


def submit(api: Api, args: argparse.Namespace, names: list[str]) -> None:
    path = f"/apis/finetune.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs"
    for name in names:
        api.create(path, job_manifest(name, workers=args.workers, template=sim(outcome="run"),
                                      runPolicy={"backoffSeconds": args.backoff_seconds}))


def fail_rank(api: Api, fault: str, job: str) -> None:
    pod = f"{job}-1-1"
    if fault == "evict":
        api.create(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}/eviction",
                   {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": pod, "namespace": NAMESPACE}})
    else:
        api.merge_patch(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}", EXIT_PATCH)


def run(args: argparse.Namespace) -> dict:
    n, workers = args.jobs, args.workers
    nodes = math.ceil(n * workers / 8) + args.extra_nodes
    cluster = LocalCluster(config=ClusterConfig(gpu_nodes=nodes, gpus_per_node=8, no_limits=True))
    names = [f"gang-{i:04d}" for i in range(n)]
    result: dict = {"jobs": n, "workers": workers, "nodes": nodes, "fault": args.fault,
                    "rate_per_s": args.rate, "backoff_seconds": args.backoff_seconds,
                    "operator_args": OPERATOR_ARGS}
    op = watch = None
    try:
        api = controlplane.start(cluster)
        log(f"control plane with {nodes} kwok nodes ready in {cluster.startup_seconds:.1f}s")
        controlplane.create_namespace(api, NAMESPACE)
        op = OperatorProcess(cluster.kubeconfig, cluster.log_dir, args=OPERATOR_ARGS, python=args.operator_python)
        op.start()
        watch = GangWatch(api, workers).start()

        t = time.monotonic()
        submit(api, args, names)
        wait_until(lambda: watch.count(lambda s: s.get("phase") == "Running" and s.get("attempt") == 1 and
                                       (s.get("ranks") or {}).get("ready") == workers) >= n,
                   args.timeout, f"{n} gangs Running", interval=0.2)
        result["all_running_s"] = time.monotonic() - t
        log(f"{n} gangs of {workers} Running after {result['all_running_s']:.1f}s; failing rank 1 of each "
            f"({args.fault}) at {args.rate:g}/s")

        t_fault = time.monotonic()
        with ThreadPoolExecutor(4) as pool:  # calls overlap: one slow API call does not skew the pace
            futures = []
            for i, name in enumerate(names):
                delay = t_fault + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the injections, not waiting for a condition
                futures.append(pool.submit(fail_rank, api, args.fault, name))
            for f in futures:
                f.result()
        result["injection_s"] = time.monotonic() - t_fault
        wait_until(lambda: watch.count(lambda s: s.get("phase") == "Running" and s.get("attempt") == 2 and
                                       (s.get("ranks") or {}).get("ready") == workers) >= n,
                   args.timeout, f"{n} replacement gangs Running", interval=0.2)
        result["all_replaced_s"] = time.monotonic() - t_fault
        times, statuses = watch.snapshot()
        result["steps"] = step_stats(times)
        result["problems"] = counter_problems(statuses, args.fault) + [
            f"pods of two attempts live at once: {o}" for o in watch.overlaps[:20]]
        result["per_job"] = {k: asdict(v) for k, v in sorted(times.items())}
        return result
    finally:
        if watch is not None:
            watch.stop()
        if op is not None:
            op.stop()
        cluster.cleanup()


def table(result: dict) -> str:
    lines = [f"gang restart: {result['jobs']} TrainingJobs x {result['workers']} pods on {result['nodes']} kwok "
             f"nodes; rank 1 of each failed by {result['fault']} at {result['rate_per_s']:g}/s; "
             f"backoffSeconds {result['backoff_seconds']}", "",
             f"{'step (independent watch)':34s} {'n':>4s} {'p50 s':>7s} {'p95 s':>7s} {'max s':>7s}"]
    for title, s in result["steps"].items():
        lines.append(f"{title:34s} {s['n']:4d} {s['p50_s']:7.2f} {s['p95_s']:7.2f} {s['max_s']:7.2f}")
    lines.append("")
    lines.append(f"all {result['jobs']} gangs Running at first: {result['all_running_s']:.1f}s after submit; "
                 f"failures injected over {result['injection_s']:.1f}s; all replaced "
                 f"{result['all_replaced_s']:.1f}s after the first")
    lines.append(f"problems (counters, two attempts live at once): {len(result['problems'])}")
    lines.extend(f"  - {p}" for p in result["problems"][:20])
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gang_restart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100, help="TrainingJobs (default 100)")
    p.add_argument("--workers", type=int, default=2, help="spec.workers of each (default 2)")
    p.add_argument("--fault", choices=("evict", "exit"), default="evict",
                   help="how rank 1 fails: the Eviction API (a resume) or exit code 1 (a failure)")
    p.add_argument("--rate", type=float, default=5.0,
                   help="failures injected per second (default 5; at 20/s two shared cores saturate and "
                        "the figure becomes queueing)")
    p.add_argument("--backoff-seconds", type=int, default=0, help="runPolicy.backoffSeconds (default 0)")
    p.add_argument("--extra-nodes", type=int, default=2, help="kwok nodes beyond ceil(N*workers/8)")
    p.add_argument("--timeout", type=float, default=600, help="limit of each wait (s)")
    p.add_argument("--operator-python", default=sys.executable, help="the interpreter that runs the operator")
    p.add_argument("--json-out", help="JSON path (default .state/gang-restart-<timestamp>.json)")
    return p.parse_args(argv)




def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.json_out) if args.json_out else REPO / ".state" / f"gang-restart-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=1))
    print(f"\nwritten: {out}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
