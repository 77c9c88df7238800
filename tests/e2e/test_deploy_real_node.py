"""`kubectl apply -k` of deploy/ runs the operator image as a Deployment pod on the real node,
authenticated by its in-cluster ServiceAccount token, and that operator runs a TrainingJob's
trainer image to completion.

The only changes are the test bed's, made by a kustomize overlay over deploy/: the locally
built image (never pulled), one replica pinned to the real node, and hostNetwork with the API
server's loopback address, because this test bed's API server listens on 127.0.0.1 only (no
kube-proxy makes the `kubernetes` Service reachable). Nothing leaves the machine."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from finetune_testbed.cluster import REPO
from finetune_testbed.identities import lease_holder
from finetune_testbed.jobs import Jobs
from finetune_testbed.procs import free_port, wait_for
from finetune_testbed.realjob import real_job
from finetune_testbed.realnode import OPERATOR_IMAGE, TAINT_KEY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

OP_NS = "finetune-system"
DEPLOYMENT = "finetune-operator"
LEASE = "finetune-operator-leader"
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"


def overlay(directory, real_node, cluster, metrics_port: int, health_port: int):
    """A kustomization over deploy/ (kustomize accepts only relative paths to a base)."""
    name, tag = OPERATOR_IMAGE.rsplit(":", 1)
    directory.mkdir(parents=True, exist_ok=True)
    container = "/spec/template/spec/containers/0"
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy", directory)],
        "images": [{"name": "ghcr.io/finetune-dev/finetune-operator", "newName": name,
                    "newTag": tag}],
        "patches": [{"target": {"kind": "Namespace", "name": OP_NS}, "patch": json.dumps([
            # hostNetwork is outside the restricted Pod Security Standard deploy/ enforces.
            {"op": "replace", "path": f"/metadata/labels/{PSA_ENFORCE.replace('/', '~1')}",
             "value": "privileged"}])},
                    {"target": {"kind": "Deployment", "name": DEPLOYMENT}, "patch": json.dumps([
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
            {"op": "add", "path": "/spec/template/spec/nodeSelector/kubernetes.io~1hostname",
             "value": real_node.name},
            {"op": "add", "path": "/spec/template/spec/tolerations",
             "value": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]},
            {"op": "replace", "path": f"{container}/imagePullPolicy", "value": "Never"},
            # Ports of the host's network namespace: free ones, named as deploy/ names them.
            {"op": "test", "path": f"{container}/args/3", "value": "--metrics-port=8080"},
            {"op": "replace", "path": f"{container}/args/3", "value": f"--metrics-port={metrics_port}"},
            {"op": "test", "path": f"{container}/args/4", "value": "--health-port=8081"},
            {"op": "replace", "path": f"{container}/args/4", "value": f"--health-port={health_port}"},
            {"op": "test", "path": f"{container}/ports/0/name", "value": "metrics"},
            {"op": "replace", "path": f"{container}/ports/0/containerPort", "value": metrics_port},
            {"op": "test", "path": f"{container}/ports/1/name", "value": "health"},
            {"op": "replace", "path": f"{container}/ports/1/containerPort", "value": health_port},
            {"op": "add", "path": f"{container}/env/-",
             "value": {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}},
            {"op": "add", "path": f"{container}/env/-",
             "value": {"name": "KUBERNETES_SERVICE_PORT", "value": str(cluster.ports["apiserver"])}},
        ])}],
    }))
    return directory


@pytest.fixture
def deployed_operator(cluster, real_node, operator, tmp_path):
    """The operator image as the Deployment's only pod; the session operator frozen."""
    operator.pause()
    try:
        path = overlay(tmp_path / "overlay", real_node, cluster, free_port(), free_port())
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(path), timeout=120)
        cluster.kubectl("-n", OP_NS, "rollout", "status", f"deployment/{DEPLOYMENT}",
                        "--timeout=180s", timeout=200)
        pods = cluster.get_json("pods", "-n", OP_NS, "-l",
                                "app.kubernetes.io/name=finetune-operator")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        assert len(running) == 1, [(p["metadata"]["name"], p["status"].get("phase")) for p in pods]
        yield running[0]
    finally:
        cluster.kubectl("-n", OP_NS, "delete", "deployment", DEPLOYMENT, "--wait=true",
                        "--ignore-not-found", timeout=120, check=False)
        wait_for(lambda: not cluster.get_json("pods", "-n", OP_NS, "-l",
                                              "app.kubernetes.io/name=finetune-operator")["items"],
                 90, "the operator pod gone")
        cluster.kubectl("label", "namespace", OP_NS, f"{PSA_ENFORCE}=restricted", "--overwrite")
        operator.resume()


def test_operator_image_runs_as_deployment_and_trains_on_the_real_node(
        cluster, namespace, real_node, claims, deployed_operator):
    pod = deployed_operator
    name = pod["metadata"]["name"]
    assert pod["spec"]["nodeName"] == real_node.name
    (status,) = pod["status"]["containerStatuses"]
    assert status["containerID"].startswith("containerd://") and status["ready"], status
    assert status["image"].endswith(OPERATOR_IMAGE.split("/", 1)[1]), status["image"]
    # The pod's own identity (POD_NAME) holds the leader Lease.
    wait_for(lambda: lease_holder(cluster, OP_NS, LEASE) == name, 60, f"{name} holding {LEASE}")
    # kubectl logs reaches the real kubelet. The image holds no kubeconfig: the operator
    # logged in with the ServiceAccount token the kubelet mounted.
    logs = cluster.kubectl("-n", OP_NS, "logs", name).stdout
    assert "operator starting" in logs, logs[-2000:]

    jobs = Jobs(cluster, namespace)
    claims("deployed-ckpt")
    jobs.apply(real_job("deployed", claim="deployed-ckpt", max_steps=6, step_delay=0.1))
    final = jobs.wait_phase("deployed", "Succeeded", 240)
    assert final["progress"]["step"] == 6 and final["attempt"] == 1
    adapter = real_node.uri_dir(namespace, final["outputPath"]) / "adapter_model.safetensors"
    assert adapter.is_file(), adapter  # all of it done while the session operator was frozen
