"""What happened to the current attempt's pod (docs/CONTRACTS.md, "Classifying what happened to a pod").

`classify_pod` looks at one pod and says either that the attempt is still on its way (InFlight:
Queued, Starting or Running), that it completed, or that it ended and how that counts
(interruption -> maxResumes, failure -> backoffLimit, fatal -> Failed now).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import finetune_contract as contract

from ..api.models import FailurePolicyRule, TrainingJobSpec, TrainingJobStatus
from . import kueue
from .observation import Observation, PodObservation
from .text import one_line
from .timing import start_timeout_at

# Waiting reasons that will not fix themselves; past startTimeoutSeconds they fail the job.
START_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)

# DisruptionTarget reasons -> our interruption reasons.
DISRUPTION_REASONS = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "EvictionByEvictionAPI": "Evicted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
    "TerminationByKubelet": "NodeShutdown",
}


@dataclass(frozen=True)
class InFlight:
    phase: Literal["Queued", "Starting", "Running"]
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class Completed:
    message: str


@dataclass(frozen=True)
class Ended:
    kind: Literal["interruption", "failure", "fatal"]
    reason: str
    message: str
    exit_code: int | None = None


Outcome = InFlight | Completed | Ended


def node_lost(pod: PodObservation, obs: Observation) -> bool:
    """The pod's node is gone or NotReady for long enough, or the pod's phase is Unknown."""
    if pod.phase == "Unknown":
        return True
    if pod.node_name is None or pod.node_name not in obs.unready_nodes:
        return False
    since = obs.unready_nodes[pod.node_name]
    return since is None or obs.now >= since + timedelta(seconds=obs.node_lost_after_seconds)


def node_lost_at(pod: PodObservation, obs: Observation) -> datetime | None:
    """When the pod's NotReady node will count as lost (None: not pending)."""
    if pod.node_name is None or pod.node_name not in obs.unready_nodes:
        return None
    since = obs.unready_nodes[pod.node_name]
    return None if since is None else since + timedelta(seconds=obs.node_lost_after_seconds)


def match_failure_policy(
    rules: list[FailurePolicyRule], exit_code: int | None, true_conditions: frozenset[str]
) -> tuple[int, FailurePolicyRule] | None:
    """First rule matching the exit code (when there is one) or a True pod condition."""
    for index, rule in enumerate(rules):
        if rule.on_exit_codes is not None:
            if exit_code is None:
                continue
            inside = exit_code in rule.on_exit_codes.values
            if inside == (rule.on_exit_codes.operator == "In"):
                return index, rule
        elif rule.on_pod_conditions and any(c.type in true_conditions for c in rule.on_pod_conditions):
            return index, rule
    return None


def last_activity(pod: PodObservation, obs: Observation, status: TrainingJobStatus) -> datetime:
    """Latest sign of training life: a step change, the trainer's heartbeat, or the container start."""
    candidates = [t for t in (status.attempt_start_time, pod.running.started_at if pod.running else None) if t]
    sample = obs.progress
    if sample is not None and sample.heartbeat_time is not None:
        candidates.append(sample.heartbeat_time)
    progress = status.progress
    if progress is not None and progress.update_time is not None:
        candidates.append(progress.update_time)
    return max(candidates, default=obs.now)


def stall_at(
    pod: PodObservation, obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus
) -> datetime | None:
    """When a running trainer counts as stalled; None when stall detection does not apply."""
    if obs.progress is None or pod.running is None:
        return None
    if obs.progress.loading:
        # No step done by this trainer yet: it is downloading or loading the model, which
        # can take longer than any stall timeout. Only the start-up budget applies here.
        budget = spec.run_policy.first_step_timeout_seconds
        started = pod.running.started_at or status.attempt_start_time
        if budget is None or started is None:
            return None
        return started + timedelta(seconds=budget)
    timeout = spec.run_policy.stall_timeout_seconds
    if timeout is None:
        return None
    return last_activity(pod, obs, status) + timedelta(seconds=timeout)


def _disruption(pod: PodObservation) -> tuple[str, str] | None:
    stopped = kueue.termination_target(pod)  # Kueue evicted (preempted) the pod's Workload
    if stopped is not None:
        return stopped
    condition = pod.condition_true("DisruptionTarget")
    if condition is not None:
        reason = DISRUPTION_REASONS.get(condition.reason or "", "Disrupted")
        if pod.pod_reason == "Evicted":
            reason = "Evicted"  # kubelet node-pressure eviction also reads TerminationByKubelet
        detail = condition.message or condition.reason or "DisruptionTarget"
        return reason, f"pod {pod.name} was disrupted ({reason}): {detail}"
    if pod.pod_reason == "Evicted":
        return "Evicted", f"pod {pod.name} was evicted: {pod.pod_message or 'no message'}"
    return None


def _trainer_says(pod: PodObservation) -> str:
    msg = pod.termination_message
    text = msg.get("message") if msg else None
    return f" ({one_line(text, 200)})" if isinstance(text, str) and text.strip() else ""


def _default_ending(pod: PodObservation, obs: Observation) -> Ended:
    """How an ended (or ending) pod counts when no failurePolicy rule matched."""
    term = pod.terminated
    code = term.exit_code if term else None
    disruption = _disruption(pod)
    if disruption is not None:
        return Ended("interruption", disruption[0], disruption[1], code)
    stopped_by_sigterm = term is not None and (
        pod.outcome == contract.OUTCOME_PREEMPTED or (code == contract.EXIT_PREEMPTED and pod.outcome is None)
    )
    if pod.deleting and (term is None or stopped_by_sigterm):
        return Ended("interruption", "PodDeleted", f"pod {pod.name} was deleted while the job needed it", code)
    if term is None and node_lost(pod, obs):
        where = f"node {pod.node_name}" if pod.node_name else "its node"
        return Ended("interruption", "NodeLost", f"pod {pod.name} lost {where} (pod phase {pod.phase})")
    if term is None:
        # The pod failed before the trainer ran (kubelet admission, e.g. OutOfnvidia.com/gpu).
        reason = pod.pod_reason or "PodFailed"
        return Ended("interruption", reason, f"pod {pod.name} failed: {pod.pod_message or reason}")
    if stopped_by_sigterm:
        return Ended(
            "interruption", "Preempted", f"trainer in pod {pod.name} stopped on SIGTERM{_trainer_says(pod)}", code
        )
    if term.reason == "OOMKilled":
        return Ended("failure", "OOMKilled", f"trainer in pod {pod.name} ran out of memory (exit code {code})", code)
    if pod.outcome == contract.OUTCOME_CONFIG_ERROR or code == contract.EXIT_CONFIG_ERROR:
        return Ended(
            "fatal",
            "InvalidConfiguration",
            f"trainer in pod {pod.name} rejected its configuration (exit code {code}){_trainer_says(pod)}",
            code,
        )
    return Ended(
        "failure",
        "NonZeroExitCode",
        f"trainer in pod {pod.name} exited with code {code} ({term.reason or 'Error'}){_trainer_says(pod)}",
        code,
    )


def _apply_failure_policy(pod: PodObservation, spec: TrainingJobSpec, default: Ended) -> Ended:
    rules = spec.failure_policy.rules if spec.failure_policy else []
    match = match_failure_policy(rules, default.exit_code, pod.true_condition_types)
    if match is None:
        return default
    index, rule = match
    note = f"{default.message}; failurePolicy.rules[{index}] says {rule.action}"
    if rule.action == "Fail":
        return Ended("fatal", "FailurePolicy", note, default.exit_code)
    kind: Literal["interruption", "failure"] = "interruption" if rule.action == "Resume" else "failure"
    return Ended(kind, default.reason, note, default.exit_code)


def _is_ending(pod: PodObservation, obs: Observation) -> bool:
    return (
        pod.terminated is not None
        or pod.phase in ("Succeeded", "Failed")
        or pod.deleting
        or _disruption(pod) is not None
        or node_lost(pod, obs)
    )


def _in_flight(pod: PodObservation, obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> Outcome:
    if not pod.scheduled and pod.node_name is None:
        if pod.gated:  # waiting for a queue (Kueue), not a node: never Starting, never timed out
            return InFlight("Queued", *kueue.gate_message(pod, obs.queue_message))
        if pod.unschedulable_message:
            return InFlight("Queued", "Unschedulable", one_line(pod.unschedulable_message))
        return InFlight("Queued", "PodPending", f"pod {pod.name} is waiting to be scheduled")
    if pod.running is not None and pod.phase == "Running":
        stalled = stall_at(pod, obs, spec, status)
        if stalled is not None and obs.now >= stalled:
            if obs.progress is not None and obs.progress.loading:
                detail = (f"completed no first step within {spec.run_policy.first_step_timeout_seconds}s "
                          "of starting (runPolicy.firstStepTimeoutSeconds)")
            else:
                detail = (f"completed no step for {spec.run_policy.stall_timeout_seconds}s "
                          "(runPolicy.stallTimeoutSeconds)")
            return Ended("interruption", "Stalled", f"trainer in pod {pod.name} {detail}")
        return InFlight("Running", None, f"attempt {pod.attempt} is training in pod {pod.name} on {pod.node_name}")
    waiting = pod.waiting
    reason = (waiting.reason if waiting else None) or "ContainerCreating"
    detail = one_line(waiting.message) if waiting and waiting.message else f"pod {pod.name} is starting"
    if reason in START_ERRORS:
        timeout_at = start_timeout_at(spec, status, kueue.admitted_at([pod]))
        if timeout_at is not None and obs.now >= timeout_at:
            return Ended(
                "fatal",
                reason,
                f"pod {pod.name} could not start within {spec.run_policy.start_timeout_seconds}s: {reason}: {detail}",
            )
    return InFlight("Starting", reason, detail)


def classify_pod(pod: PodObservation, obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> Outcome:
    """Classify the current attempt's pod."""
    term = pod.terminated
    if (term is not None and term.exit_code == 0) or (pod.phase == "Succeeded" and term is None):
        return Completed(f"attempt {pod.attempt} completed in pod {pod.name}{_trainer_says(pod)}")
    if _is_ending(pod, obs):
        return _apply_failure_policy(pod, spec, _default_ending(pod, obs))
    return _in_flight(pod, obs, spec, status)
