"""The fault injector: random faults against the operator, pods, nodes and the control
plane, each recorded with the pods it touched, and the recovery of everything at the end."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..cluster import LocalCluster
from ..kuberaw import MERGE, ApiError, Kube
from ..operator_proc import FAST_ARGS, OperatorProcess
from .common import attempt_of, job_of, log, pod_live
from .plans import JobPlan
from .trackers import JobTracker, PodTracker

FAULT_WEIGHTS = {
    "pod_delete": 3, "pod_evict": 3, "exit_code": 3, "node_drain": 1, "node_delete": 1,
    "node_not_ready": 1, "operator_kill": 1, "operator_pause": 1,
}
NOT_READY_LABEL = "node-not-ready.stage.kwok.x-k8s.io"

@dataclass
class Fault:
    t: float
    kind: str
    target: str
    pods: list[str] = field(default_factory=list)
    note: str = ""


class Chaos:
    """Owns the trackers and the operator of the run; injects faults (f_* methods, picked by
    weight) and remembers which job attempts each one touched."""

    def __init__(self, cluster: LocalCluster, namespace: str, plans: list[JobPlan],
                 rng: random.Random, log_dir: Path):
        self.cluster, self.ns, self.rng = cluster, namespace, rng
        self.plans = {p.name: p for p in plans}
        self.kube = Kube(cluster.kubeconfig)
        self.pods = PodTracker(cluster.kubeconfig, namespace)
        self.jobs = JobTracker(cluster.kubeconfig, namespace, t0=self.pods.t0)  # one clock for both
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
            except Exception as exc:  # e.g. the API server is down right now
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
        table = weights or FAULT_WEIGHTS
        kinds, kind_weights = list(table), list(table.values())
        end = time.monotonic() + fault_seconds
        restart_at = time.monotonic() + fault_seconds * self.rng.uniform(0.4, 0.6)
        while time.monotonic() < end:
            self.check_operator()
            if not self.control_plane_restarted and time.monotonic() >= restart_at:
                self.control_plane_restart(self.rng.uniform(3.0, 6.0))
                continue
            kind = self.rng.choices(kinds, kind_weights)[0]
            try:
                getattr(self, f"f_{kind}")()
            except Exception as exc:  # a fault that could not be injected
                log(f"fault {kind} not injected: {exc}")
            time.sleep(self.rng.expovariate(rate))

    def recover_all(self) -> None:
        """After the faults: no fault left pending, the operator running, every node back."""
        self._stop_pending()
        self._recover_operator()
        deadline = time.monotonic() + 60
        for node in sorted(set(self.deleted_nodes)):
            self._guard(partial(self._recreate, node))
        for node in sorted(set(self.not_ready)):
            self._guard(partial(self._ready, node))
        for node in sorted(set(self.cordoned)):
            self._guard(partial(self._uncordon, node))
        self._uncordon_all(deadline)

    def _stop_pending(self) -> None:
        for t in self.drains:  # a drain in flight evicts until it is done
            t.join(100)
        for t in self.timers:
            t.cancel()
        for t in self.timers:
            t.join(1)

    def _recover_operator(self) -> None:
        if self.paused:
            self.operator.resume()
            self.paused = False
            self.record("operator_resume", "final", recovery=True)
        if not self.operator.running():
            self.operator.start(wait_ready=False)
            self.record("operator_restart", "final", recovery=True)

    def _uncordon_all(self, deadline: float) -> None:
        """Until every node exists and is schedulable (a late drain may cordon again)."""
        while time.monotonic() < deadline:
            nodes = self.kube.get("/api/v1/nodes")["items"]
            bad = [n["metadata"]["name"] for n in nodes if n["spec"].get("unschedulable")]
            for node in bad:
                self._guard(partial(self._uncordon, node))
            if not bad and len(nodes) >= self.cluster.config.gpu_nodes:
                break
            time.sleep(1)
