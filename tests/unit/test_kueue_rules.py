"""Kueue's plain-pod integration in the pure core (docs/CONTRACTS.md, "Queueing with Kueue"):
labels out, gated pods Queued (never Starting, never timed out), TerminationTarget a resume."""

from __future__ import annotations

import asyncio
import copy

import pytest
from jobkit import at, exited_pod, make_spec, observe, pending_pod, running_job, running_pod, starting_pod, step
from test_reconcile_step import FakeCluster, new_job

from finetune_operator.api import parse_spec
from finetune_operator.api.parsing import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.core import PodCondition, observe_pod
from finetune_operator.core.actions import CreatePod
from finetune_operator.core.gang import partial_gang_deadline
from finetune_operator.core.kueue import WorkloadRef, queued_workload, workload_message
from finetune_operator.pods import build_pod
from finetune_operator.reconcile_step import Inputs, ReconcileStep

QUEUE = {"queueName": "team-a"}
GATE = ("kueue.x-k8s.io/admission",)
# As Kueue v0.17 wrote it on a Workload in tests/integration/test_kueue.py (reason Pending).
NO_QUOTA = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, "
            "8 more needed")


def gated_pod(attempt: int, **kw):
    return pending_pod(attempt, gated=True, scheduling_gates=GATE, queue_name="team-a", **kw)


def kueue_eviction(message: str = "Preempted to accommodate a workload (UID: u1) due to prioritization "
                   "in the ClusterQueue", reason: str = "WorkloadEvictedDueToPreempted") -> tuple[PodCondition, ...]:
    return (PodCondition("TerminationTarget", "True", reason, message),)


# --- spec -> pod --------------------------------------------------------------------------
def test_single_pod_gets_queue_and_priority_labels_and_no_group():
    spec = make_spec(queueName="team-a", workloadPriorityClassName="low")
    pod = build_pod("ft", "ns", "uid", spec, 3, trainer_env={})
    labels, annotations = pod["metadata"]["labels"], pod["metadata"].get("annotations") or {}
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/priority-class"] == "low"
    assert "kueue.x-k8s.io/pod-group-name" not in labels
    assert not any(k.startswith("kueue.x-k8s.io/") for k in annotations)


def test_gang_pods_form_one_kueue_group_per_attempt():
    spec = make_spec(queueName="team-a", workers=3)
    pods = [build_pod("ft", "ns", "uid", spec, 2, trainer_env={}, rank=r) for r in range(3)]
    for pod in pods:
        meta = pod["metadata"]
        assert meta["labels"]["kueue.x-k8s.io/pod-group-name"] == "ft-2"
        assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "3"
        assert meta["annotations"]["kueue.x-k8s.io/retriable-in-group"] == "false"
    # Kueue's role hash covers requests, ports, nodeSelector, affinity, tolerations: the ranks must
    # not differ there, or one attempt would be several roles of a group.
    shapes = {str((p["spec"]["containers"][0]["resources"], p["spec"]["containers"][0]["ports"],
                   p["spec"].get("nodeSelector"), p["spec"].get("affinity"), p["spec"].get("tolerations")))
              for p in pods}
    assert len(shapes) == 1


def test_no_queue_no_kueue_labels():
    pod = build_pod("ft", "ns", "uid", make_spec(workers=2), 1, trainer_env={}, rank=0)
    meta = pod["metadata"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in {**meta["labels"], **meta.get("annotations", {})})


def test_priority_without_queue_is_refused_naming_the_field():
    with pytest.raises(SpecError, match="workloadPriorityClassName needs queueName"):
        parse_spec({**make_spec().model_dump(by_alias=True, exclude_none=True), "workloadPriorityClassName": "low"})


@pytest.mark.parametrize("bad", ["Team-A", "team_a", "-a", "a" * 64])
def test_queue_name_must_fit_a_label_value(bad):
    with pytest.raises(SpecError, match="queueName"):
        make_spec(queueName=bad)


# --- pod facts ----------------------------------------------------------------------------
def test_gate_is_read_from_the_spec_and_from_the_scheduler_condition():
    by_spec = observe_pod({"metadata": {"name": "ft-1", "labels": {"kueue.x-k8s.io/queue-name": "q"}},
                           "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
                           "status": {"phase": "Pending"}})
    assert by_spec.gated and by_spec.scheduling_gates == GATE and by_spec.queue_name == "q"
    by_condition = observe_pod({"metadata": {"name": "ft-1"}, "spec": {}, "status": {
        "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}})
    assert by_condition.gated
    ungated = observe_pod({"metadata": {"name": "ft-1"}, "spec": {"nodeName": "n"}, "status": {
        "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True",
                                            "lastTransitionTime": "2025-01-01T00:10:00Z"}]}})
    assert not ungated.gated and ungated.scheduled_at == at(600)


# --- classification -----------------------------------------------------------------------
def test_gated_pod_is_queued_by_kueue_naming_the_queue():
    spec = make_spec(**QUEUE)
    queued = step(None, spec=spec).status
    status = step(queued, [gated_pod(1)], spec=spec, now=at(5)).status
    assert (status.phase, status.reason) == ("Queued", "QueuedByKueue")
    assert "LocalQueue team-a" in (status.message or "")


def test_gated_pod_says_kueues_own_reason_when_known():
    spec = make_spec(**QUEUE)
    queued = step(None, spec=spec).status
    status = step(queued, [gated_pod(1)], spec=spec, now=at(5), queue_message=NO_QUOTA).status
    assert (status.phase, status.reason) == ("Queued", "QueuedByKueue")
    assert status.message == f"pod ft-1 waits for Kueue to admit it from LocalQueue team-a: {NO_QUOTA}"
    unknown = step(queued, [gated_pod(1)], spec=spec, now=at(5)).status
    assert unknown.message == "pod ft-1 waits for Kueue to admit it from LocalQueue team-a (quota or priority)"


def test_kueues_reason_is_one_bounded_line():
    spec = make_spec(**QUEUE)
    queued = step(None, spec=spec).status
    long = "first line\nsecond line " + "x" * 2000
    message = step(queued, [gated_pod(1)], spec=spec, now=at(5), queue_message=long).status.message or ""
    assert "\n" not in message and "first line second line" in message
    assert len(message) < len("pod ft-1 waits for Kueue to admit it from LocalQueue team-a: ") + 301


def _workload(*conditions: dict, **status) -> dict:
    return {"metadata": {"name": "pod-ft-1-3a7f1"}, "status": {"conditions": list(conditions), **status}}


def test_workload_message_is_the_quota_reserved_false_message():
    pending = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": NO_QUOTA}
    assert workload_message(_workload(pending)) == NO_QUOTA
    assert workload_message(_workload({**pending, "message": ""})) == "Pending"  # no words: the reason
    reserved = {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved",
                "message": "Quota reserved in ClusterQueue cq"}
    assert workload_message(_workload(reserved)) is None
    assert workload_message(_workload()) is None  # Kueue has not tried yet
    assert workload_message({"metadata": {}}) is None


def test_the_workload_to_read_is_the_gated_attempts():
    spec = make_spec(**QUEUE)
    queued = step(None, spec=spec).status  # attempt 1
    assert queued_workload(observe(queued, [gated_pod(1)], spec=spec)) == WorkloadRef(job_uid="uid-1")
    # The operator's pod index keeps the SchedulingGated condition, not the gates: Kueue's pod.
    by_condition = pending_pod(1, gated=True, queue_name="team-a")
    assert queued_workload(observe(queued, [by_condition], spec=spec)) == WorkloadRef(job_uid="uid-1")
    other_gate = pending_pod(1, gated=True, scheduling_gates=("example.com/wait",), queue_name="team-a")
    assert queued_workload(observe(queued, [other_gate], spec=spec)) is None
    assert queued_workload(observe(queued, [pending_pod(1, queue_name="team-a")], spec=spec)) is None
    assert queued_workload(observe(queued, [running_pod(1, queue_name="team-a")], spec=spec)) is None
    old = step(queued, [gated_pod(1)], spec=spec, now=at(1)).status.model_copy(update={"attempt": 2})
    assert queued_workload(observe(old, [gated_pod(1)], spec=spec)) is None  # not the current attempt
    gang = make_spec(**QUEUE, workers=2)
    ranks = [gated_pod(1, rank=0), gated_pod(1, rank=1)]
    assert queued_workload(observe(queued, ranks, spec=gang)) == WorkloadRef(name="ft-1")  # the pod group


GATED = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}


def _reconcile_reading_kueue(cluster: FakeCluster, answer: str | None) -> list[tuple[str, WorkloadRef]]:
    asked: list[tuple[str, WorkloadRef]] = []

    async def read(namespace: str, ref: WorkloadRef) -> str | None:
        asked.append((namespace, ref))
        return answer

    cluster.calls.clear()
    inputs = Inputs(pods=lambda: list(cluster.pods.values()), queue_message=read)
    asyncio.run(ReconcileStep(cluster, OperatorConfig(), clock=lambda: at(5)).run(copy.deepcopy(cluster.job), inputs))
    return asked


def test_the_reconcile_reads_kueues_reason_once_and_only_for_a_gated_attempt():
    job = new_job()
    job["spec"]["queueName"] = "team-a"
    cluster = FakeCluster(job)
    assert _reconcile_reading_kueue(cluster, NO_QUOTA) == []  # no pod yet: nothing to read
    cluster.pods["ft-1"]["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    cluster.pods["ft-1"]["status"] = GATED
    cluster.conflicts = 1  # a second pass re-decides without a second read
    assert _reconcile_reading_kueue(cluster, NO_QUOTA) == [("team-a", WorkloadRef(job_uid="uid-ft-1"))]
    assert cluster.calls[:2] == [("conflict",), ("read",)]
    assert cluster.job["status"]["message"].endswith(f"LocalQueue team-a: {NO_QUOTA}")
    # A failed read is "no reason": still Queued by Kueue, the reconcile goes on.
    assert len(_reconcile_reading_kueue(cluster, None)) == 1
    assert cluster.job["status"]["message"].endswith("LocalQueue team-a (quota or priority)")


def test_gated_pod_is_never_timed_out_or_stalled():
    spec = make_spec(**QUEUE, runPolicy={"startTimeoutSeconds": 10, "stallTimeoutSeconds": 10,
                                         "firstStepTimeoutSeconds": 10})
    queued = step(None, spec=spec).status
    decision = step(queued, [gated_pod(1)], spec=spec, now=at(86_400))
    assert (decision.status.phase, decision.status.reason) == ("Queued", "QueuedByKueue")
    assert decision.status.failures == 0 and decision.status.resumes == 0
    assert decision.requeue_after is None  # nothing is due while Kueue holds the pod


def test_start_timeout_counts_from_admission_not_from_the_queue():
    spec = make_spec(**QUEUE, runPolicy={"startTimeoutSeconds": 60})
    queued = step(None, spec=spec).status  # attempt started at T0
    admitted = at(3600)  # Kueue admitted an hour later; the scheduler placed the pod then
    pulling = starting_pod(1, "ErrImagePull", "not found", queue_name="team-a", scheduled_at=admitted)
    soon = step(queued, [pulling], spec=spec, now=at(3630)).status
    assert soon.phase == "Starting"
    late = step(soon, [pulling], spec=spec, now=at(3661)).status
    assert (late.phase, late.reason) == ("Failed", "ErrImagePull")


def test_without_kueue_the_start_timeout_counts_from_the_attempt():
    spec = make_spec(runPolicy={"startTimeoutSeconds": 60})
    queued = step(None, spec=spec).status
    pulling = starting_pod(1, "ErrImagePull", "not found", scheduled_at=at(3600))
    assert step(queued, [pulling], spec=spec, now=at(3601)).status.phase == "Failed"


def test_partial_gang_deadline_counts_from_admission():
    spec = make_spec(**QUEUE, workers=2, runPolicy={"startTimeoutSeconds": 60})
    queued = step(None, spec=spec).status
    placed = running_pod(1, rank=0, queue_name="team-a", scheduled_at=at(3600))
    waiting = pending_pod(1, rank=1, queue_name="team-a", unschedulable="0/4 nodes are available")
    deadline = partial_gang_deadline(observe(queued, [placed, waiting], spec=spec, now=at(3601)), spec, queued)
    assert deadline == at(3660)


def test_kueue_eviction_is_a_preemption_not_a_failure():
    spec = make_spec(**QUEUE)
    running = running_job(spec)
    marked = running_pod(1, conditions=kueue_eviction(), queue_name="team-a")
    status = step(running, [marked], spec=spec, now=at(30)).status
    assert (status.phase, status.reason) == ("Resuming", "Preempted")
    assert (status.failures, status.resumes) == (0, 1)
    assert "prioritization in the ClusterQueue" in (status.last_interruption.message or "")


@pytest.mark.parametrize(("kueue_reason", "ours"), [
    ("WorkloadEvictedDueToPreempted", "Preempted"), ("WorkloadEvicted", "Preempted"),
    ("WorkloadEvictedDueToNodeFailures", "NodeLost"), ("WorkloadEvictedDueToPodsReadyTimeout", "Evicted"),
    ("WorkloadEvictedDueToClusterQueueStopped", "Evicted"), ("WorkloadDeleted", "Evicted")])
def test_every_kueue_stop_is_an_interruption(kueue_reason, ours):
    spec = make_spec(**QUEUE)
    marked = running_pod(1, conditions=kueue_eviction("stopped", kueue_reason), queue_name="team-a")
    status = step(running_job(spec), [marked], spec=spec, now=at(30)).status
    assert (status.phase, status.reason, status.failures, status.resumes) == ("Resuming", ours, 0, 1)


def test_kueue_eviction_wins_over_the_trainers_sigterm_exit():
    spec = make_spec(**QUEUE, runPolicy={"backoffLimit": 0})
    running = running_job(spec)
    ended = exited_pod(1, 143, report={"outcome": "preempted"}, conditions=kueue_eviction(), deleting=True)
    status = step(running, [ended], spec=spec, now=at(30)).status
    assert (status.phase, status.reason, status.failures) == ("Resuming", "Preempted", 0)


def test_replacement_after_a_preemption_waits_for_the_old_pod_then_is_created():
    spec = make_spec(**QUEUE, runPolicy={"backoffSeconds": 0})
    running = running_job(spec)
    terminating = running_pod(1, conditions=kueue_eviction(), deleting=True, delete_by=at(60))
    resuming = step(running, [terminating], spec=spec, now=at(30))
    assert resuming.status.phase == "Resuming"
    assert not any(isinstance(a, CreatePod) for a in resuming.actions)
    gone = exited_pod(1, 143, report={"outcome": "preempted"}, conditions=kueue_eviction(), deleting=True)
    nxt = step(resuming.status, [gone], spec=spec, now=at(31))
    assert CreatePod(2, 0) in nxt.actions and nxt.status.attempt == 2


def test_a_real_failure_still_counts_against_backoff_limit():
    spec = make_spec(**QUEUE, runPolicy={"backoffLimit": 0})
    running = running_job(spec)
    status = step(running, [exited_pod(1, 1)], spec=spec, now=at(30)).status
    assert (status.phase, status.reason) == ("Failed", "BackoffLimitExceeded")


def test_kueue_not_installed_holds_the_job_queued_and_says_so():
    spec = make_spec(**QUEUE)
    queued = step(None, spec=spec).status
    refused = step(queued, [], spec=spec, now=at(1), create_error=(
        "KueueNotInstalled", "spec.queueName is set but Kueue is not installed: the CustomResourceDefinition "
        "localqueues.kueue.x-k8s.io does not exist"))
    assert (refused.status.phase, refused.status.reason) == ("Queued", "KueueNotInstalled")
    assert "localqueues.kueue.x-k8s.io" in (refused.status.message or "")
    assert any(getattr(a, "reason", None) == "KueueNotInstalled" and getattr(a, "type", None) == "Warning"
               for a in refused.actions)
    # Next pass (no refusal known): it tries again, keeping the reason until a pod exists.
    again = step(refused.status, [], spec=spec, now=at(10))
    assert CreatePod(1, 0) in again.actions and again.status.reason == "KueueNotInstalled"
