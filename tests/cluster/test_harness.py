"""The local control plane is real: scheduler, controller-manager, kwok and the
API server behave as a cluster does. Every test asserts observed state."""
from __future__ import annotations

import json
import threading

import pytest

from finetune_testbed.procs import wait_for

pytestmark = pytest.mark.cluster


def pod(name: str, gpus: int = 1, annotations: dict | None = None, node: str | None = None,
        owner: dict | None = None) -> dict:
    body = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "example.invalid/sim:1",
            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
    }
    if node:
        body["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    if owner:
        body["metadata"]["ownerReferences"] = [owner]
    return body


def pod_json(cluster, ns, name):
    res = cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def test_gpu_nodes_ready_with_allocatable_gpus(cluster):
    nodes = cluster.get_json("nodes", "-l", "type=kwok")["items"]
    assert len(nodes) == cluster.config.gpu_nodes
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", node["metadata"]["name"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"


def test_batch_job_pod_succeeds_and_job_completes(cluster, namespace):
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sim"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"sim.finetune.dev/outcome": "succeed",
                                         "sim.finetune.dev/run-for": "1s"}},
            "spec": pod("x")["spec"]}},
    }
    cluster.apply(job, "-n", namespace)

    def complete():
        j = cluster.get_json("job", "sim", "-n", namespace)
        return any(c["type"] == "Complete" and c["status"] == "True"
                   for c in j.get("status", {}).get("conditions", []))
    wait_for(complete, 90, "Job Complete")
    assert cluster.get_json("job", "sim", "-n", namespace)["status"]["succeeded"] == 1


def test_pod_asking_for_too_many_gpus_is_unschedulable(cluster, namespace):
    cluster.apply(pod("greedy", gpus=9), "-n", namespace)

    def unschedulable():
        p = pod_json(cluster, namespace, "greedy")
        conds = {c["type"]: c for c in p.get("status", {}).get("conditions", [])}
        c = conds.get("PodScheduled")
        return c if c and c["status"] == "False" else None
    cond = wait_for(unschedulable, 60, "PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]
    assert pod_json(cluster, namespace, "greedy")["status"]["phase"] == "Pending"


def test_failed_container_reports_exit_code_and_reason(cluster, namespace):
    cluster.apply(pod("oom", annotations={"sim.finetune.dev/outcome": "fail",
                                          "sim.finetune.dev/run-for": "500ms",
                                          "sim.finetune.dev/exit-code": "137",
                                          "sim.finetune.dev/reason": "OOMKilled"}),
                  "-n", namespace)
    p = wait_for(lambda: (lambda p: p if p and p["status"].get("phase") == "Failed" else None)(
        pod_json(cluster, namespace, "oom")), 60, "pod Failed")
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (137, "OOMKilled")


def test_image_pull_error_stays_waiting(cluster, namespace):
    cluster.apply(pod("pull", annotations={"sim.finetune.dev/start": "image-pull-error"}),
                  "-n", namespace)

    def waiting():
        p = pod_json(cluster, namespace, "pull")
        statuses = p.get("status", {}).get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("waiting")
    state = wait_for(waiting, 60, "container waiting")
    assert state["reason"] == "ErrImagePull"
    assert pod_json(cluster, namespace, "pull")["status"]["phase"] == "Pending"


class PodWatcher:
    """Records every version of one pod seen by a watch, to catch short-lived states."""

    def __init__(self, api_client, namespace, name):
        from kubernetes import client, watch
        self.versions: list[dict] = []
        self._w = watch.Watch()
        core = client.CoreV1Api(api_client)

        def run():
            try:
                for ev in self._w.stream(core.list_namespaced_pod, namespace,
                                         field_selector=f"metadata.name={name}",
                                         timeout_seconds=120):
                    self.versions.append(api_client.sanitize_for_serialization(ev["object"]))
            except Exception:
                pass
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def stop(self):
        self._w.stop()

    def condition(self, ctype):
        for v in self.versions:
            for c in (v.get("status") or {}).get("conditions") or []:
                if c["type"] == ctype and c["status"] == "True":
                    return c
        return None


def _extra_node(cluster, name):
    cluster.kubectl("create", "-f", "-", input=json.dumps(cluster.gpu_node(name)))
    wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                         cluster.get_json("node", name)["status"].get("conditions", [])),
             60, f"node {name} Ready")


def test_drain_evicts_pod_with_disruption_target(cluster, namespace, api_client):
    node = "drain-target"
    _extra_node(cluster, node)
    try:
        cluster.apply(pod("victim", node=node), "-n", namespace)
        wait_for(lambda: (pod_json(cluster, namespace, "victim") or {}).get("status", {})
                 .get("phase") == "Running", 60, "victim Running")
        watcher = PodWatcher(api_client, namespace, "victim")
        res = cluster.kubectl("drain", node, "--force", "--ignore-daemonsets",
                              "--delete-emptydir-data", "--timeout=60s", timeout=90)
        assert "evicted" in res.stdout
        wait_for(lambda: pod_json(cluster, namespace, "victim") is None, 60, "victim gone")
        watcher.stop()
        cond = watcher.condition("DisruptionTarget")
        assert cond is not None and cond["reason"] == "EvictionByEvictionAPI"
    finally:
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_node_not_ready_taint_eviction(cluster, namespace, api_client):
    node = "failing-node"
    _extra_node(cluster, node)
    try:
        cluster.apply(pod("on-failing", node=node), "-n", namespace)
        wait_for(lambda: (pod_json(cluster, namespace, "on-failing") or {}).get("status", {})
                 .get("phase") == "Running", 60, "pod Running")
        watcher = PodWatcher(api_client, namespace, "on-failing")
        cluster.kubectl("label", "node", node, "node-not-ready.stage.kwok.x-k8s.io=true")
        wait_for(lambda: pod_json(cluster, namespace, "on-failing") is None, 120,
                 "pod evicted from NotReady node")
        watcher.stop()
        cond = watcher.condition("DisruptionTarget")
        assert cond is not None and cond["reason"] == "DeletionByTaintManager"
    finally:
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_deleting_owner_garbage_collects_pods(cluster, namespace):
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.get_json("configmap", "owner", "-n", namespace)["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    cluster.apply(pod("child", owner=owner), "-n", namespace)
    assert pod_json(cluster, namespace, "child") is not None
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: pod_json(cluster, namespace, "child") is None, 90, "child collected")


def test_zz_apiserver_and_etcd_restart_keep_data(cluster, namespace):
    cluster.kubectl("create", "configmap", "survivor", "-n", namespace,
                    "--from-literal=key=value")
    old_pid = cluster.procs["kube-apiserver"].pid
    cluster.restart_control_plane()
    assert cluster.procs["kube-apiserver"].pid != old_pid
    data = cluster.get_json("configmap", "survivor", "-n", namespace)["data"]
    assert data == {"key": "value"}
    # The rest of the cluster reconnects: a new pod still gets scheduled and run.
    cluster.apply(pod("after-restart"), "-n", namespace)
    wait_for(lambda: (pod_json(cluster, namespace, "after-restart") or {}).get("status", {})
             .get("phase") == "Running", 120, "pod Running after restart")
