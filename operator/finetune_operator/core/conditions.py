"""Kubernetes-style conditions derived from the status; lastTransitionTime moves only on a flip."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from ..api.models import Condition, TrainingJobSpec, TrainingJobStatus

ADMISSION_FAILURES = frozenset({"InvalidSpec", "PrivilegedTemplate"})


class Wanted(NamedTuple):
    type: str
    status: str
    reason: str
    message: str | None = None


def _steps_this_attempt(status: TrainingJobStatus) -> bool:
    progress = status.progress
    return bool(
        progress
        and progress.update_time
        and status.attempt_start_time
        and progress.update_time >= status.attempt_start_time
    )


def wanted_conditions(status: TrainingJobStatus, spec: TrainingJobSpec | None) -> list[Wanted]:
    phase = status.phase or "Queued"
    reason_or_phase = status.reason or phase
    admitted = (
        Wanted("Admitted", "False", status.reason or "InvalidSpec", status.message)
        if phase == "Failed" and status.reason in ADMISSION_FAILURES
        else Wanted("Admitted", "True", "Admitted", "the spec is valid")
    )
    running = (
        Wanted("Running", "True", "TrainerRunning", status.message)
        if phase == "Running"
        else Wanted("Running", "False", reason_or_phase)
    )
    if phase == "Running" and _steps_this_attempt(status):
        # No step numbers here: progress-only changes must not count as material status changes.
        progressing = Wanted("Progressing", "True", "StepsAdvancing", "training steps are completing")
    elif phase == "Running":
        progressing = Wanted("Progressing", "False", "WaitingForFirstStep", "no training step seen in this attempt yet")
    else:
        progressing = Wanted("Progressing", "False", reason_or_phase)
    if phase in ("Succeeded", "Failed"):
        resumable = Wanted("Resumable", "False", phase)
    elif spec is not None and not spec.run_policy.auto_resume:
        resumable = Wanted("Resumable", "False", "AutoResumeDisabled", "runPolicy.autoResume is false")
    elif spec is not None and status.resumes >= spec.run_policy.max_resumes:
        resumable = Wanted(
            "Resumable", "False", "MaxResumesReached", f"{status.resumes} of {spec.run_policy.max_resumes} resumes used"
        )
    else:
        limit = spec.run_policy.max_resumes if spec is not None else 0
        resumable = Wanted("Resumable", "True", "ResumesLeft", f"{status.resumes} of {limit} resumes used")
    if phase == "Suspended":
        suspended = Wanted("Suspended", "True", "Suspended", status.message)
    elif spec is not None and spec.suspend and phase not in ("Succeeded", "Failed"):
        suspended = Wanted("Suspended", "False", "Suspending", "waiting for the pods to stop")
    else:
        suspended = Wanted("Suspended", "False", "NotSuspended")
    succeeded = (
        Wanted("Succeeded", "True", reason_or_phase, status.message)
        if phase == "Succeeded"
        else Wanted("Succeeded", "False", phase)
    )
    failed = (
        Wanted("Failed", "True", reason_or_phase, status.message)
        if phase == "Failed"
        else Wanted("Failed", "False", phase)
    )
    return [*kstatus_conditions(status, spec),
            admitted, running, progressing, resumable, suspended, succeeded, failed]


# kstatus (Flux, kpt, cli-utils) reads Reconciling and Stalled ("abnormal-true") and, when
# neither is True, Ready; the rules and what each phase maps to: docs/CONTRACTS.md,
# "Conditions and kstatus".
WORKING_PHASES = frozenset({"Queued", "Starting", "Resuming"})
SETTLED_PHASES = frozenset({"Running", "Suspended", "Succeeded"})


def kstatus_conditions(status: TrainingJobStatus, spec: TrainingJobSpec | None) -> list[Wanted]:
    """Ready, Reconciling, Stalled: Ready once the job is where its spec asks it to be (training,
    suspended, or done), Reconciling while the operator works towards that, Stalled when it failed."""
    phase = status.phase or "Queued"
    reason_or_phase = status.reason or phase
    suspending = bool(spec is not None and spec.suspend and phase in ("Queued", "Starting", "Running", "Resuming"))
    if suspending:
        reconciling = Wanted("Reconciling", "True", "Suspending", "waiting for the pods to stop")
    elif phase in WORKING_PHASES:
        reconciling = Wanted("Reconciling", "True", reason_or_phase, status.message or f"the job is {phase}")
    else:
        reconciling = Wanted("Reconciling", "False", phase)
    if phase in SETTLED_PHASES and not suspending:
        ready = Wanted("Ready", "True", phase, _READY_MESSAGES[phase])
    elif suspending:
        ready = Wanted("Ready", "False", "Suspending", "waiting for the pods to stop")
    else:
        ready = Wanted("Ready", "False", reason_or_phase, status.message)
    stalled = (
        Wanted("Stalled", "True", reason_or_phase, status.message or "the job failed")
        if phase == "Failed"
        else Wanted("Stalled", "False", phase)
    )
    return [ready, reconciling, stalled]


_READY_MESSAGES = {
    "Running": "the trainer is running",
    "Suspended": "suspended as spec.suspend asks",
    "Succeeded": "training completed",
}


def merge_conditions(
    old: list[Condition], wanted: list[Wanted], now: datetime, generation: int | None
) -> list[Condition]:
    """New conditions in a fixed order; a condition keeps its lastTransitionTime unless status flips."""
    previous = {c.type: c for c in old}
    merged = []
    for want in wanted:
        before = previous.get(want.type)
        kept = before.last_transition_time if before is not None and before.status == want.status else None
        merged.append(
            Condition(
                type=want.type,
                status=want.status,
                reason=want.reason,
                message=want.message,
                last_transition_time=kept or now,
                observed_generation=generation,
            )
        )
    return merged
