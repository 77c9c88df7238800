"""A real local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, all on 127.0.0.1, free ports, a temporary directory.

Used by the tests (session fixture), the benchmarks, the demo and `make cluster-up`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from . import pki as pki_mod
from .procs import Proc, free_port, wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = HERE / "stages.yaml"
# kwok hands out pod and node IPs from loopback ranges, so anything that dials a
# simulated pod (the operator's progress scrape) stays on this machine.
KWOK_POD_CIDR = "127.64.0.0/16"
KWOK_NODE_IP = "127.63.0.1"


def kubectl_path() -> str:
    venv_kubectl = Path(sys.prefix) / "bin" / "kubectl"
    return str(venv_kubectl) if venv_kubectl.exists() else (shutil.which("kubectl") or "kubectl")


def build_binaries() -> Path:
    """Builds (or finds cached) binaries; returns the directory holding them."""
    out = subprocess.run(["bash", str(REPO / "hack" / "build-binaries.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ClusterConfig:
    gpu_nodes: int = 4
    gpus_per_node: int = 8
    node_prefix: str = "gpu-node"
    # Short tolerations make node-failure tests take seconds instead of five minutes.
    not_ready_toleration_seconds: int = 5
    extra_apiserver_args: list[str] = field(default_factory=list)
    no_limits: bool = False  # benchmarks: no apiserver inflight limits


class LocalCluster:
    def __init__(self, workdir: Path | None = None, bin_dir: Path | None = None,
                 config: ClusterConfig | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="finetune-cluster-"))
        self.own_workdir = workdir is None
        self.bin_dir = bin_dir
        self.config = config or ClusterConfig()
        self.log_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.procs: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self.pki: pki_mod.Pki | None = None

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> "LocalCluster":
        t0 = time.monotonic()
        self.bin_dir = self.bin_dir or build_binaries()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki_mod.generate(self.workdir / "pki")
        for name in ("etcd", "etcd_peer", "apiserver", "kwok"):
            self.ports[name] = free_port()
        self._write_kubeconfig()
        try:
            self.start_etcd()
            self.start_apiserver()
            self._start_controllers()
            self.create_gpu_nodes(self.config.gpu_nodes)
            self.wait_nodes_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.get(name)
            if proc:
                proc.stop()

    def cleanup(self) -> None:
        self.stop()
        if self.own_workdir and not os.environ.get("FINETUNE_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # ---- components -------------------------------------------------------------
    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        self.procs["etcd"] = proc = Proc("etcd", [
            self._bin("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--unsafe-no-fsync=true", "--log-level=warn",
            "--quota-backend-bytes=4294967296",
        ], self.log_dir)
        proc.start()
        wait_for(lambda: requests.get(f"{client}/health", timeout=2).json().get("health") == "true",
                 60, "etcd health", procs=[proc])

    def start_apiserver(self) -> None:
        p = self.pki
        args = [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['apiserver']}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={p.serving_cert}", f"--tls-private-key-file={p.serving_key}",
            f"--client-ca-file={p.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            f"--default-not-ready-toleration-seconds={self.config.not_ready_toleration_seconds}",
            f"--default-unreachable-toleration-seconds={self.config.not_ready_toleration_seconds}",
            "--enable-admission-plugins=NodeRestriction", "--profiling=false",
            "--event-ttl=1h",
            # The real node's kubelet API (kubectl logs/exec): verified both ways with our CA.
            f"--kubelet-client-certificate={p.admin_cert}", f"--kubelet-client-key={p.admin_key}",
            f"--kubelet-certificate-authority={p.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
        if self.config.no_limits:
            args += ["--max-requests-inflight=0", "--max-mutating-requests-inflight=0",
                     "--enable-priority-and-fairness=false"]
        args += self.config.extra_apiserver_args
        self.procs["kube-apiserver"] = proc = Proc("kube-apiserver", args, self.log_dir)
        proc.start()
        self.wait_apiserver_ready(proc)

    def wait_apiserver_ready(self, proc: Proc | None = None, timeout: float = 120) -> None:
        url = f"{self.server}/readyz"
        wait_for(lambda: requests.get(url, verify=str(self.pki.ca_cert), timeout=3).status_code == 200,
                 timeout, "kube-apiserver /readyz", procs=[proc] if proc else [])

    def _start_controllers(self) -> None:
        p = self.pki
        kcm = Proc("kube-controller-manager", [
            self._bin("kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
            f"--root-ca-file={p.ca_cert}", f"--service-account-private-key-file={p.sa_key}",
            "--use-service-account-credentials=false", "--kube-api-qps=100", "--kube-api-burst=200",
            "--node-monitor-period=2s", "--node-monitor-grace-period=40s",
            "--controllers=*,-bootstrap-signer-controller,-token-cleaner-controller,-node-ipam-controller",
        ], self.log_dir)
        sched = Proc("kube-scheduler", [
            self._bin("kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
            "--kube-api-qps=100", "--kube-api-burst=200",
        ], self.log_dir)
        kwok = Proc("kwok", [
            self._bin("kwok"), f"--kubeconfig={self.kubeconfig}", f"--config={STAGES}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--manage-nodes-with-label-selector=", "--manage-single-node=",
            f"--cidr={KWOK_POD_CIDR}", f"--node-ip={KWOK_NODE_IP}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ], self.log_dir)
        for proc in (kcm, sched, kwok):
            self.procs[proc.name] = proc
            proc.start()
        wait_for(lambda: requests.get(f"http://127.0.0.1:{self.ports['kwok']}/readyz",
                                      timeout=2).status_code == 200,
                 60, "kwok /readyz", procs=[kwok])
        # The controller-manager is ready for us once it made the default service account.
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default",
                                      check=False).returncode == 0,
                 90, "controller-manager (default ServiceAccount)", procs=[kcm, sched])

    # ---- restarts for chaos tests ----------------------------------------------
    def restart_control_plane(self, down_seconds: float = 0.0) -> None:
        """Stop the API server and etcd, optionally stay down, start them again (same data)."""
        self.procs["kube-apiserver"].stop()
        self.procs["etcd"].stop()
        if down_seconds:
            time.sleep(down_seconds)  # the outage itself is what is being simulated
        self.start_etcd()
        self.start_apiserver()

    # ---- access -----------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def _write_kubeconfig(self) -> None:
        p = self.pki
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "finetune-local",
            "clusters": [{"name": "finetune-local", "cluster": {
                "server": self.server, "certificate-authority": str(p.ca_cert)}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(p.admin_cert), "client-key": str(p.admin_key)}}],
            "contexts": [{"name": "finetune-local", "context": {
                "cluster": "finetune-local", "user": "admin", "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([kubectl_path(), f"--kubeconfig={self.kubeconfig}", *args],
                             input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    def apply(self, manifest: dict | list | str, *extra: str) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(
            manifest if isinstance(manifest, list) else [manifest])
        return self.kubectl("apply", "-f", "-", *extra, input=text)

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # ---- nodes ------------------------------------------------------------------
    def gpu_node(self, name: str, gpus: int | None = None) -> dict:
        gpus = self.config.gpus_per_node if gpus is None else gpus
        resources = {"cpu": "96", "memory": "1Ti", "pods": "110", "nvidia.com/gpu": str(gpus)}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                         "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                    "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                    "nvidia.com/gpu.product": "Simulated-H100"}},
            "status": {"capacity": resources, "allocatable": resources},
        }

    def create_gpu_nodes(self, count: int, start: int = 0) -> list[str]:
        names = [f"{self.config.node_prefix}-{i}" for i in range(start, start + count)]
        if names:
            self.kubectl("create", "-f", "-",
                         input=yaml.safe_dump_all([self.gpu_node(n) for n in names]))
        return names

    def wait_nodes_ready(self, timeout: float = 120) -> None:
        def all_ready():
            nodes = self.get_json("nodes", "-l", "type=kwok")["items"]
            ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                             for c in n["status"].get("conditions", []))]
            return len(nodes) >= self.config.gpu_nodes and len(ready) == len(nodes)
        wait_for(all_ready, timeout, "kwok GPU nodes Ready", interval=0.5,
                 procs=[self.procs["kwok"]])

    def summary(self) -> dict:
        return {"workdir": str(self.workdir), "kubeconfig": str(self.kubeconfig),
                "server": self.server,
                "pids": {name: proc.pid for name, proc in self.procs.items()},
                "logs": str(self.log_dir)}
