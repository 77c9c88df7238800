"""The reconcile step against a fake Writer: what it writes, in which order, for a few situations
(no API server). FakeCluster plays the API server; the tests play the kubelet by setting pod status."""
from __future__ import annotations

import asyncio
import copy
import json
from datetime import datetime

from jobkit import at, spec_dict

from finetune_operator import actions, kube
from finetune_operator.config import OperatorConfig
from finetune_operator.reconcile_step import Inputs, Outcome, ReconcileStep
from finetune_operator.reconciler import Reconciler

NS, JOB, UID = "team-a", "ft", "job-uid"


def new_job() -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": JOB, "namespace": NS, "uid": UID, "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": spec_dict()}


class FakeCluster:
    """A Writer keeping the job and the pods it was asked to create; every call is logged."""

    def __init__(self, job: dict):
        self.job, self.pods, self.calls = job, {}, []
        self.conflicts = 0  # status writes to refuse as stale (someone else wrote first)
        self.refuse: tuple[str, str] | None = None  # (kind, detail) for create_pod to raise

    def _bump(self) -> None:
        meta = self.job["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    async def write_status(self, job: dict, status: dict) -> dict:
        if self.conflicts:
            self.conflicts -= 1
            self._bump()
        if job["metadata"]["resourceVersion"] != self.job["metadata"]["resourceVersion"]:
            self.calls.append(("conflict",))
            modified = {"reason": "Conflict", "message": "the object has been modified"}
            raise kube.api_error(409, modified, "PUT", "status")
        self.calls.append(("status", status.get("phase"), status.get("reason")))
        self.job = {**copy.deepcopy(job), "status": copy.deepcopy(status)}
        self._bump()
        return copy.deepcopy(self.job)

    async def read_job(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("read",))
        return copy.deepcopy(self.job)

    async def create_pod(self, namespace: str, pod: dict) -> str:
        name = pod["metadata"]["name"]
        self.calls.append(("create", name))
        if self.refuse:
            raise actions.PodRejected(*self.refuse)
        if name in self.pods:
            return "adopted"
        pod["metadata"]["uid"] = f"uid-{name}"
        self.pods[name] = pod
        return "created"

    async def create_service(self, namespace: str, service: dict) -> str:
        self.calls.append(("service", service["metadata"]["name"]))
        return "created"

    async def delete_pod(self, namespace: str, name: str, uid: str | None, grace_seconds: int | None) -> None:
        self.calls.append(("delete", name) if grace_seconds is None else ("delete", name, grace_seconds))

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.calls.append(("delete-job", name))

    async def record_event(self, job: dict, type_: str, reason: str, message: str) -> None:
        self.calls.append(("event", type_, reason))

    # -- the kubelet ------------------------------------------------------------------
    def set_pod(self, name: str, status: dict) -> None:
        self.pods[name]["spec"]["nodeName"] = "node-a"
        self.pods[name]["status"] = status


def trainer(state: dict) -> list[dict]:
    return [{"name": "trainer", "state": state}]


STARTING = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": trainer({"waiting": {"reason": "ContainerCreating"}})}
RUNNING = {"phase": "Running", "podIP": "10.0.0.7",
           "containerStatuses": trainer({"running": {"startedAt": "2025-01-01T00:00:05Z"}})}
EVICTED = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
           "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
           "containerStatuses": trainer({"terminated": {"exitCode": 143, "reason": "Error"}})}
REPORT = {"outcome": "completed", "step": 1000, "maxSteps": 1000, "checkpoint": None, "checkpointStep": None,
          "loss": 0.5, "resumedFrom": None, "message": "done"}
COMPLETED = {"phase": "Succeeded", "containerStatuses": trainer(
    {"terminated": {"exitCode": 0, "reason": "Completed", "message": json.dumps(REPORT),
                    "finishedAt": "2025-01-01T00:10:00Z"}})}


def reconcile(cluster: FakeCluster, now: datetime, trigger: str = "job") -> Outcome:
    """One reconcile of the job as the cluster has it, seeing the cluster's pods."""
    cluster.calls.clear()
    step = ReconcileStep(cluster, OperatorConfig(), clock=lambda: now)
    inputs = Inputs(pods=lambda: list(cluster.pods.values()))
    return asyncio.run(step.run(copy.deepcopy(cluster.job), inputs, trigger=trigger))


def running_cluster() -> FakeCluster:
    cluster = FakeCluster(new_job())
    reconcile(cluster, at(0))
    cluster.set_pod("ft-1", RUNNING)
    reconcile(cluster, at(6))
    assert cluster.job["status"]["phase"] == "Running"
    return cluster


def test_a_new_job_writes_queued_then_creates_its_pod_then_starting():
    cluster = FakeCluster(new_job())
    reconcile(cluster, at(0))
    assert cluster.calls == [("status", "Queued", "CreatingPod"), ("create", "ft-1"),
                             ("event", "Normal", "CreatingPod")]
    pod = cluster.pods["ft-1"]
    assert pod["metadata"]["ownerReferences"][0]["uid"] == UID
    assert cluster.job["status"]["attempt"] == 1

    cluster.set_pod("ft-1", STARTING)
    reconcile(cluster, at(2))
    assert cluster.calls == [("status", "Starting", "ContainerCreating")]


def test_a_gang_writes_its_status_then_its_service_then_every_rank():
    job = new_job()
    job["spec"]["workers"] = 2
    cluster = FakeCluster(job)
    reconcile(cluster, at(0))
    assert cluster.calls == [("status", "Queued", "CreatingPod"), ("service", "ft"), ("create", "ft-1-0"),
                             ("create", "ft-1-1"), ("event", "Normal", "CreatingPod")]
    env = {e["name"]: e["value"] for e in cluster.pods["ft-1-1"]["spec"]["containers"][0]["env"] if "value" in e}
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_MASTER_ADDR"]) == ("2", "1", "rank-0.ft")
    assert cluster.pods["ft-1-1"]["spec"]["hostname"] == "rank-1"
    cluster.set_pod("ft-1-0", RUNNING)
    reconcile(cluster, at(2))
    assert cluster.job["status"]["ranks"] == {"ready": 1, "total": 2, "display": "1/2"}
    assert cluster.job["status"]["phase"] == "Queued"  # rank 1 not scheduled yet


def test_a_forced_deletion_of_a_stuck_pod_is_announced():
    cluster = running_cluster()
    cluster.job["spec"]["suspend"] = True
    cluster.pods["ft-1"]["metadata"]["deletionTimestamp"] = "2025-01-01T00:01:00Z"
    reconcile(cluster, at(60 + 61))
    assert ("delete", "ft-1", 0) in cluster.calls
    assert ("event", "Warning", "StuckTerminating") in cluster.calls


def test_nothing_new_writes_nothing():
    cluster = running_cluster()
    reconcile(cluster, at(7))
    assert cluster.calls == []


def test_an_evicted_running_pod_makes_the_job_resumable_then_starts_the_next_attempt():
    cluster = running_cluster()
    cluster.set_pod("ft-1", EVICTED)
    out = reconcile(cluster, at(60))
    assert cluster.calls == [("status", "Resuming", "Evicted"), ("event", "Warning", "Evicted")]
    status = cluster.job["status"]
    assert (status["resumes"], status["failures"], status["lastInterruption"]["reason"]) == (1, 0, "Evicted")
    resumable = next(c for c in status["conditions"] if c["type"] == "Resumable")
    assert resumable["status"] == "True"
    assert out.requeue_after == 10.0  # runPolicy.backoffSeconds

    reconcile(cluster, at(65))  # still backing off
    assert cluster.calls == []
    reconcile(cluster, at(70))
    assert cluster.calls == [("status", "Queued", "CreatingPod"), ("create", "ft-2"),
                             ("event", "Normal", "CreatingPod")]
    assert cluster.job["status"]["attempt"] == 2


def test_a_completed_trainer_succeeds_the_job_and_creates_nothing():
    cluster = running_cluster()
    cluster.set_pod("ft-1", COMPLETED)
    out = reconcile(cluster, at(600))
    assert cluster.calls == [("status", "Succeeded", "Completed"), ("event", "Normal", "Completed")]
    assert cluster.job["status"]["progress"]["step"] == 1000
    assert out.requeue_after is None  # no TTL: nothing left to wake up for


def test_a_stale_status_write_rereads_the_job_and_decides_again():
    cluster = FakeCluster(new_job())
    cluster.conflicts = 1
    remembered = []
    step = ReconcileStep(cluster, OperatorConfig(), clock=lambda: at(0))
    asyncio.run(step.run(copy.deepcopy(cluster.job), Inputs(pods=lambda: []), remember=remembered.append))
    assert [c[0] for c in cluster.calls] == ["conflict", "read", "status", "create", "event"]
    assert [j["metadata"]["resourceVersion"] for j in remembered] == ["2", "3"]  # the re-read, then the write


def test_a_pod_the_api_server_refuses_fails_the_job_with_its_reason():
    cluster = FakeCluster(new_job())
    cluster.refuse = ("rejected", "spec.containers[0].image: Required value")
    reconcile(cluster, at(0))
    assert [c for c in cluster.calls if c[0] == "status"] == [("status", "Queued", "CreatingPod"),
                                                             ("status", "Failed", "PodRejected")]
    assert "Required value" in cluster.job["status"]["message"]


def test_the_reconciler_gathers_counted_pods_and_caches_what_it_wrote():
    cluster = FakeCluster(new_job())
    stray = {"metadata": {"name": "ft-1", "namespace": NS, "uid": "hand-made",
                          "labels": {"finetune.dev/job-name": JOB, "finetune.dev/attempt": "1"}},
             "spec": {"nodeName": "node-a"}, "status": RUNNING}
    r = Reconciler(client=None, config=OperatorConfig(), writer=cluster)
    r.bind({(NS, JOB): [stray]}, {})
    key = r.job_seen(copy.deepcopy(cluster.job))

    asyncio.run(r.reconcile(key, "job"))
    # The hand-made pod does not count: a new attempt, not the adoption of that pod.
    assert cluster.calls[0] == ("status", "Queued", "CreatingPod")
    assert r.jobs[key]["metadata"]["resourceVersion"] == cluster.job["metadata"]["resourceVersion"]
    assert not r.is_news(cluster.job)  # the watch echo of our own write
