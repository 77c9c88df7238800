"""The decision: (previous status, spec, pods, clock) -> (new status, actions, wake-up).

Level-triggered and pure. One call runs single transitions until the status stops changing, so
its output is a fixpoint: deciding again on the same facts with the new status changes nothing
and posts no new Events (CreatePod for the same attempt may repeat; the caller adopts on
AlreadyExists).

Attempt bookkeeping: `status.attempt` is raised in the status *and* CreatePod(attempt) is returned
in the same decision; the caller writes the status first, then creates the pod. A phase in
{Resuming, Suspended, Succeeded, Failed} means the current attempt is concluded and was counted.
"""

from __future__ import annotations

import re
from datetime import datetime

from .. import storage
from ..api.models import (
    DNS_LABEL_PATTERN,
    MAX_ATTEMPTS,
    TERMINAL_PHASES,
    Interruption,
    Ranks,
    TrainingJobSpec,
    TrainingJobStatus,
)
from . import kueue
from .actions import Action, CreatePod, CreateService, Decision, DeleteJob, DeletePod, Event
from .classify import Completed, Ended, InFlight, classify_pod, node_lost, node_lost_at, stall_at
from .conditions import merge_conditions, wanted_conditions
from .gang import STUCK_TERMINATING, classify_gang, gang, is_stuck, partial_gang_deadline, ready_ranks, stuck_since
from .observation import Observation, PodObservation
from .privileged import privileged_settings
from .progress import final_progress, fold_progress, latest_checkpoint, running_checkpoint
from .text import one_line
from .timing import backoff_seconds, deadline_at, resume_at, seconds_until, start_timeout_at, ttl_at

IN_FLIGHT_PHASES = frozenset({"Queued", "Starting", "Running"})
WARNING_PHASES = frozenset({"Failed", "Resuming"})
WARNING_REASONS = frozenset({"StatusRecovered"})
# Reaching these posts no Normal Event: the pod's own Events (Scheduled, Started) and the job's
# conditions already say it, and two Events per job were 2 of its 9.6 API writes
# (docs/ARCHITECTURE.md, "Events"). A Warning into them is still posted.
QUIET_PHASES = frozenset({"Starting", "Running"})
# Far more than any real chain (Running -> Resuming -> Queued): a safety stop, not a rule.
MAX_TRANSITIONS = 8

Step = tuple[TrainingJobStatus, list[Action]]


# --- small helpers --------------------------------------------------------------------------
def live_pods(obs: Observation, *, except_attempt: int | None = None) -> list[PodObservation]:
    return [p for p in obs.pods if p.live and p.attempt != except_attempt]


def stop_pods(obs: Observation, pods: list[PodObservation], reason: str) -> list[Action]:
    """Delete live pods. Pods on lost nodes, and pods still terminating well past their grace
    period, are force-deleted: nobody will confirm their end (gang.STUCK_TERMINATING_SECONDS)."""
    actions: list[Action] = []
    for pod in pods:
        if not pod.live:
            continue
        if node_lost(pod, obs):
            actions.append(DeletePod(pod.name, reason, grace_seconds=0, uid=pod.uid or None))
        elif is_stuck(pod, obs):
            # The I/O side posts the Warning Event when it forces the deletion (a decision
            # repeats until the pod is gone; an Event here would too).
            actions.append(DeletePod(pod.name, STUCK_TERMINATING, grace_seconds=0, uid=pod.uid or None))
        elif not pod.deleting:
            actions.append(DeletePod(pod.name, reason, uid=pod.uid or None))
    return actions


def _update(status: TrainingJobStatus, **changes: object) -> TrainingJobStatus:
    if "message" in changes and changes["message"] is not None:
        changes["message"] = one_line(str(changes["message"]))
    return status.model_copy(update=changes)


def _now(obs: Observation) -> datetime:
    # Status times are stored with second precision (metav1.Time); keep them equal after a round trip.
    return obs.now.replace(microsecond=0)


def _fail(obs: Observation, status: TrainingJobStatus, reason: str, message: str) -> TrainingJobStatus:
    return _update(status, phase="Failed", reason=reason, message=message, completion_time=_now(obs))


def _start_attempt(obs: Observation, status: TrainingJobStatus, attempt: int, why: str) -> Step:
    if attempt > MAX_ATTEMPTS:  # the status schema refuses more; fail loudly instead of wedging
        return _fail(obs, status, "AttemptLimitExceeded",
                     f"attempt {attempt} would exceed the limit of {MAX_ATTEMPTS} attempts"), []
    checkpoint = status.checkpoint
    resume_note = f", resuming from checkpoint step {checkpoint.step}" if checkpoint and checkpoint.step else ""
    now = _now(obs)
    new = _update(
        status,
        phase="Queued",
        reason="CreatingPod",
        message=f"attempt {attempt}: creating {obs.gang_name(attempt)} ({why}){resume_note}",
        attempt=attempt,
        attempt_start_time=now,
        start_time=status.start_time or now,
    )
    return new, _create_or_clear_the_way(obs, attempt)


def _create_or_clear_the_way(obs: Observation, attempt: int) -> list[Action]:
    """Create the attempt's missing pods, only when no other attempt's pod is live: never two
    live attempts. A gang's Service comes first: its ranks look rank 0 up through it."""
    others = live_pods(obs, except_attempt=attempt)
    if others:
        return stop_pods(obs, others, "Superseded")
    have = gang(obs, attempt)
    creates: list[Action] = [CreatePod(attempt, rank) for rank in range(obs.workers) if rank not in have]
    return ([CreateService()] if obs.workers > 1 and creates else []) + creates


# --- the phases -----------------------------------------------------------------------------
def _conclude(
    obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus, ended: Ended, pod: PodObservation | None
) -> TrainingJobStatus:
    """Count the end of the current attempt exactly once (a gang's too) and pick Resuming or Failed."""
    policy = spec.run_policy
    record = Interruption(
        reason=ended.reason,
        message=one_line(ended.message),
        exit_code=ended.exit_code,
        pod=pod.name if pod is not None else obs.pod_name(status.attempt),
        attempt=status.attempt,
        time=_now(obs),
    )
    status = _update(status, last_interruption=record)
    if ended.kind == "fatal":
        return _fail(obs, status, ended.reason, ended.message)
    if ended.kind == "interruption":
        if not policy.auto_resume:
            return _fail(obs, status, "Interrupted", f"{ended.message}; runPolicy.autoResume is false")
        resumes = status.resumes + 1
        status = _update(status, resumes=resumes, restarts=status.failures + resumes)
        if resumes > policy.max_resumes:
            return _fail(
                obs,
                status,
                "MaxResumesExceeded",
                f"{ended.message}; interrupted {resumes} times, runPolicy.maxResumes is {policy.max_resumes}",
            )
    else:
        failures = status.failures + 1
        status = _update(status, failures=failures, restarts=failures + status.resumes)
        if failures > policy.backoff_limit:
            return _fail(
                obs,
                status,
                "BackoffLimitExceeded",
                f"{ended.message}; failed {failures} times, runPolicy.backoffLimit is {policy.backoff_limit}",
            )
    delay = backoff_seconds(policy, status.restarts)
    return _update(
        status,
        phase="Resuming",
        reason=ended.reason,
        message=f"{ended.message}; next attempt in {delay}s",
    )


def _in_flight(obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> Step:
    judged = classify_gang(obs, spec, status)
    outcome, pod = judged.outcome, judged.pod
    if judged.missing and isinstance(outcome, InFlight):
        # Written to status but not seen yet (or deleted before it ran): (re)create, idempotently.
        return status, _create_or_clear_the_way(obs, status.attempt)
    actions = stop_pods(obs, live_pods(obs, except_attempt=status.attempt), "Superseded")
    if isinstance(outcome, InFlight):
        return _update(status, phase=outcome.phase, reason=outcome.reason, message=outcome.message), actions
    if isinstance(outcome, Completed):
        return _succeed(obs, status, pod), actions
    return _conclude(obs, spec, status, outcome, pod), actions


def _succeed(obs: Observation, status: TrainingJobStatus, pod: PodObservation | None) -> TrainingJobStatus:
    report = dict(pod.termination_message) if pod is not None and pod.termination_message else {}
    step = report.get("step")
    at_step = f" at step {step}" if isinstance(step, int) and not isinstance(step, bool) else ""
    pushed = report.get("pushed")  # the trainer's push target, set once every file was stored
    pushed_to = f"; pushed to {pushed}" if isinstance(pushed, str) and pushed else ""
    return _update(
        status,
        phase="Succeeded",
        reason="Completed",
        message=f"training completed{at_step} in attempt {status.attempt}; "
        + (
            f"adapter in {status.output_path}"
            if status.output_path
            else "adapter in an emptyDir (no checkpoint.claimName): gone with the pod"
        )
        + pushed_to,
        completion_time=_now(obs),
        progress=final_progress(status.progress, report, _now(obs)),
    )


def _resume(obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> Step:
    live = live_pods(obs)
    if live:
        # The concluded attempt's pod must be gone before the next one starts.
        return status, stop_pods(obs, live, status.reason or "Resuming")
    ready_at = resume_at(spec, status)
    if ready_at is not None and obs.now < ready_at:
        return status, []
    return _start_attempt(obs, status, status.attempt + 1, f"resuming after {status.reason or 'an interruption'}")


def _suspend(obs: Observation, status: TrainingJobStatus) -> Step:
    live = live_pods(obs)
    if live:
        if status.phase is None:  # a new job must show a phase even while strays stop
            status = _update(status, phase="Queued", reason="Suspending", message="waiting for pods to stop")
        return status, stop_pods(obs, live, "Suspended")
    if status.phase == "Suspended":
        return status, []
    note = "pods stopped" if status.attempt else "no pod created"
    return _update(status, phase="Suspended", reason="Suspended", message=f"spec.suspend is true; {note}"), []


def _unsuspend(obs: Observation, status: TrainingJobStatus) -> Step:
    live = live_pods(obs)
    if live:
        return status, stop_pods(obs, live, "Superseded")
    return _start_attempt(obs, status, status.attempt + 1, "spec.suspend is false")


def _adopt_newer_attempt(obs: Observation, status: TrainingJobStatus) -> TrainingJobStatus | None:
    """A pod of a later attempt than status knows (status read stale): follow the pods."""
    newest = max((p.attempt for p in obs.pods), default=0)
    if newest <= status.attempt:
        return None
    times = [p.creation_time for p in obs.pods if p.attempt == newest and p.creation_time]
    started = min(times, default=None) or _now(obs)
    return _update(
        status,
        phase="Queued",
        reason="PodAdopted",
        message=f"attempt {newest}: found {obs.gang_name(newest)}",
        attempt=newest,
        attempt_start_time=started.replace(microsecond=0),
        start_time=status.start_time or started.replace(microsecond=0),
    )


def _create_refused(obs: Observation, status: TrainingJobStatus) -> Step | None:
    """The API server refused the current attempt's pod: say so in the status, loudly."""
    if obs.create_error is None or status.phase != "Queued":
        return None
    kind, detail = obs.create_error
    pods = obs.gang_name(status.attempt)
    if kind == "rejected":
        return _fail(obs, status, "PodRejected", f"the API server refused {pods}: {detail}"), []
    if kind == "forbidden":  # admission (quota, PriorityClass, Pod Security): may clear later
        reason, message = "PodForbidden", f"admission refused {pods} (retrying): {detail}"
    elif kind == kueue.NOT_INSTALLED:  # no pod created: it would bypass the queue's quota
        reason, message = kind, f"{detail}; no pod created until Kueue is installed (retrying)"
    elif kind == "service-conflict":
        reason = "ServiceNameConflict"
        message = (f"Service {obs.job_name} exists but is not controlled by this job; the gang's pods find each "
                   "other through it: delete or rename it to let the job start")
    else:
        reason = "PodNameConflict"
        which = pods if obs.workers == 1 else f"a pod of {pods}"
        message = f"{which} exists but is not controlled by this job ({detail}); delete it to let the job start"
    if status.reason == reason:
        return status, []
    return (_update(status, reason=reason, message=message),
            [Event("Warning", reason, one_line(message, 1000))])


def _recover_phase(obs: Observation, status: TrainingJobStatus) -> Step:
    """status.phase was unreadable (a hand edit, a newer operator's phase after a rollback)
    while an attempt is recorded: re-derive it from that attempt's pod instead of starting
    over, which would kill a healthy trainer."""
    message = f"status.phase was unreadable; recomputed from the pods of attempt {status.attempt}"
    return _update(status, phase="Queued", reason="StatusRecovered", message=message), []


def _current_attempt_completed(obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> bool:
    """Rank 0 (global rank 0, which saves the adapter) completed: the job's work is done."""
    if status.phase not in IN_FLIGHT_PHASES:
        return False
    pod = gang(obs, status.attempt).get(0)
    return pod is not None and isinstance(classify_pod(pod, obs, spec, status), Completed)


def _step(obs: Observation, status: TrainingJobStatus) -> Step:
    """One transition (or none) from `status` given the observation."""
    if status.phase in TERMINAL_PHASES:
        return status, []
    if obs.spec is None or obs.spec_error is not None:
        failed = _fail(obs, status, "InvalidSpec", obs.spec_error or "spec: missing")
        return failed, stop_pods(obs, live_pods(obs), "InvalidSpec")
    spec = obs.spec
    if spec.workers > 1 and not re.match(DNS_LABEL_PATTERN, obs.job_name):
        failed = _fail(obs, status, "InvalidSpec", f"spec.workers is {spec.workers}, so metadata.name must be a DNS "
                       f"label (it names the gang's headless Service); {obs.job_name!r} is not")
        return failed, stop_pods(obs, live_pods(obs), "InvalidSpec")
    if status.run_fingerprint is not None and status.run_fingerprint not in obs.run_fingerprints:
        failed = _fail(
            obs,
            status,
            "SpecChanged",
            "fields that define the run (image, model, dataset, method, lora, hyperparameters, resources, "
            "workers, checkpoint location) changed after the job started; the CRD refuses such edits, so this "
            "one bypassed validation. Nothing of the new definition was applied: create a new TrainingJob "
            "(checkpoint.resumeFrom can start it from this job's checkpoint)",
        )
        return failed, stop_pods(obs, live_pods(obs), "SpecChanged")
    privileged = privileged_settings(spec)
    if privileged and not obs.allow_privileged:
        failed = _fail(
            obs,
            status,
            "PrivilegedTemplate",
            f"the template asks for privileged settings ({', '.join(privileged)}) and the operator does not allow them",
        )
        return failed, stop_pods(obs, live_pods(obs), "PrivilegedTemplate")
    refused = _create_refused(obs, status)
    if refused is not None:
        return refused
    adopted = _adopt_newer_attempt(obs, status)
    if adopted is not None:
        return adopted, []
    # A trainer that finished wins over suspension and the deadline: the work is done.
    if _current_attempt_completed(obs, spec, status):
        return _in_flight(obs, spec, status)
    if spec.suspend:
        return _suspend(obs, status)
    deadline = deadline_at(spec, status)
    if deadline is not None and obs.now >= deadline:
        failed = _fail(
            obs,
            status,
            "DeadlineExceeded",
            "the job was active longer than runPolicy.activeDeadlineSeconds "
            f"({spec.run_policy.active_deadline_seconds}s)",
        )
        return failed, stop_pods(obs, live_pods(obs), "DeadlineExceeded")
    if status.phase is None and status.attempt > 0:
        return _recover_phase(obs, status)
    if status.phase is None:
        return _start_attempt(obs, status, status.attempt + 1, "new job")
    if status.phase == "Suspended":
        return _unsuspend(obs, status)
    if status.phase == "Resuming":
        return _resume(obs, spec, status)
    return _in_flight(obs, spec, status)


# --- assembling the decision ----------------------------------------------------------------
def transition_event(old: TrainingJobStatus, new: TrainingJobStatus) -> Event | None:
    """The Event of a phase change; None for a routine step into a quiet phase."""
    warning = new.phase in WARNING_PHASES or new.reason in WARNING_REASONS
    if not warning and new.phase in QUIET_PHASES:
        return None
    reason = new.reason or new.phase or "Unknown"
    text = f"{old.phase or 'New'} -> {new.phase}" + (f": {new.message}" if new.message else "")
    return Event("Warning" if warning else "Normal", reason, one_line(text, 1000))


def _dedupe(actions: list[Action]) -> tuple[Action, ...]:
    seen: list[Action] = []
    for action in actions:
        if action not in seen:
            seen.append(action)
    return tuple(seen)


def _terminal_actions(obs: Observation, status: TrainingJobStatus) -> list[Action]:
    actions = stop_pods(obs, live_pods(obs), "JobFinished")
    expires = ttl_at(obs.spec, status)
    if expires is not None and obs.now >= expires:
        actions.append(DeleteJob("TTLExpired"))
    return actions


def _wake_times(obs: Observation, status: TrainingJobStatus) -> list[datetime]:
    """Moments at which the decision could change without any new event."""
    spec = obs.spec
    if spec is None:
        return []
    if status.phase in TERMINAL_PHASES:
        return [t for t in [ttl_at(spec, status)] if t]
    times: list[datetime | None] = []
    if not spec.suspend:
        times.append(deadline_at(spec, status))
    if status.phase == "Resuming":
        times.append(resume_at(spec, status))
    if status.phase in IN_FLIGHT_PHASES:
        for rank, pod in gang(obs, status.attempt).items():
            if pod.waiting is not None:
                times.append(start_timeout_at(spec, status, kueue.admitted_at([pod])))
            if rank == 0:  # progress (and with it a stall) is read from rank 0 only
                times.append(stall_at(pod, obs, spec, status))
        times.append(partial_gang_deadline(obs, spec, status))
        if obs.workers > 1:
            times.append(classify_gang(obs, spec, status).settle_until)
    for pod in live_pods(obs):
        times.append(node_lost_at(pod, obs))
        times.append(stuck_since(pod))
    return [t for t in times if t is not None]


def requeue_after(obs: Observation, status: TrainingJobStatus) -> float | None:
    future = [seconds_until(t, obs.now) for t in _wake_times(obs, status) if t > obs.now]
    return min(future) if future else None


def _finish(obs: Observation, status: TrainingJobStatus) -> TrainingJobStatus:
    conditions = merge_conditions(
        obs.status.conditions, wanted_conditions(status, obs.spec), _now(obs), obs.generation
    )
    return _update(
        status,
        restarts=status.failures + status.resumes,
        conditions=conditions,
        observed_generation=obs.generation,
        ranks=_ranks(obs, status),
    )


def _ranks(obs: Observation, status: TrainingJobStatus) -> Ranks | None:
    if obs.spec is None:
        return status.ranks
    ready = ready_ranks(obs, status.attempt) if status.attempt else 0
    return Ranks(ready=ready, total=obs.workers, display=f"{ready}/{obs.workers}")


def _fold_reports(obs: Observation, status: TrainingJobStatus) -> TrainingJobStatus:
    progress = fold_progress(status.progress, obs.progress, _now(obs)) if obs.progress else status.progress
    checkpoint = latest_checkpoint(status.checkpoint, obs.pods)
    if obs.spec is not None:
        checkpoint = running_checkpoint(
            checkpoint, obs.progress, storage.pod_checkpoint_dir(obs.spec.checkpoint.mount_path), _now(obs)
        )
    return _update(status, progress=progress, checkpoint=checkpoint, **_storage(obs, status))


def _storage(obs: Observation, status: TrainingJobStatus) -> dict:
    """status.outputPath / checkpointPath (claim URIs) and the run fingerprint, set once."""
    out: dict = {}
    spec = obs.spec
    if spec is None:
        return out
    claim = spec.checkpoint.claim_name
    if claim and obs.uid and obs.namespace and status.output_path is None:
        out["output_path"] = storage.output_uri(claim, obs.namespace, obs.job_name, obs.uid)
        out["checkpoint_path"] = storage.checkpoints_uri(claim, obs.namespace, obs.job_name, obs.uid)
    if status.run_fingerprint is None:
        out["run_fingerprint"] = obs.run_fingerprint
    return out


def decide(obs: Observation) -> Decision:
    """Decide the job's new status and the actions that bring the world towards it."""
    if obs.status.phase in TERMINAL_PHASES:
        # Terminal phases never change; only cleanup and TTL remain.
        return Decision(obs.status, _dedupe(_terminal_actions(obs, obs.status)), requeue_after(obs, obs.status))
    status = _fold_reports(obs, obs.status)
    actions: list[Action] = []
    for _ in range(MAX_TRANSITIONS):
        new, step_actions = _step(obs, status)
        actions.extend(step_actions)
        if new.phase != status.phase and (event := transition_event(status, new)):
            actions.append(event)
        if new == status:
            break
        status = new
    if status.phase in TERMINAL_PHASES:
        actions.extend(a for a in _terminal_actions(obs, status) if a not in actions)
    final = _finish(obs, status)
    return Decision(final, _dedupe(actions), requeue_after(obs, final))
