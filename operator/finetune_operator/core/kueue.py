"""Kueue's plain-pod integration, as facts about pods (docs/CONTRACTS.md, "Queueing with Kueue").

The operator writes Kueue's labels onto its pods (pods.py); Kueue's webhook gates each pod
with `ADMISSION_GATE` until the pod's Workload (one per pod, or one per attempt's gang) is
admitted, and on preemption marks the pods `TERMINATION_TARGET` and deletes them. Kueue never
re-creates a pod: the next attempt is ours, gated again until re-admitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from .observation import Observation, PodObservation
from .text import one_line

LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"  # a WorkloadPriorityClass name
LABEL_POD_GROUP_NAME = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_POD_GROUP_TOTAL_COUNT = "kueue.x-k8s.io/pod-group-total-count"
# "false": one ended pod ends the group's Workload (and frees its quota) once no pod of it is
# active. Each attempt is a new group and ours never replaces a pod inside a group; without
# it Kueue would hold the quota waiting for replacements that never come.
ANNOTATION_RETRIABLE_IN_GROUP = "kueue.x-k8s.io/retriable-in-group"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
TERMINATION_TARGET = "TerminationTarget"
# The CRD whose presence says Kueue is installed (a job with spec.queueName needs it).
LOCALQUEUE_CRD = "localqueues.kueue.x-k8s.io"
NOT_INSTALLED = "KueueNotInstalled"  # kind of create_error and status reason

# Where a gated attempt's Workload is and what it says (docs/CONTRACTS.md, "Queueing with Kueue").
# Kueue v0.17 serves v1beta1 and v1beta2 (the stored version); the objects are the same.
WORKLOAD_API = "/apis/kueue.x-k8s.io/v1beta2"
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"  # on a single pod's Workload: the pod's uid
QUEUE_MESSAGE_LIMIT = 300  # Kueue's own words, cut to fit one status line

# TerminationTarget reasons -> our interruption reasons. Kueue's pod integration writes its
# StopReason, and for an evicted Workload appends the eviction's reason: WorkloadEvicted +
# "DueTo" + Preempted | NodeFailures | PodsReadyTimeout | AdmissionCheck | ClusterQueueStopped |
# LocalQueueStopped | Deactivated | ... (jobframework/reconciler.go stopJob, v0.17). Any other
# reason (WorkloadDeleted, NoMatchingWorkload, NotAdmitted, a newer eviction) reads Evicted;
# the condition's message, Kueue's own words, goes into the status either way.
STOP_REASONS = {"WorkloadEvicted": "Preempted", "WorkloadEvictedDueToPreempted": "Preempted",
                "WorkloadEvictedDueToNodeFailures": "NodeLost"}


def pod_labels(queue_name: str | None, priority_class: str | None, group: str, workers: int) -> dict[str, str]:
    """Kueue's labels for one pod of an attempt whose gang is `group` (<job>-<attempt>)."""
    if not queue_name:
        return {}
    labels = {LABEL_QUEUE_NAME: queue_name}
    if priority_class:
        labels[LABEL_PRIORITY_CLASS] = priority_class
    if workers > 1:
        labels[LABEL_POD_GROUP_NAME] = group
    return labels


def pod_annotations(queue_name: str | None, workers: int) -> dict[str, str]:
    if not queue_name or workers == 1:
        return {}
    return {ANNOTATION_POD_GROUP_TOTAL_COUNT: str(workers), ANNOTATION_RETRIABLE_IN_GROUP: "false"}


def pod_group(job_name: str, attempt: int) -> str:
    """The pod group of an attempt's gang, which is also its Workload's name."""
    return f"{job_name}-{attempt}"


class WorkloadRef(NamedTuple):
    """How to find the Workload of a gated attempt: a gang's is named after its pod group; a
    single pod's carries the pod's uid in LABEL_JOB_UID (its name is a hash)."""

    name: str | None = None
    job_uid: str | None = None


def queued_workload(obs: Observation) -> WorkloadRef | None:
    """The Workload to read Kueue's reason from: the current attempt's, while Kueue's admission
    gate holds its pods. None when no pod of the attempt is gated (nothing to read)."""
    attempt = obs.status.attempt
    gated = [p for p in obs.pods if p.attempt == attempt and p.live and not p.deleting and held_by_kueue(p)]
    if not gated:
        return None
    if obs.workers > 1:
        return WorkloadRef(name=pod_group(obs.job_name, attempt))
    return WorkloadRef(job_uid=gated[0].uid) if gated[0].uid else None


def workload_message(workload: Mapping[str, Any]) -> str | None:
    """Kueue's reason for not admitting a Workload: its QuotaReserved=False condition's message
    (e.g. "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu
    in flavor gpu, 8 more needed"). None before Kueue has tried, or once quota is reserved."""
    status = workload.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    for condition in conditions if isinstance(conditions, list) else []:
        if isinstance(condition, Mapping) and condition.get("type") == "QuotaReserved":
            if condition.get("status") != "False":
                return None
            text = condition.get("message") or condition.get("reason")
            return one_line(text, QUEUE_MESSAGE_LIMIT) if isinstance(text, str) and text.strip() else None
    return None


def held_by_kueue(pod: PodObservation) -> bool:
    """Gated, by Kueue's admission gate: named in its spec, or (the gates unknown, as in the
    operator's pod index, which keeps only the scheduler's SchedulingGated condition) a pod
    Kueue manages."""
    return pod.gated and (ADMISSION_GATE in pod.scheduling_gates
                          or (pod.queue_name is not None and not pod.scheduling_gates))


def gate_message(pod: PodObservation, queue_message: str | None = None) -> tuple[str, str]:
    """(reason, message) of a pod that a scheduling gate holds back; queue_message is Kueue's
    own reason from the attempt's Workload, when the reconcile could read it."""
    if held_by_kueue(pod):
        queue = f"LocalQueue {pod.queue_name}" if pod.queue_name else "its LocalQueue"
        why = f": {one_line(queue_message, QUEUE_MESSAGE_LIMIT)}" if queue_message else " (quota or priority)"
        return "QueuedByKueue", f"pod {pod.name} waits for Kueue to admit it from {queue}{why}"
    gates = ", ".join(pod.scheduling_gates) or "unknown"
    return "SchedulingGated", f"pod {pod.name} is held back by scheduling gates: {gates}"


def termination_target(pod: PodObservation) -> tuple[str, str] | None:
    """(reason, message) when Kueue stopped the pod's Workload (TerminationTarget=True)."""
    condition = pod.condition_true(TERMINATION_TARGET)
    if condition is None:
        return None
    reason = STOP_REASONS.get(condition.reason or "", "Evicted")
    detail = condition.message or condition.reason or TERMINATION_TARGET
    return reason, f"Kueue stopped pod {pod.name} ({condition.reason or 'no reason'}): {detail}"


def admitted_at(pods: list[PodObservation]) -> datetime | None:
    """When Kueue's admission let the first of these pods be placed: start-up timeouts count
    from there, not from the attempt's creation (time in the queue is not start-up time).
    None when no Kueue-managed pod is placed yet."""
    times = [p.scheduled_at for p in pods if p.queue_name and p.scheduled_at is not None]
    return min(times, default=None)
