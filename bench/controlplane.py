"""The benchmarks' local control plane: kwok GPU nodes, an API server without inflight limits
that writes an audit log (apimetrics), the TrainingJob CRD established, and namespaces."""
from __future__ import annotations

from pathlib import Path

from finetune_testbed.cluster import REPO, ClusterConfig, LocalCluster

from . import apimetrics
from .kubeapi import Api, ApiError
from .procstat import wait_until

CRD = REPO / "crds" / "finetune.dev_trainingjobs.yaml"
CONTROL_PLANE = ("kube-apiserver", "etcd", "kwok", "kube-scheduler")


def new_cluster(nodes: int) -> tuple[LocalCluster, Path]:
    """A cluster (not started yet) whose API server audits every request at level Metadata."""
    cluster = LocalCluster(config=ClusterConfig(gpu_nodes=nodes, gpus_per_node=8, no_limits=True))
    policy = cluster.workdir / "audit-policy.yaml"
    policy.write_text(apimetrics.AUDIT_POLICY)
    audit_log = cluster.workdir / "audit.log"
    cluster.config.extra_apiserver_args += [f"--audit-policy-file={policy}",
                                            f"--audit-log-path={audit_log}",
                                            "--audit-log-maxsize=0"]
    return cluster, audit_log


def start(cluster: LocalCluster) -> Api:
    """Start the control plane and install the CRD; the benchmark's client."""
    cluster.start()
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.wait_established("trainingjobs.finetune.dev")
    return Api.for_cluster(cluster)


def create_namespace(api: Api, ns: str) -> None:
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": ns}})

    def sa_exists() -> dict | None:
        try:
            return api.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default")
        except ApiError:
            return None
    wait_until(sa_exists, 90, f"default ServiceAccount in {ns}", interval=0.2)


def delete_namespace(api: Api, ns: str, timeout: float) -> None:
    api.request("DELETE", f"/api/v1/namespaces/{ns}")

    def gone() -> bool:
        try:
            api.get(f"/api/v1/namespaces/{ns}")
            return False
        except ApiError as exc:
            return exc.status == 404
    wait_until(gone, timeout, f"namespace {ns} deleted", interval=0.5)
