"""Reduce a pod manifest (dict from the API) to a PodObservation. Pure: parses, never fetches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from finetune_contract import parse_termination_message

from ..api.models import LABEL_ATTEMPT, LABEL_RANK, TRAINER_CONTAINER
from .kueue import LABEL_QUEUE_NAME
from .observation import (
    ContainerRunning,
    ContainerState,
    ContainerTerminated,
    ContainerWaiting,
    PodCondition,
    PodObservation,
)


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _attempt(metadata: Mapping[str, Any]) -> int:
    labels = metadata.get("labels") or {}
    raw = labels.get(LABEL_ATTEMPT)
    if raw is None:  # fall back to the <job>-<attempt> name
        raw = str(metadata.get("name", "")).rsplit("-", 1)[-1]
    return _count(raw)


def _count(raw: Any) -> int:
    try:
        return max(int(raw), 0)
    except (TypeError, ValueError):
        return 0


def _container_state(statuses: list[Mapping[str, Any]]) -> tuple[ContainerState, dict[str, Any] | None]:
    trainer = next((s for s in statuses if s.get("name") == TRAINER_CONTAINER), None)
    if trainer is None:
        return None, None
    state = trainer.get("state") or {}
    if "terminated" in state and state["terminated"] is not None:
        t = state["terminated"]
        code = t.get("exitCode")
        return (
            ContainerTerminated(
                exit_code=int(code) if isinstance(code, int) else 1,
                reason=t.get("reason"),
                message=t.get("message"),
                finished_at=parse_time(t.get("finishedAt")),
            ),
            parse_termination_message(t.get("message")),
        )
    if "running" in state and state["running"] is not None:
        return ContainerRunning(started_at=parse_time(state["running"].get("startedAt"))), None
    if "waiting" in state and state["waiting"] is not None:
        w = state["waiting"]
        return ContainerWaiting(reason=w.get("reason"), message=w.get("message")), None
    return None, None


def _scheduled_at(status: Mapping[str, Any]) -> datetime | None:
    """When the pod was bound to its node: PodScheduled=True's lastTransitionTime (the
    conditions parsed into PodCondition do not keep times)."""
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "True":
            return parse_time(c.get("lastTransitionTime"))
    return None


def observe_pod(pod: Mapping[str, Any]) -> PodObservation:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    conditions = tuple(
        PodCondition(str(c.get("type", "")), str(c.get("status", "Unknown")), c.get("reason"), c.get("message"))
        for c in status.get("conditions") or []
    )
    scheduled_condition = next((c for c in conditions if c.type == "PodScheduled"), None)
    unschedulable = (
        scheduled_condition.message or scheduled_condition.reason
        if scheduled_condition
        and scheduled_condition.status == "False"
        and scheduled_condition.reason == "Unschedulable"
        else None
    )
    gates = tuple(str(g.get("name", "")) for g in spec.get("schedulingGates") or [] if isinstance(g, Mapping))
    # A gated pod reads PodScheduled=False, reason SchedulingGated (the scheduler's
    # PreEnqueue); the gates in its spec say so before the scheduler has looked.
    gated = bool(gates) or bool(
        scheduled_condition
        and scheduled_condition.status == "False"
        and scheduled_condition.reason == "SchedulingGated"
    )
    container, report = _container_state(list(status.get("containerStatuses") or []))
    return PodObservation(
        name=str(metadata.get("name", "")),
        attempt=_attempt(metadata),
        rank=_count((metadata.get("labels") or {}).get(LABEL_RANK, 0)),
        uid=str(metadata.get("uid", "")),
        phase=str(status.get("phase") or "Pending"),
        deleting=metadata.get("deletionTimestamp") is not None,
        delete_by=parse_time(metadata.get("deletionTimestamp")),
        node_name=spec.get("nodeName") or None,
        scheduled=bool(spec.get("nodeName")) or bool(scheduled_condition and scheduled_condition.status == "True"),
        unschedulable_message=unschedulable,
        gated=gated and not spec.get("nodeName"),
        scheduling_gates=gates,
        queue_name=(metadata.get("labels") or {}).get(LABEL_QUEUE_NAME) or None,
        scheduled_at=_scheduled_at(status),
        conditions=conditions,
        pod_reason=status.get("reason"),
        pod_message=status.get("message"),
        container=container,
        termination_message=report,
        creation_time=parse_time(metadata.get("creationTimestamp")),
    )


def _controller_uid(pod: Mapping[str, Any]) -> str | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def counts_for(pod: Mapping[str, Any], job_uid: str) -> bool:
    """The one rule for which pods are the job's: its controller ownerReference names the job's uid.
    A deleted job's pods (same name, same labels) can outlive it until garbage collection, and a
    hand-made pod with our labels (no controller) is not ours to act on."""
    return bool(job_uid) and _controller_uid(pod) == job_uid


def observe_pods(pods: Iterable[Mapping[str, Any]], job_uid: str) -> tuple[PodObservation, ...]:
    """Facts for the pods that count for the job (counts_for), in the given order."""
    return tuple(observe_pod(pod) for pod in pods if counts_for(pod, job_uid))
