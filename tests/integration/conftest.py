"""Fixtures for operator integration tests on the real local control plane."""
from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest

from finetune_testbed.cluster import REPO
from finetune_testbed.jobs import Jobs
from finetune_testbed.operator_proc import OperatorProcess

CRD = REPO / "crds" / "finetune.dev_trainingjobs.yaml"
LAGS: list[float] = []
# The job phase a pod phase change should lead to (the pairs the lag is measured on).
EXPECTED_JOB_PHASES = {"Running": ("Running",), "Succeeded": ("Succeeded",),
                       "Failed": ("Resuming", "Failed")}


@pytest.fixture(scope="session")
def crd(cluster):
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/trainingjobs.finetune.dev",
                    "--timeout=60s")
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
            except Exception:  # noqa: BLE001 - a restarted API server ends the stream
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
