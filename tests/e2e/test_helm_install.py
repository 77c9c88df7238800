"""`helm install`, `helm upgrade` and `helm uninstall` of charts/finetune-operator on the local
control plane, the operator image running on the real node; Helm built from its Go module.

The chart's values carry the test bed's needs, as tests/e2e/test_deploy_real_node.py's overlay
does for deploy/: the locally built image (never pulled), one replica pinned to the real node,
and hostNetwork with the API server's loopback address (this API server listens on 127.0.0.1
only). The release namespace is a fresh one, Pod Security "privileged" for hostNetwork."""
from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from finetune_testbed.cluster import REPO, build_binaries
from finetune_testbed.identities import lease, lease_holder
from finetune_testbed.jobs import Jobs, job_manifest
from finetune_testbed.procs import free_port, wait_for
from finetune_testbed.realnode import OPERATOR_IMAGE, TAINT_KEY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

CHART = REPO / "charts" / "finetune-operator"
RELEASE = "finetune"
RELEASE_NS = "finetune-helm"
DEPLOYMENT = "finetune-operator"
LEASE = "finetune-operator-leader"
# Every kind the chart creates (charts/finetune-operator/templates), for the leftover listing.
CHART_KINDS = ("deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,"
               "clusterroles,clusterrolebindings,poddisruptionbudgets,networkpolicies,configmaps")


@pytest.fixture
def helm(cluster, tmp_path):
    binary = build_binaries() / "helm"
    env = {**cluster.env(), "HELM_CACHE_HOME": str(tmp_path / "helm/cache"),
           "HELM_CONFIG_HOME": str(tmp_path / "helm/config"),
           "HELM_DATA_HOME": str(tmp_path / "helm/data")}

    def run(*args: str, timeout: float = 300) -> str:
        proc = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout
    return run


def chart_values(real_node, cluster, metrics_port: int, health_port: int) -> dict[str, Any]:
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "replicas": 1,
        "hostNetwork": True,
        # Ports of the host's network namespace: free ones.
        "metrics": {"port": metrics_port}, "health": {"port": health_port},
        "nodeSelector": {"kubernetes.io/hostname": real_node.name},
        "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                     {"name": "KUBERNETES_SERVICE_PORT", "value": str(cluster.ports["apiserver"])}],
    }


def leftovers(cluster) -> list[str]:
    """Objects carrying the release's label, or deploy/'s part-of label, in any namespace."""
    found = []
    for selector in (f"app.kubernetes.io/instance={RELEASE}", "app.kubernetes.io/part-of=finetune-operator"):
        items = cluster.get_json(CHART_KINDS, "-A", "-l", selector)["items"]
        found += [f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}"
                  for o in items]
    return sorted(set(found))


@pytest.fixture
def release_namespace(cluster, operator):
    """The release namespace; the session operator frozen while the chart's operator runs."""
    operator.pause()
    # Cluster-scoped RBAC left by deploy/ tests (kubectl apply -k): same names, not Helm's,
    # so Helm would refuse to take them over.
    cluster.kubectl("delete", "clusterrole,clusterrolebinding", "--ignore-not-found",
                    "-l", "app.kubernetes.io/part-of=finetune-operator,app.kubernetes.io/managed-by!=Helm")
    cluster.kubectl("create", "namespace", RELEASE_NS)
    cluster.kubectl("label", "namespace", RELEASE_NS, "pod-security.kubernetes.io/enforce=privileged")
    try:
        yield RELEASE_NS
    finally:
        cluster.kubectl("delete", "namespace", RELEASE_NS, "--wait=true", timeout=180, check=False)
        operator.resume()


def operator_pods(cluster) -> list[dict]:
    pods = cluster.get_json("pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/name=finetune-operator")
    return [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]


def test_helm_install_upgrade_uninstall(cluster, real_node, namespace, helm, release_namespace, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(real_node, cluster, free_port(), free_port())))
    # What another test's `kubectl apply -k deploy/` left in finetune-system is not the chart's.
    before = leftovers(cluster)

    # install: the CRD (already there, from crds/: Helm leaves it as it is) and the operator.
    helm("install", RELEASE, str(CHART), "-n", RELEASE_NS, "--values", str(values),
         "--wait", "--timeout=180s")
    deployment = cluster.get_json("deployment", DEPLOYMENT, "-n", RELEASE_NS)
    available = {c["type"]: c["status"] for c in deployment["status"]["conditions"]}
    assert available.get("Available") == "True" and deployment["status"]["readyReplicas"] == 1
    (pod,) = operator_pods(cluster)
    assert pod["spec"]["nodeName"] == real_node.name
    wait_for(lambda: lease_holder(cluster, RELEASE_NS, LEASE) == pod["metadata"]["name"], 60,
             f"{pod['metadata']['name']} holding {LEASE} in {RELEASE_NS}")
    # The chart's operator reconciles: a suspended job (no pod) gets its status.
    jobs = Jobs(cluster, namespace)
    jobs.apply(job_manifest("kept", suspend=True))
    jobs.wait_phase("kept", "Suspended", 60)

    # upgrade to changed values: a flag, and new ports (hostNetwork: the surge pod cannot
    # share the old pod's host ports on the one node).
    with_debug = {**yaml.safe_load(values.read_text()), "extraArgs": ["--log-level=DEBUG"],
                  "metrics": {"port": free_port()}, "health": {"port": free_port()}}
    values.write_text(yaml.safe_dump(with_debug))
    helm("upgrade", RELEASE, str(CHART), "-n", RELEASE_NS, "--values", str(values),
         "--wait", "--timeout=180s")
    deployment = cluster.get_json("deployment", DEPLOYMENT, "-n", RELEASE_NS)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][-1] == "--log-level=DEBUG", container["args"]
    assert f"--metrics-port={with_debug['metrics']['port']}" in container["args"]
    assert deployment["status"]["observedGeneration"] == deployment["metadata"]["generation"]
    assert deployment["status"]["updatedReplicas"] == deployment["status"]["readyReplicas"] == 1
    wait_for(lambda: len(operator_pods(cluster)) == 1, 90, "the old operator pod gone")
    (new_pod,) = operator_pods(cluster)
    assert new_pod["metadata"]["name"] != pod["metadata"]["name"]
    assert "--log-level=DEBUG" in new_pod["spec"]["containers"][0]["args"]
    history = yaml.safe_load(helm("history", RELEASE, "-n", RELEASE_NS, "-o", "yaml"))
    assert [h["revision"] for h in history] == [1, 2], history

    # uninstall: nothing of the chart's is left; the CRD and the jobs are (README.md).
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout=120s")
    wait_for(lambda: not operator_pods(cluster), 90, "the operator pod gone")
    assert leftovers(cluster) == before
    cluster.kubectl("get", "crd", "trainingjobs.finetune.dev")
    kept = jobs.get("kept")
    assert kept and kept["status"]["phase"] == "Suspended", kept
    assert not kept["metadata"].get("finalizers"), kept["metadata"]  # deletable with no operator
    # The leader Lease is one of the chart's objects (deploy/manager/lease.yaml): gone with it.
    wait_for(lambda: not lease(cluster, RELEASE_NS, LEASE), 60, f"{LEASE} gone from {RELEASE_NS}")
