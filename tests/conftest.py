"""Shared fixtures. The local control plane starts once per session, only when a
collected test asks for it; each test gets a fresh namespace."""
from __future__ import annotations

import os

# Offline before anything imports transformers (docs/TRAINER.md pitfall 3).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import json
import re
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest

from finetune_testbed.cluster import REPO, LocalCluster
from finetune_testbed.jobs import Jobs
from finetune_testbed.operator_proc import OperatorProcess
from finetune_testbed.procs import wait_for


@pytest.fixture(scope="session")
def cluster():
    c = LocalCluster()
    c.start()
    print(f"\nlocal control plane ready in {c.startup_seconds:.1f}s at {c.workdir}")
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="session")
def kube(cluster):
    """A synchronous kubernetes client for test assertions (the operator has its own)."""
    from kubernetes import client, config
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client
    api_client.close()


@pytest.fixture(scope="session")
def api_client(cluster):
    from kubernetes import config
    c = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield c
    c.close()


@pytest.fixture
def core(api_client):
    from kubernetes import client
    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(cluster, request):
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager made the default ServiceAccount.
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", name,
                                     check=False).returncode == 0, 60, f"default SA in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# ---- the operator on the local control plane -------------------------------------
CRD = REPO / "crds" / "finetune.dev_trainingjobs.yaml"
LAGS: list[float] = []
# The job phase a pod phase change should lead to (the pairs the lag is measured on).
EXPECTED_JOB_PHASES = {"Running": ("Running",), "Succeeded": ("Succeeded",),
                       "Failed": ("Resuming", "Failed")}


@pytest.fixture(scope="session")
def crd(cluster):
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.wait_established("trainingjobs.finetune.dev")
    return CRD


@pytest.fixture(scope="session")
def operator(cluster, crd):
    op = OperatorProcess(cluster.kubeconfig, cluster.log_dir)
    op.start()
    lag = LagRecorder(cluster)
    lag.start()
    yield op
    lag.stop()
    op.stop()


@pytest.fixture
def session_operator_paused(operator):
    """The session operator (admin identity, no leader election) frozen with SIGSTOP, so it
    neither reconciles nor holds anything while other operators under test act."""
    operator.pause()
    try:
        yield operator
    finally:
        operator.resume()


@pytest.fixture
def live_operator(operator):
    """The session operator, restarted if an earlier test left it stopped or paused."""
    if not operator.running():
        operator.start()
    operator.resume()
    operator.wait_ready()
    return operator


@pytest.fixture
def jobs(cluster, namespace, live_operator):
    return Jobs(cluster, namespace)


@pytest.fixture(scope="module")
def kueue(cluster):
    """A real Kueue manager for the module's tests (hack/finetune_testbed/kueue.py)."""
    from finetune_testbed.kueue import Kueue

    k = Kueue(cluster)
    t0 = time.monotonic()
    k.start()
    print(f"\nKueue ready in {time.monotonic() - t0:.1f}s")
    yield k
    k.stop()


class LagRecorder:
    """Measures pod phase change -> TrainingJob status change, as seen by an independent
    watch client (the operations reference's recipe). Reported, never asserted."""

    def __init__(self, cluster):
        from kubernetes import client, config, watch
        self.api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.watch_mod = watch
        self.pending: dict[tuple[str, str], tuple[float, tuple]] = {}
        self.pod_phase: dict[tuple[str, str], str] = {}
        self.job_phase: dict[tuple[str, str], str] = {}
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self):
        for fn in (self._pods, self._jobs):
            t = threading.Thread(target=self._loop, args=(fn,), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stopping.set()

    def _loop(self, fn):
        while not self.stopping.is_set():
            try:
                fn()
            except Exception:
                time.sleep(1)

    def _pods(self):
        w = self.watch_mod.Watch()
        for ev in w.stream(self.core.list_pod_for_all_namespaces,
                           label_selector="app.kubernetes.io/managed-by=finetune-operator",
                           timeout_seconds=30):
            pod = ev["object"]
            key = (pod.metadata.namespace, pod.metadata.name)
            phase = pod.status.phase
            if self.pod_phase.get(key) != phase:
                self.pod_phase[key] = phase
                owner = (pod.metadata.labels or {}).get("finetune.dev/job-name")
                expected = EXPECTED_JOB_PHASES.get(phase)
                job_key = (pod.metadata.namespace, owner)
                if owner and expected and self.job_phase.get(job_key) not in expected:
                    self.pending[job_key] = (time.monotonic(), expected)
            if self.stopping.is_set():
                return

    def _jobs(self):
        w = self.watch_mod.Watch()
        for ev in w.stream(self.custom.list_cluster_custom_object, "finetune.dev", "v1alpha1",
                           "trainingjobs", timeout_seconds=30):
            meta = ev["object"]["metadata"]
            key = (meta["namespace"], meta["name"])
            phase = (ev["object"].get("status") or {}).get("phase")
            self.job_phase[key] = phase
            t0, expected = self.pending.get(key, (None, ()))
            if t0 is not None and phase in expected:
                del self.pending[key]
                LAGS.append(time.monotonic() - t0)
            if self.stopping.is_set():
                return


def pytest_terminal_summary(terminalreporter):
    if len(LAGS) >= 2:
        lags = sorted(LAGS)
        p99 = lags[min(len(lags) - 1, int(round(0.99 * (len(lags) - 1))))]
        line = (f"status lag (pod phase change -> TrainingJob status, independent watch): "
                f"n={len(lags)} median={statistics.median(lags) * 1000:.0f} ms "
                f"p99={p99 * 1000:.0f} ms max={lags[-1] * 1000:.0f} ms")
        terminalreporter.write_line(line)
        out = Path(REPO / ".state")
        out.mkdir(exist_ok=True)
        (out / "status-lag.json").write_text(json.dumps({"lags": lags}))
