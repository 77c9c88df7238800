"""`python -m finetune_testbed.chaos --jobs N` (`make chaos JOBS=N`): N TrainingJobs on kwok
GPU nodes under random faults, then invariants.

1. A private control plane (its own etcd, API server, scheduler, controller-manager, kwok)
   with enough 8-GPU nodes for every job at once plus 20 %, the CRD, and one operator
   (fast test timings, --namespace chaos).
2. N jobs of 1-2 GPUs with simulated behaviours (sim.finetune.dev/* annotations):
   succeed    runs for a random time, then exits 0;
   fail       exits 1 after a few seconds on every attempt (backoffLimit 0-2);
   run        runs until something stops it;
   evict      is evicted by its kubelet after a few seconds on every attempt (maxResumes 1-2).
   Half of the jobs take 1-6 s to exit after SIGTERM (a trainer saving its checkpoint;
   kwok runs a copy of stages.yaml whose pod-terminate stage reads
   sim.finetune.dev/terminate-after), so a replaced attempt's pod lingers.
3. Random faults for --fault-seconds, each recorded: operator SIGKILL (+ restart), operator
   SIGSTOP (+ SIGCONT), pod deletion, eviction (Eviction API), node drain (+ uncordon), node
   deletion (+ re-creation), node NotReady (+ Ready), an exit-code failure (a running pod
   annotated outcome=fail: kwok re-evaluates its stages) and, once, an API server + etcd
   crash and restart.
4. Faults stop, everything is recovered, and the run waits (with a deadline) until the
   statuses stop changing and match the pods; then checks the invariants:
   - no job lost: every created job exists and has a status;
   - never two live pods of one job at once (checked on every pod watch event);
   - status matches the pods (Running has its live pod, finished jobs have none, ...);
   - every job at rest: finished, Running with its pod, or waiting with a reason;
   - each ended attempt counted exactly once: failures + resumes == attempts concluded,
     restarts == failures + resumes;
   - outcomes match what was injected: jobs that only saw disruptions (evictions, deletions,
     drains, node loss, operator faults) have no failures and did not fail (except `evict`
     jobs, which must fail with MaxResumesExceeded), `fail` jobs fail with
     BackoffLimitExceeded after backoffLimit+1 failures, failures never exceed the
     attempts that really exited non-zero;
   - Events agree with the counters: never more Warning Events than counted
     interruptions/failures (+1 for an uncounted failure); missing ones are reported;
   - the operator never died except when killed, and logged no traceback from its own code.
5. Prints the faults by kind, jobs by final phase, time to truth after the last fault, and
   the violations; exits 1 when there is any violation.
Options: --fault-seconds, --fault-rate, --settle-seconds, --seed (replays the job mix and
the fault choices; timing still varies), --weights kind=w,... (focus on some faults),
--json report.json, --artifacts DIR (keep the logs)."""
from __future__ import annotations

import argparse
import calendar
import json
import math
import random
import re
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import cluster as cluster_mod
from .cluster import ClusterConfig, LocalCluster
from .jobs import job_manifest, sim
from .kuberaw import MERGE, ApiError, Kube
from .operator_proc import FAST_ARGS, OperatorProcess
from .procs import wait_for
from .reliability import apply_crd, create_namespace

NAMESPACE = "chaos"
GROUP_PATH = "/apis/finetune.dev/v1alpha1"
POD_DONE = ("Succeeded", "Failed")
TERMINAL = ("Succeeded", "Failed")
COUNTED_FAILURE_REASONS = ("BackoffLimitExceeded", "MaxResumesExceeded")
KINDS = (("succeed", 0.45), ("fail", 0.15), ("run", 0.25), ("evict", 0.15))
FAULT_WEIGHTS = {
    "pod_delete": 3, "pod_evict": 3, "exit_code": 3, "node_drain": 1, "node_delete": 1,
    "node_not_ready": 1, "operator_kill": 1, "operator_pause": 1,
}
NOT_READY_LABEL = "node-not-ready.stage.kwok.x-k8s.io"


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- slow terminations ---------------------------------------------------------------------
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


# --- the workload -----------------------------------------------------------------------------
@dataclass
class JobPlan:
    name: str
    kind: str
    gpus: int
    run_for: float | None = None
    terminate_after: float | None = None
    backoff_limit: int = 3
    max_resumes: int = 1000

    def manifest(self) -> dict:
        annotations = {"outcome": {"succeed": "succeed", "fail": "fail", "run": "run",
                                   "evict": "evict"}[self.kind]}
        if self.run_for is not None:
            annotations["run_for"] = f"{int(self.run_for * 1000)}ms"
        if self.terminate_after is not None:
            annotations["terminate_after"] = f"{int(self.terminate_after * 1000)}ms"
        return job_manifest(self.name, resources={"gpus": self.gpus},
                            runPolicy={"backoffLimit": self.backoff_limit,
                                       "maxResumes": self.max_resumes},
                            template=sim(**annotations))


def plan_jobs(n: int, rng: random.Random, fault_seconds: float) -> list[JobPlan]:
    kinds, weights = zip(*KINDS)
    longest = max(4.0, min(30.0, 0.5 * fault_seconds))
    plans = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        plan = JobPlan(f"job-{i:04d}-{kind}", kind, rng.choice((1, 1, 2)))
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


# --- watching the world -------------------------------------------------------------------------
class Tracker(threading.Thread):
    """List+watch of one resource in the namespace, kept as a dict by name; reconnects (and
    re-lists) when the stream ends or the API server goes away."""

    def __init__(self, kubeconfig: Path, path: str, query: dict | None = None):
        super().__init__(daemon=True)
        self.kube = Kube(kubeconfig)
        self.path, self.query = path, dict(query or {})
        self.items: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.reconnects = 0

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        pass

    def on_relist(self) -> None:
        pass

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.items)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.kube.get(self.path, query={**self.query, "limit": None})
                rv = listing["metadata"]["resourceVersion"]
                with self.lock:
                    old = self.items
                    self.items = {o["metadata"]["name"]: o for o in listing.get("items", [])}
                    for name in set(old) | set(self.items):
                        if old.get(name) is not self.items.get(name):
                            self.on_change(name, old.get(name), self.items.get(name))
                    self.on_relist()
                self.synced.set()
                while not self.stopping.is_set():
                    for ev in self.kube.watch(self.path, {**self.query, "resourceVersion": rv,
                                                          "allowWatchBookmarks": "true",
                                                          "timeoutSeconds": 30}, timeout=45):
                        kind, obj = ev.get("type"), ev.get("object") or {}
                        if kind == "ERROR":
                            raise ApiError(int(obj.get("code") or 0), obj.get("message", "watch error"))
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if kind == "BOOKMARK":
                            continue
                        name = obj["metadata"]["name"]
                        with self.lock:
                            old = self.items.get(name)
                            if kind == "DELETED":
                                self.items.pop(name, None)
                                self.on_change(name, old, None)
                            else:
                                self.items[name] = obj
                                self.on_change(name, old, obj)
                        if self.stopping.is_set():
                            return
            except Exception:  # noqa: BLE001 - API server restarts end streams; re-list
                self.reconnects += 1
                self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()


def pod_live(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") not in POD_DONE


def job_of(pod: dict) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get("finetune.dev/job-name")


def attempt_of(pod: dict) -> int:
    try:
        return int(pod["metadata"]["labels"]["finetune.dev/attempt"])
    except (KeyError, TypeError, ValueError):
        return 0


def exit_code_of(pod: dict) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term.get("exitCode")
    return None


def disrupted_pod(pod: dict) -> bool:
    status = pod.get("status") or {}
    return status.get("reason") == "Evicted" or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in status.get("conditions") or [])


class PodTracker(Tracker):
    """Pods of the operator; checks 'never two live pods for one job' on every change and
    remembers how each pod ended (a pod that really exited non-zero)."""

    def __init__(self, kubeconfig, namespace):
        super().__init__(kubeconfig, f"/api/v1/namespaces/{namespace}/pods",
                         {"labelSelector": "app.kubernetes.io/managed-by=finetune-operator"})
        self.overlaps: list[dict] = []
        self._overlap_keys: set = set()
        self.seen: set[str] = set()
        self.nonzero_exits: dict[str, set[int]] = defaultdict(set)  # job -> attempts
        self.t0 = time.monotonic()

    def _check_job(self, job: str | None) -> None:
        if not job:
            return
        live = sorted(n for n, p in self.items.items() if job_of(p) == job and pod_live(p))
        if len(live) > 1 and tuple(live) not in self._overlap_keys:
            self._overlap_keys.add(tuple(live))
            self.overlaps.append({"job": job, "pods": live,
                                  "t": round(time.monotonic() - self.t0, 1)})

    def on_change(self, name, old, new):
        pod = new or old
        self.seen.add(name)
        if new is not None and not pod_live(new):
            code = exit_code_of(new)
            if code not in (None, 0, 143) and not disrupted_pod(new) \
                    and not new["metadata"].get("deletionTimestamp"):
                self.nonzero_exits[job_of(new)].add(attempt_of(new))
        self._check_job(job_of(pod))

    def on_relist(self):
        for job in {job_of(p) for p in self.items.values()}:
            self._check_job(job)


STATUS_KEYS = ("phase", "reason", "attempt", "failures", "resumes")


class JobTracker(Tracker):
    """TrainingJobs; remembers when any job's status (phase, reason, counters) last changed."""

    def __init__(self, kubeconfig, namespace):
        super().__init__(kubeconfig, f"{GROUP_PATH}/namespaces/{namespace}/trainingjobs")
        self.last_change = time.monotonic()
        self.changes = 0

    def on_change(self, name, old, new):
        key = lambda o: tuple(((o or {}).get("status") or {}).get(k) for k in STATUS_KEYS)  # noqa: E731
        if key(old) != key(new):
            self.last_change = time.monotonic()
            self.changes += 1


# --- faults --------------------------------------------------------------------------------------
@dataclass
class Fault:
    t: float
    kind: str
    target: str
    pods: list[str] = field(default_factory=list)
    note: str = ""


class Chaos:
    def __init__(self, cluster: LocalCluster, namespace: str, plans: list[JobPlan],
                 rng: random.Random, log_dir: Path):
        self.cluster, self.ns, self.rng = cluster, namespace, rng
        self.plans = {p.name: p for p in plans}
        self.kube = Kube(cluster.kubeconfig)
        self.pods = PodTracker(cluster.kubeconfig, namespace)
        self.jobs = JobTracker(cluster.kubeconfig, namespace)
        self.operator = OperatorProcess(cluster.kubeconfig, log_dir, name="chaos-operator",
                                        args=FAST_ARGS + ["--namespace", namespace])
        self.t0 = time.monotonic()
        self.faults: list[Fault] = []
        self.recoveries: list[Fault] = []
        self.exit_faulted: dict[str, set[int]] = defaultdict(set)
        self.disrupted: dict[str, set[int]] = defaultdict(set)
        self.timers: list[threading.Timer] = []
        self.drains: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.busy_nodes: set[str] = set()      # under a node fault right now
        self.deleted_nodes: set[str] = set()
        self.cordoned: set[str] = set()
        self.not_ready: set[str] = set()
        self.paused = False
        self.killed_by_us = 0
        self.unexpected_exits: list[str] = []
        self.last_world_change = time.monotonic()
        self.last_fault = time.monotonic()
        self.control_plane_restarted = False

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # ---- helpers ----
    def record(self, kind: str, target: str, pods: list[dict] | None = None, note: str = "",
               recovery: bool = False) -> None:
        names = [p["metadata"]["name"] for p in pods or []]
        entry = Fault(self.now(), kind, target, names, note)
        with self.lock:
            (self.recoveries if recovery else self.faults).append(entry)
            self.last_world_change = time.monotonic()
            if not recovery:
                self.last_fault = self.last_world_change
            for p in pods or []:
                job = job_of(p)
                if job:
                    (self.exit_faulted if kind == "exit_code" else self.disrupted)[job].add(attempt_of(p))

    def later(self, seconds: float, fn) -> None:
        t = threading.Timer(seconds, self._guard, args=(fn,))
        t.daemon = True
        self.timers.append(t)
        t.start()

    def _guard(self, fn, tries: int = 10) -> None:
        for i in range(tries):
            try:
                fn()
                return
            except Exception as exc:  # noqa: BLE001 - e.g. the API server is down right now
                if i == tries - 1:
                    log(f"step failed {tries} times, left to recover_all: {exc}")
                time.sleep(3)

    def running_pods(self, node: str | None = None) -> list[dict]:
        return [p for p in self.pods.snapshot().values()
                if (p.get("status") or {}).get("phase") == "Running"
                and not p["metadata"].get("deletionTimestamp")
                and (node is None or (p.get("spec") or {}).get("nodeName") == node)]

    def pods_on(self, node: str) -> list[dict]:
        return [p for p in self.pods.snapshot().values()
                if (p.get("spec") or {}).get("nodeName") == node and pod_live(p)]

    def free_node(self) -> str | None:
        nodes = [f"{self.cluster.config.node_prefix}-{i}" for i in range(self.cluster.config.gpu_nodes)]
        limit = max(1, len(nodes) // 8)
        with self.lock:
            if len(self.busy_nodes) >= limit:
                return None
            candidates = [n for n in nodes if n not in self.busy_nodes]
            # prefer nodes with running pods: a fault on an empty node tests little
            loaded = [n for n in candidates if self.running_pods(n)]
            node = self.rng.choice(loaded or candidates) if candidates else None
            if node:
                self.busy_nodes.add(node)
            return node

    def release_node(self, node: str) -> None:
        with self.lock:
            self.busy_nodes.discard(node)

    def check_operator(self) -> None:
        """The operator only dies when we kill it (and then it is restarted at once)."""
        if not self.operator.running():
            rc = self.operator.proc.popen.returncode if self.operator.proc.popen else None
            self.unexpected_exits.append(f"t={self.now()} operator exited with {rc} on its own")
            log(f"operator exited on its own ({rc}); restarting it")
            self.operator.start(wait_ready=False)

    # ---- the faults ----
    def f_pod_delete(self) -> bool:
        pods = self.running_pods()
        if not pods:
            return False
        pod = self.rng.choice(pods)
        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{pod['metadata']['name']}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            return False
        self.record("pod_delete", pod["metadata"]["name"], [pod])
        return True

    def f_pod_evict(self) -> bool:
        pods = self.running_pods()
        if not pods:
            return False
        pod = self.rng.choice(pods)
        name = pod["metadata"]["name"]
        try:
            self.kube.request("POST", f"/api/v1/namespaces/{self.ns}/pods/{name}/eviction",
                              body={"apiVersion": "policy/v1", "kind": "Eviction",
                                    "metadata": {"name": name, "namespace": self.ns}})
        except ApiError as exc:
            if exc.status in (404, 429):
                return False
            raise
        self.record("pod_evict", name, [pod])
        return True

    def f_exit_code(self) -> bool:
        pods = self.running_pods()
        if not pods:
            return False
        pod = self.rng.choice(pods)
        name, code = pod["metadata"]["name"], self.rng.choice((1, 1, 2, 3))
        try:
            self.kube.request("PATCH", f"/api/v1/namespaces/{self.ns}/pods/{name}",
                              body={"metadata": {"annotations": {
                                  "sim.finetune.dev/outcome": "fail",
                                  "sim.finetune.dev/run-for": "300ms",
                                  "sim.finetune.dev/exit-code": str(code)}}},
                              content_type=MERGE)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        self.record("exit_code", name, [pod], note=f"exit code {code}")
        return True

    def f_node_drain(self) -> bool:
        node = self.free_node()
        if node is None:
            return False
        pods = self.pods_on(node)
        self.record("node_drain", node, pods)
        self.cordoned.add(node)

        def drain():
            self.cluster.kubectl("drain", node, "--force", "--ignore-daemonsets",
                                 "--delete-emptydir-data", "--timeout=60s", "--grace-period=5",
                                 check=False, timeout=90)
            self.later(self.rng.uniform(3, 10), lambda: self._uncordon(node))
        t = threading.Thread(target=self._guard, args=(drain,), daemon=True)
        self.drains.append(t)
        t.start()
        return True

    def _uncordon(self, node: str) -> None:
        self.cluster.kubectl("uncordon", node)
        self.cordoned.discard(node)
        self.record("node_uncordon", node, recovery=True)
        self.release_node(node)

    def f_node_delete(self) -> bool:
        node = self.free_node()
        if node is None:
            return False
        pods = self.pods_on(node)
        try:
            self.kube.request("DELETE", f"/api/v1/nodes/{node}")
        except ApiError:
            self.release_node(node)
            raise
        self.deleted_nodes.add(node)
        self.record("node_delete", node, pods)
        self.later(self.rng.uniform(8, 15), lambda: self._recreate(node))
        return True

    def _recreate(self, node: str) -> None:
        try:
            self.kube.request("POST", "/api/v1/nodes", body=self.cluster.gpu_node(node))
        except ApiError as exc:
            if exc.status != 409:
                raise
        self.deleted_nodes.discard(node)
        self.record("node_recreate", node, recovery=True)
        self.release_node(node)

    def f_node_not_ready(self) -> bool:
        node = self.free_node()
        if node is None:
            return False
        pods = self.pods_on(node)
        self.kube.request("PATCH", f"/api/v1/nodes/{node}",
                          body={"metadata": {"labels": {NOT_READY_LABEL: "true"}}}, content_type=MERGE)
        self.not_ready.add(node)
        self.record("node_not_ready", node, pods)
        self.later(self.rng.uniform(12, 20), lambda: self._ready(node))
        return True

    def _ready(self, node: str) -> None:
        self.kube.request("PATCH", f"/api/v1/nodes/{node}",
                          body={"metadata": {"labels": {NOT_READY_LABEL: None}}}, content_type=MERGE)
        self.not_ready.discard(node)
        self.record("node_ready", node, recovery=True)
        self.release_node(node)

    def f_operator_kill(self) -> bool:
        self.operator.kill()
        self.killed_by_us += 1
        self.paused = False
        self.record("operator_kill", f"pid {self.operator.pid}")
        time.sleep(self.rng.uniform(0.0, 3.0))
        self.operator.start(wait_ready=False)
        self.record("operator_restart", f"pid {self.operator.pid}", recovery=True)
        return True

    def f_operator_pause(self) -> bool:
        if self.paused:
            return False
        self.operator.pause()
        self.paused = True
        seconds = self.rng.uniform(2.0, 8.0)
        self.record("operator_pause", f"pid {self.operator.pid}", note=f"{seconds:.1f}s")
        pid = self.operator.pid

        def cont():
            if self.operator.pid == pid:
                self.operator.resume()
                self.paused = False
                self.record("operator_resume", f"pid {pid}", recovery=True)
        self.later(seconds, cont)
        return True

    def control_plane_restart(self, down_seconds: float) -> None:
        log(f"API server + etcd crash, down {down_seconds:.0f}s")
        self.record("apiserver_etcd_restart", "kube-apiserver+etcd", note=f"down {down_seconds:.1f}s")
        self.cluster.procs["kube-apiserver"].kill()
        self.cluster.procs["etcd"].kill()
        time.sleep(down_seconds)
        self.cluster.start_etcd()
        self.cluster.start_apiserver()
        self.control_plane_restarted = True
        self.record("apiserver_etcd_start", "kube-apiserver+etcd", recovery=True)

    # ---- phases ----
    def create_jobs(self) -> None:
        manifests = [p.manifest() for p in self.plans.values()]
        for i in range(0, len(manifests), 50):
            self.cluster.kubectl("create", "-n", self.ns, "-f", "-", timeout=120,
                                 input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                   "items": manifests[i:i + 50]}))

    def inject(self, fault_seconds: float, rate: float, weights: dict | None = None) -> None:
        kinds, weights = zip(*(weights or FAULT_WEIGHTS).items())
        end = time.monotonic() + fault_seconds
        restart_at = time.monotonic() + fault_seconds * self.rng.uniform(0.4, 0.6)
        while time.monotonic() < end:
            self.check_operator()
            if not self.control_plane_restarted and time.monotonic() >= restart_at:
                self.control_plane_restart(self.rng.uniform(3.0, 6.0))
                continue
            kind = self.rng.choices(kinds, weights)[0]
            try:
                getattr(self, f"f_{kind}")()
            except Exception as exc:  # noqa: BLE001 - a fault that could not be injected
                log(f"fault {kind} not injected: {exc}")
            time.sleep(self.rng.expovariate(rate))

    def inconsistent_jobs(self) -> dict[str, list[str]]:
        """Jobs whose status does not match their pods, from the watch caches."""
        jobs, pods = self.jobs.snapshot(), self.pods.snapshot()
        by_job = defaultdict(list)
        for p in pods.values():
            by_job[job_of(p)].append(p)
        problems = {n: consistency_problems(j, by_job[n]) for n, j in jobs.items()}
        return {n: v for n, v in problems.items() if v}

    def watch_truth(self, stop: threading.Event) -> None:
        """From the end of the faults: remembers the last moment any status disagreed with
        the pods (time to truth = that moment, or the last status change, minus the fault)."""
        self.last_inconsistent = time.monotonic()
        while not stop.is_set():
            try:
                if self.inconsistent_jobs():
                    self.last_inconsistent = time.monotonic()
            except Exception:  # noqa: BLE001 - a snapshot taken mid-update
                self.last_inconsistent = time.monotonic()
            stop.wait(0.5)

    def recover_all(self) -> None:
        for t in self.drains:  # a drain in flight evicts until it is done
            t.join(100)
        for t in self.timers:
            t.cancel()
        for t in self.timers:
            t.join(1)
        if self.paused:
            self.operator.resume()
            self.paused = False
            self.record("operator_resume", "final", recovery=True)
        if not self.operator.running():
            self.operator.start(wait_ready=False)
            self.record("operator_restart", "final", recovery=True)
        deadline = time.monotonic() + 60
        for node in sorted(set(self.deleted_nodes)):
            self._guard(lambda: self._recreate(node))
        for node in sorted(set(self.not_ready)):
            self._guard(lambda: self._ready(node))
        for node in sorted(set(self.cordoned)):
            self._guard(lambda: self._uncordon(node))
        while time.monotonic() < deadline:
            nodes = self.kube.get("/api/v1/nodes")["items"]
            bad = [n["metadata"]["name"] for n in nodes if n["spec"].get("unschedulable")]
            for node in bad:
                self._guard(lambda: self._uncordon(node))
            if not bad and len(nodes) >= self.cluster.config.gpu_nodes:
                break
            time.sleep(1)


# --- invariants ------------------------------------------------------------------------------------
def consistency_problems(job: dict, pods: list[dict]) -> list[str]:
    """Does the job's status tell the truth about its pods (and count correctly)?"""
    status = job.get("status") or {}
    phase, attempt = status.get("phase"), status.get("attempt") or 0
    name = job["metadata"]["name"]
    if not phase:
        return ["no status.phase"]
    out = []
    live = [p for p in pods if pod_live(p)]
    current = next((p for p in pods if p["metadata"]["name"] == f"{name}-{attempt}"), None)
    cur_phase = (current or {}).get("status", {}).get("phase")
    if phase in TERMINAL and live:
        out.append(f"{phase} but pods still live: {[p['metadata']['name'] for p in live]}")
    if phase == "Running":
        if current is None or cur_phase != "Running" or current["metadata"].get("deletionTimestamp"):
            out.append(f"Running but pod {name}-{attempt} is "
                       f"{'missing' if current is None else cur_phase + (' (deleting)' if current['metadata'].get('deletionTimestamp') else '')}")
        elif len(live) > 1:
            out.append(f"Running with extra live pods {[p['metadata']['name'] for p in live]}")
    if phase == "Starting" and (current is None or cur_phase != "Pending"):
        out.append(f"Starting but pod {name}-{attempt} is {cur_phase or 'missing'}")
    if phase == "Queued" and current is not None and cur_phase != "Pending":
        out.append(f"Queued but pod {name}-{attempt} is {cur_phase}")
    if phase == "Resuming" and current is not None and cur_phase == "Running" \
            and not current["metadata"].get("deletionTimestamp"):
        out.append(f"Resuming but pod {name}-{attempt} is Running and not being stopped")
    future = [p["metadata"]["name"] for p in pods if attempt_of(p) > attempt]
    if future:
        out.append(f"pods of later attempts than status.attempt={attempt}: {future}")
    failures, resumes = status.get("failures") or 0, status.get("resumes") or 0
    concluded = phase == "Resuming" or (phase == "Failed" and status.get("reason") in COUNTED_FAILURE_REASONS)
    if failures + resumes != attempt - 1 + int(concluded):
        out.append(f"counting: failures {failures} + resumes {resumes} != attempts concluded "
                   f"{attempt - 1 + int(concluded)} (attempt {attempt}, {phase}/{status.get('reason')})")
    if (status.get("restarts") or 0) != failures + resumes:
        out.append(f"restarts {status.get('restarts')} != failures + resumes {failures + resumes}")
    return out


def pod_started(pod: dict | None) -> float | None:
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if started:
            return calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
    return None


def will_finish_soon(plan: JobPlan, job: dict, pods: list[dict], slack: float = 5.0) -> bool:
    """A job whose current pod is going to end by itself (its simulated run-for is not over)."""
    status = job.get("status") or {}
    if plan.kind not in ("succeed", "fail", "evict") or status.get("phase") != "Running":
        return False
    current = next((p for p in pods if p["metadata"]["name"] == f"{plan.name}-{status.get('attempt')}"), None)
    started = pod_started(current)
    return started is not None and time.time() - started < (plan.run_for or 0) + slack


LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def operator_tracebacks(log_text: str) -> list[str]:
    """Each traceback in the operator's log with the log record that introduced it."""
    out, current = [], None
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            current = [lines[i - 1]] if i else []
            current.append(line)
        elif current is not None:
            if LOG_RECORD.match(line) or line.startswith("--- start"):
                out.append("\n".join(current))
                current = None
            else:
                current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def describe(name: str, job: dict, pods: list[dict], chaos: "Chaos") -> str:
    st = job.get("status") or {}
    li = st.get("lastInterruption") or {}
    lines = [f"  {name}: {st.get('phase')}/{st.get('reason')} attempt {st.get('attempt')} "
             f"failures {st.get('failures')} resumes {st.get('resumes')}: {st.get('message')}",
             f"    lastInterruption: {li.get('reason')} pod {li.get('pod')} at {li.get('time')}"]
    for p in sorted(pods, key=attempt_of):
        meta, status = p["metadata"], p.get("status") or {}
        lines.append(f"    pod {meta['name']}: {status.get('phase')} on {p['spec'].get('nodeName')} "
                     f"deleting={bool(meta.get('deletionTimestamp'))} exit={exit_code_of(p)} "
                     f"disrupted={disrupted_pod(p)}")
    touched = [f"t={f.t} {f.kind} {f.target}" for f in chaos.faults + chaos.recoveries
               if any(pn.startswith(name + "-") for pn in f.pods)]
    lines.append(f"    faults: {touched}")
    return "\n".join(lines)


def at_rest(job: dict, pods: list[dict]) -> bool:
    status = job.get("status") or {}
    phase = status.get("phase")
    if phase in TERMINAL or phase == "Running":
        return True
    return phase in ("Queued", "Resuming") and bool(status.get("reason")) and \
        status.get("reason") not in ("CreatingPod",)


def nonzero_attempts(pods: list[dict]) -> set[int]:
    """Attempts whose pod (still there) really exited non-zero: not disrupted, not SIGTERMed."""
    return {attempt_of(p) for p in pods
            if (p.get("status") or {}).get("phase") == "Failed" and not disrupted_pod(p)
            and not p["metadata"].get("deletionTimestamp") and exit_code_of(p) not in (None, 0, 143)}


def outcome_problems(plan: JobPlan, job: dict, exit_faulted: set[int], nonzero: set[int]) -> list[str]:
    """nonzero: attempts whose pod is still there and exited non-zero (the operator had every
    chance to see it; a failed pod deleted before anyone looked cannot be held against it)."""
    status = job.get("status") or {}
    phase, reason = status.get("phase"), status.get("reason")
    failures, resumes, attempt = (status.get(k) or 0 for k in ("failures", "resumes", "attempt"))
    out = []
    real_failures = exit_faulted | (set(range(1, attempt + 1)) if plan.kind == "fail" else set())
    if failures > len(real_failures):
        out.append(f"failures {failures} > attempts that were made to fail {sorted(real_failures)}")
    seen = nonzero & set(range(1, attempt + 1))
    if failures < len(seen) and not (phase == "Failed" and failures > plan.backoff_limit):
        out.append(f"failures {failures} < attempts whose pods exited non-zero {sorted(seen)}")
    if plan.kind in ("succeed", "run", "evict") and not exit_faulted and failures:
        out.append(f"{failures} failures although only disruptions were injected")
    if plan.kind in ("succeed", "run") and phase == "Failed" and not (
            reason == "BackoffLimitExceeded" and failures == plan.backoff_limit + 1 and exit_faulted):
        out.append(f"Failed/{reason} (failures {failures}, resumes {resumes}); injected exit faults "
                   f"on attempts {sorted(exit_faulted)}")
    if plan.kind == "fail":
        if phase != "Failed" or reason != "BackoffLimitExceeded" or failures != plan.backoff_limit + 1:
            out.append(f"expected Failed/BackoffLimitExceeded with {plan.backoff_limit + 1} failures, "
                       f"got {phase}/{reason} with {failures}")
    if plan.kind == "evict":
        ok_evicted = phase == "Failed" and reason == "MaxResumesExceeded" and resumes == plan.max_resumes + 1
        ok_failed = phase == "Failed" and reason == "BackoffLimitExceeded" and exit_faulted
        if not (ok_evicted or ok_failed):
            out.append(f"expected Failed/MaxResumesExceeded with {plan.max_resumes + 1} resumes, "
                       f"got {phase}/{reason} with {resumes} resumes, {failures} failures")
    if plan.kind == "succeed" and phase not in ("Succeeded", "Failed", "Running"):
        out.append(f"expected Succeeded, got {phase}/{reason}")
    if plan.kind == "run" and phase not in ("Running", "Failed"):
        out.append(f"expected Running, got {phase}/{reason}")
    return out


@dataclass
class Report:
    jobs: int
    nodes: int
    seed: int
    fault_seconds: float
    faults: dict
    recoveries: dict
    phases: dict
    phases_by_kind: dict
    time_to_consistent: float | None
    time_to_quiet: float | None
    time_to_truth: float | None
    recovery_seconds: float
    settled: bool
    violations: list[str]
    missing_events: int
    operator_kills: int
    operator_tracebacks: int
    pods_created: int
    overlaps: list
    wall_seconds: float
    fault_log: list = field(default_factory=list)
    details: list = field(default_factory=list)

    def table(self) -> str:
        lines = [f"chaos: {self.jobs} jobs on {self.nodes} nodes x 8 GPUs, faults for "
                 f"{self.fault_seconds:.0f}s, seed {self.seed}, {self.wall_seconds:.0f}s in all", ""]
        lines.append(f"{'faults injected':28s} {'count':>6s}")
        for kind, n in sorted(self.faults.items()):
            lines.append(f"  {kind:26s} {n:6d}")
        lines.append(f"  {'total':26s} {sum(self.faults.values()):6d}")
        lines.append(f"{'recoveries':28s} {sum(self.recoveries.values()):6d}  "
                     + ", ".join(f"{k} {v}" for k, v in sorted(self.recoveries.items())))
        lines.append("")
        kinds = sorted({k for d in self.phases_by_kind.values() for k in d})
        lines.append(f"{'jobs by final phase':28s} {'count':>6s}  " + " ".join(f"{k:>8s}" for k in kinds))
        for phase, n in sorted(self.phases.items()):
            lines.append(f"  {phase:26s} {n:6d}  " + " ".join(
                f"{self.phases_by_kind.get(phase, {}).get(k, 0):8d}" for k in kinds))
        lines.append(f"  {'total':26s} {sum(self.phases.values()):6d}")
        lines.append(f"pods seen: {self.pods_created}; operator SIGKILLs: {self.operator_kills}; "
                     f"Warning Events missing (lost with a killed operator): {self.missing_events}")
        lines.append("")
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}s"  # noqa: E731
        lines.append(f"time to truth after the last fault: {fmt(self.time_to_truth)} "
                     f"(statuses last disagreed with the pods {fmt(self.time_to_consistent)} after it, "
                     f"last status change {fmt(self.time_to_quiet)} after it, natural completions "
                     f"included; recoveries (uncordon, node re-creation, SIGCONT) took "
                     f"{fmt(self.recovery_seconds)}; settled: {self.settled})")
        lines.append(f"invariant violations: {len(self.violations)}")
        for v in self.violations[:50]:
            lines.append(f"  - {v}")
        if len(self.violations) > 50:
            lines.append(f"  ... {len(self.violations) - 50} more")
        if self.details:
            lines.append("")
            lines.append("jobs with unexpected outcomes (status, pods, faults that touched them):")
            lines.extend(self.details[:20])
        return "\n".join(lines)


def run(n_jobs: int = 300, fault_seconds: float = 90.0, seed: int | None = None,
        settle_seconds: float = 240.0, fault_rate: float | None = None,
        log_dir: Path | None = None, weights: dict | None = None,
        artifacts: Path | None = None) -> Report:
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    t_start = time.monotonic()
    plans = plan_jobs(n_jobs, rng, fault_seconds)
    gpus = sum(p.gpus for p in plans)
    nodes = max(3, math.ceil(gpus * 1.2 / 8))
    rate = fault_rate or 1.0  # faults per second
    log(f"seed {seed}: {n_jobs} jobs ({dict(Counter(p.kind for p in plans))}), {gpus} GPUs "
        f"on {nodes} nodes")
    cluster = LocalCluster(config=ClusterConfig(gpu_nodes=nodes, node_prefix="chaos-node"))
    stages, cluster_mod.STAGES = cluster_mod.STAGES, chaos_stages(
        cluster.workdir / "chaos-stages.yaml")  # read by kwok's command line in start()
    try:
        cluster.start()
    finally:
        cluster_mod.STAGES = stages
    log(f"control plane up in {cluster.startup_seconds:.1f}s at {cluster.workdir}")
    chaos = None
    try:
        apply_crd(cluster)
        create_namespace(cluster, NAMESPACE)
        chaos = Chaos(cluster, NAMESPACE, plans, rng, log_dir or cluster.log_dir)
        chaos.pods.start()
        chaos.jobs.start()
        chaos.operator.start()
        chaos.create_jobs()
        wait_for(lambda: all(((j.get("status") or {}).get("phase"))
                             for j in chaos.jobs.snapshot().values())
                 and len(chaos.jobs.snapshot()) == n_jobs, 180, "every job has a phase",
                 interval=1.0)
        log(f"all {n_jobs} jobs have a phase; injecting faults for {fault_seconds:.0f}s")
        chaos.inject(fault_seconds, rate, weights)
        truth_stop = threading.Event()
        truth = threading.Thread(target=chaos.watch_truth, args=(truth_stop,), daemon=True)
        truth.start()
        log(f"{len(chaos.faults)} faults injected; recovering nodes and the operator")
        chaos.recover_all()
        t_last = chaos.last_world_change
        log("waiting for the statuses to settle")
        settled = False
        deadline = time.monotonic() + settle_seconds
        problems: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            chaos.check_operator()
            jobs, pods = chaos.jobs.snapshot(), chaos.pods.snapshot()
            by_job = defaultdict(list)
            for p in pods.values():
                by_job[job_of(p)].append(p)
            problems = chaos.inconsistent_jobs()
            now = time.monotonic()
            resting = all(at_rest(j, by_job[n]) and not (
                n in chaos.plans and will_finish_soon(chaos.plans[n], j, by_job[n]))
                for n, j in jobs.items())
            quiet = now - max(chaos.jobs.last_change, t_last) >= 10.0
            if not problems and resting and quiet and len(jobs) == n_jobs:
                settled = True
                break
            time.sleep(1.0)
        truth_stop.set()
        truth.join(5)
        last_change = chaos.jobs.last_change
        # final snapshot straight from the API server (not the watch caches)
        jobs = {j["metadata"]["name"]: j for j in chaos.kube.get(
            f"{GROUP_PATH}/namespaces/{NAMESPACE}/trainingjobs")["items"]}
        pods_list = chaos.kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods",
                                   query={"labelSelector": "app.kubernetes.io/managed-by=finetune-operator"})["items"]
        events = chaos.kube.get(f"/api/v1/namespaces/{NAMESPACE}/events")["items"]
        violations: list[str] = []
        details: list[str] = []
        by_job = defaultdict(list)
        for p in pods_list:
            by_job[job_of(p)].append(p)
        for name, plan in sorted(chaos.plans.items()):
            job = jobs.get(name)
            if job is None:
                violations.append(f"{name}: lost (the TrainingJob no longer exists)")
                continue
            if not (job.get("status") or {}).get("phase"):
                violations.append(f"{name}: has no status")
                continue
            for p in consistency_problems(job, by_job[name]):
                violations.append(f"{name} [{plan.kind}]: {p}")
            if not at_rest(job, by_job[name]):
                st = job["status"]
                violations.append(f"{name} [{plan.kind}]: not at rest: {st.get('phase')}/{st.get('reason')}: "
                                  f"{st.get('message')}")
            found = outcome_problems(plan, job, chaos.exit_faulted.get(name, set()),
                                     nonzero_attempts(by_job[name]))
            for p in found:
                violations.append(f"{name} [{plan.kind}]: {p}")
            if found:
                details.append(describe(name, job, by_job[name], chaos))
        for o in chaos.pods.overlaps:
            violations.append(f"{o['job']}: two live pods at once at t={o['t']}s: {o['pods']}")
        if not settled:
            violations.append(f"did not settle within {settle_seconds:.0f}s after the last fault; "
                              f"inconsistent: {dict(list(problems.items())[:5])}")
        warnings = Counter()
        for e in events:
            inv = e.get("involvedObject") or {}
            if inv.get("kind") == "TrainingJob" and e.get("type") == "Warning":
                job = jobs.get(inv.get("name"))
                if job is not None and inv.get("uid") == job["metadata"].get("uid"):
                    warnings[inv["name"]] += e.get("count") or 1
        missing = 0
        for name, job in jobs.items():
            st = job.get("status") or {}
            expected = (st.get("failures") or 0) + (st.get("resumes") or 0)
            if st.get("phase") == "Failed" and st.get("reason") not in COUNTED_FAILURE_REASONS:
                expected += 1
            if warnings[name] > expected:
                violations.append(f"{name}: {warnings[name]} Warning Events for {expected} counted "
                                  f"interruptions/failures (duplicated Events)")
            missing += max(0, expected - warnings[name])
        for e in chaos.unexpected_exits:
            violations.append(f"operator: {e}")
        tracebacks = operator_tracebacks(chaos.operator.proc.log_path.read_text(errors="replace"))
        own = [tb for tb in tracebacks if "finetune_operator" in tb]
        for tb in own[:5]:
            violations.append("operator traceback: " + " | ".join(tb.splitlines()[-2:]))
            details.append(tb)
        t_fault = chaos.last_fault
        ttc = max(0.0, chaos.last_inconsistent - t_fault) if settled else None
        ttq = max(0.0, last_change - t_fault)
        report = Report(
            jobs=n_jobs, nodes=nodes, seed=seed, fault_seconds=fault_seconds,
            faults=dict(Counter(f.kind for f in chaos.faults)),
            recoveries=dict(Counter(f.kind for f in chaos.recoveries)),
            phases=dict(Counter((j.get("status") or {}).get("phase") or "None" for j in jobs.values())),
            phases_by_kind={ph: dict(Counter(chaos.plans[n].kind for n, j in jobs.items()
                                             if n in chaos.plans and ((j.get("status") or {}).get("phase") or "None") == ph))
                            for ph in {(j.get("status") or {}).get("phase") or "None" for j in jobs.values()}},
            time_to_consistent=ttc, time_to_quiet=ttq,
            time_to_truth=None if ttc is None else max(ttc, ttq),
            recovery_seconds=max(0.0, t_last - t_fault),
            settled=settled, violations=violations, missing_events=missing,
            operator_kills=chaos.killed_by_us, operator_tracebacks=len(tracebacks),
            pods_created=len(chaos.pods.seen),
            overlaps=chaos.pods.overlaps, wall_seconds=time.monotonic() - t_start,
            fault_log=[asdict(f) for f in chaos.faults + chaos.recoveries], details=details)
        return report
    finally:
        if chaos is not None:
            chaos.pods.stop()
            chaos.jobs.stop()
            chaos.operator.stop()
        cluster.stop()
        if artifacts is not None:  # component and operator logs, for the post-mortem
            shutil.copytree(cluster.log_dir, Path(artifacts) / f"chaos-{seed}", dirs_exist_ok=True)
            log(f"logs copied to {Path(artifacts) / f'chaos-{seed}'}")
        cluster.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune_testbed.chaos", description=__doc__.split("\n\n")[0])
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
    weights = dict(FAULT_WEIGHTS)
    for item in filter(None, args.weights.split(",")):
        kind, _, value = item.partition("=")
        if kind not in FAULT_WEIGHTS:
            p.error(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_WEIGHTS)}")
        weights[kind] = float(value)
    weights = {k: w for k, w in weights.items() if w > 0}
    report = run(args.jobs, args.fault_seconds, args.seed, args.settle_seconds, args.fault_rate,
                 weights=weights, artifacts=args.artifacts)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
