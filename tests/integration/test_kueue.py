"""Queueing through a real Kueue (plain-pod integration) on the real control plane with kwok GPU
nodes (docs/CONTRACTS.md, "Queueing with Kueue"; issue 16).

One ClusterQueue with quota for one job (8 GPUs), a LocalQueue, two WorkloadPriorityClasses.
The latencies are measured from one watch of the namespace's pods and TrainingJobs (the
test's own observations) and printed; they are reported, not asserted."""
from __future__ import annotations

import pytest
import yaml

from finetune_testbed.cluster import REPO, ClusterConfig, LocalCluster
from finetune_testbed.jobs import Jobs, job_manifest, sim
from finetune_testbed.kuberaw import MERGE, Kube
from finetune_testbed.kueue import (
    API,
    HIGH,
    LOW,
    QUEUE,
    condition,
    evicted_by_kueue,
    gated,
    open_queues,
    queue_manifests,
)
from finetune_testbed.operator_proc import OperatorProcess
from finetune_testbed.procs import wait_for
from finetune_testbed.timeline import Timeline, phase

pytestmark = pytest.mark.cluster
FAST = {"backoffSeconds": 1, "maxBackoffSeconds": 2}


def kueue_says_no_quota(status: dict) -> bool:
    return status.get("reason") == "QueuedByKueue" and "insufficient unused quota" in (status.get("message") or "")








def workload_of(kube: Kube, namespace: str, pod_name: str) -> dict | None:
    """The Workload Kueue made for a single pod (it owns it) or for a pod group (named after it)."""
    for wl in kube.get(f"{API}/namespaces/{namespace}/workloads")["items"]:
        owners = {r["name"] for r in wl["metadata"].get("ownerReferences") or []}
        if pod_name in owners or wl["metadata"]["name"] == pod_name:
            return wl
    return None


def wait_workload(kube: Kube, namespace: str, pod_name: str, type_: str, status: str, timeout: float = 30) -> dict:
    """The pod's Workload once its condition `type_` has `status` (Kueue writes it asynchronously)."""
    def check() -> dict | None:
        wl = workload_of(kube, namespace, pod_name)
        return wl if wl is not None and condition(wl, type_).get("status") == status else None
    found = wait_for(check, timeout, f"Workload of {pod_name}: {type_}={status}", interval=0.2)
    assert found is not None  # wait_for returns only a truthy value
    return found


@pytest.fixture
def queued_ns(cluster, namespace, kueue):
    cluster_queue = open_queues(cluster, namespace, gpus=8)
    yield namespace
    cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)


@pytest.fixture
def timeline(cluster, queued_ns):
    t = Timeline(cluster.kubeconfig, queued_ns).start()
    yield t
    t.stop()


def test_quota_priority_preemption_and_release(cluster, queued_ns, jobs, timeline):
    ns, kube = queued_ns, Kube(cluster.kubeconfig)
    queue = {"queueName": QUEUE, "resources": {"gpus": 8}}
    # A: low priority, runs until told otherwise; a real failure ends it (backoffLimit 0).
    jobs.apply(job_manifest("a", **queue, workloadPriorityClassName=LOW,
                            runPolicy={**FAST, "backoffLimit": 0}, template=sim()))
    running_a = timeline.wait("tj", "a", phase("Running"), "A Running")
    pod_a1 = jobs.pods("a")[0]
    assert pod_a1["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    assert pod_a1["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == LOW
    assert pod_a1["metadata"]["labels"].get("kueue.x-k8s.io/managed") == "true"  # Kueue's webhook took it
    assert timeline.first("pod", "a-1", gated) is not None, "Kueue never gated A's pod"
    admitted_a = timeline.first("pod", "a-1", lambda p: not gated(p))
    assert admitted_a is not None and admitted_a <= running_a

    # B: no priority class (0); the quota is A's, so Kueue holds B's pod.
    jobs.apply(job_manifest("b", **queue, runPolicy={**FAST, "startTimeoutSeconds": 5}, template=sim()))
    queued_b = jobs.wait("b", phase("Queued", "QueuedByKueue"), 60, "B QueuedByKueue")
    assert f"LocalQueue {QUEUE}" in queued_b["message"]
    assert gated(jobs.pods("b")[0])
    wl_b = wait_workload(kube, ns, "b-1", "QuotaReserved", "False")
    print(f"\nB's Workload status: {wl_b['status']}")
    # Kueue's own reason, read from B's Workload (found by its job-uid label), in B's status.
    queued_b = jobs.wait("b", kueue_says_no_quota, 30, "B's status with Kueue's reason")
    assert queued_b["message"].startswith(f"pod b-1 waits for Kueue to admit it from LocalQueue {QUEUE}: ")
    print(f"B's status message: {queued_b['message']}")

    # C: high priority; Kueue preempts A (TerminationTarget, deletion), A resumes gated.
    jobs.apply(job_manifest("c", **queue, workloadPriorityClassName=HIGH, runPolicy=FAST,
                            template=sim(outcome="succeed", run_for="4s")))
    preempted = timeline.wait("pod", "a-1", evicted_by_kueue, "A's pod marked TerminationTarget by Kueue")
    timeline.wait("tj", "a", phase("Resuming", "Preempted"), "A Resuming/Preempted")
    replacement_gated = timeline.wait("pod", "a-2", gated, "A's replacement pod gated")
    a = jobs.status("a")
    assert (a["failures"], a["resumes"]) == (0, 1), a
    assert a["lastInterruption"]["reason"] == "Preempted"
    assert "prioritization" in a["lastInterruption"]["message"], a["lastInterruption"]
    timeline.wait("tj", "c", phase("Running"), "C Running")

    # C finishes: its Workload ends, A (priority 100) is admitted before B (0).
    jobs.wait_phase("c", "Succeeded", 60)
    running_a2 = timeline.wait("tj", "a", phase("Running", attempt=2), "A Running again (attempt 2)")
    admitted_a2 = timeline.first("pod", "a-2", lambda p: not gated(p))
    assert admitted_a2 is not None
    wait_workload(kube, ns, "c-1", "Finished", "True")
    a = jobs.status("a")
    assert (a["attempt"], a["failures"], a["resumes"]) == (2, 0, 1), a
    assert jobs.status("b")["reason"] == "QueuedByKueue"

    # A fails for real: counted, Failed (backoffLimit 0); its Workload finishes, B gets the quota.
    Kube(cluster.kubeconfig).request("PATCH", f"/api/v1/namespaces/{ns}/pods/a-2", content_type=MERGE, body={
        "metadata": {"annotations": {"sim.finetune.dev/outcome": "fail", "sim.finetune.dev/exit-code": "1"}}})
    a = jobs.wait_phase("a", "Failed", 60)
    assert (a["reason"], a["failures"], a["resumes"]) == ("BackoffLimitExceeded", 1, 1), a
    wait_workload(kube, ns, "a-2", "Finished", "True")
    b = jobs.wait_phase("b", "Running", 60)
    assert (b["attempt"], b["failures"], b["resumes"]) == (1, 0, 0), b  # never charged while queued
    print(f"\nadmission -> Running: A {running_a - admitted_a:.2f}s, A again {running_a2 - admitted_a2:.2f}s; "
          f"preemption (TerminationTarget seen) -> replacement pod gated: {replacement_gated - preempted:.2f}s")


def test_gang_is_one_kueue_group_and_frees_its_quota(cluster, queued_ns, jobs, timeline):
    ns, kube = queued_ns, Kube(cluster.kubeconfig)
    jobs.apply(job_manifest("d", queueName=QUEUE, workers=2, resources={"gpus": 4}, runPolicy=FAST,
                            template=sim(outcome="succeed", run_for="3s", outcome_rank=0)))
    for rank in (0, 1):
        timeline.wait("pod", f"d-1-{rank}", gated, f"rank {rank} gated")
    pods = {p["metadata"]["name"]: p for p in jobs.pods("d")}
    assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in pods.values()} == {"d-1"}
    jobs.wait_phase("d", "Succeeded", 90)
    # Rank 0 succeeded, rank 1 was stopped: only retriable-in-group "false" lets the group end.
    wait_workload(kube, ns, "d-1", "Finished", "True")
    jobs.apply(job_manifest("e", queueName=QUEUE, resources={"gpus": 8}, runPolicy=FAST, template=sim()))
    jobs.wait_phase("e", "Running", 60)  # the whole quota: the gang's share was released
    # A gang that does not fit: Kueue's reason comes from the Workload named after its pod group.
    jobs.apply(job_manifest("f", queueName=QUEUE, workers=2, resources={"gpus": 4}, runPolicy=FAST, template=sim()))
    queued_f = jobs.wait("f", kueue_says_no_quota, 60, "gang f's status with Kueue's reason")
    print(f"\ngang f's status message: {queued_f['message']}")


def test_readme_shows_these_manifests():
    """README, "Queueing with Kueue", shows this test's Kueue objects (its ClusterQueue is not
    limited to one namespace)."""
    text = (REPO / "README.md").read_text()
    block = text.split("### Queueing with Kueue", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    shown = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(block)}
    for obj in queue_manifests("default", "gpus"):
        doc = shown[(obj["kind"], obj["metadata"]["name"])]
        if obj["kind"] == "ClusterQueue":
            assert doc["spec"]["namespaceSelector"] == {}
            obj["spec"]["namespaceSelector"] = {}
        assert doc == obj, obj["kind"]
    job = shown[("TrainingJob", "a")]["spec"]
    assert (job["queueName"], job["workloadPriorityClassName"]) == (QUEUE, LOW)


@pytest.fixture(scope="module")
def bare_cluster():
    """A control plane that has never seen Kueue (the session one may have it installed)."""
    c = LocalCluster(config=ClusterConfig(gpu_nodes=0))
    c.start()
    c.kubectl("apply", "-f", str(REPO / "crds" / "finetune.dev_trainingjobs.yaml"))
    c.wait_established("trainingjobs.finetune.dev")
    op = OperatorProcess(c.kubeconfig, c.log_dir).start()
    try:
        yield c
    finally:
        op.stop()
        c.cleanup()


def test_queue_name_without_kueue_says_so(bare_cluster):
    bare_cluster.kubectl("create", "namespace", "no-kueue")
    jobs = Jobs(bare_cluster, "no-kueue")
    jobs.apply(job_manifest("x", queueName=QUEUE, runPolicy=FAST))
    status = jobs.wait("x", phase("Queued", "KueueNotInstalled"), 60, "x KueueNotInstalled")
    assert "localqueues.kueue.x-k8s.io" in status["message"] and "no pod created" in status["message"]
    assert jobs.pods("x") == []
    warnings = [e for e in jobs.events("x") if e.get("reason") == "KueueNotInstalled"]
    assert warnings and warnings[0]["type"] == "Warning"
    # The CRD's CEL rule: a Kueue priority without a queue is refused at apply time.
    with pytest.raises(RuntimeError, match="workloadPriorityClassName needs queueName"):
        jobs.apply(job_manifest("no-queue", workloadPriorityClassName=LOW))
