"""Attempts, backoff, suspension, admission, terminal phases, TTL, conditions, Events, progress."""

from __future__ import annotations

from datetime import timedelta

import pytest
from jobkit import (
    T0,
    at,
    disruption,
    exited_pod,
    make_spec,
    name,
    pending_pod,
    running_job,
    running_pod,
    starting_pod,
    step,
)

from finetune_operator.api import TrainingJobStatus
from finetune_operator.core import (
    CreatePod,
    DeleteJob,
    DeletePod,
    ProgressSample,
    backoff_seconds,
    status_changed_materially,
)
from finetune_operator.core.decide import transition_event


# --- a new job ------------------------------------------------------------------------------
def test_new_job_writes_attempt_one_and_asks_for_its_pod():
    d = step(None, now=at(3))
    s = d.status
    assert (s.phase, s.reason, s.attempt) == ("Queued", "CreatingPod", 1)
    assert s.start_time == at(3) and s.attempt_start_time == at(3)
    assert s.observed_generation == 1
    assert d.creates == (CreatePod(1),)
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "CreatingPod")]
    assert d.requeue_after is None


def test_decide_again_on_its_own_output_is_quiet():
    first = step(None)
    again = step(first.status)
    assert again.status == first.status
    assert again.events == ()
    assert again.creates == (CreatePod(1),)  # the same attempt again: AlreadyExists = adopt


def test_running_transition_is_a_condition_not_an_event():
    queued = step(None).status
    d = step(queued, [running_pod(1)], now=at(20))
    assert d.status.phase == "Running" and d.status.reason is None
    assert d.events == ()  # quiet phase: the pod's Started Event and this condition say it
    assert d.status.condition("Running").status == "True"


def test_only_routine_steps_into_starting_or_running_are_quiet():
    new = step(None)
    assert [(e.type, e.reason) for e in new.events] == [("Normal", "CreatingPod")]
    running = step(new.status, [running_pod(1)], now=at(20)).status
    done = step(running, [exited_pod(1, 0)], now=at(30))
    assert [(e.type, e.reason) for e in done.events] == [("Normal", "Completed")]
    recovered = running.model_copy(update={"phase": "Running", "reason": "StatusRecovered"})
    assert transition_event(new.status, recovered).type == "Warning"
    assert transition_event(new.status, running) is None


# --- backoff --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "restarts, expected", [(0, 0), (1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (50, 300), (10_000, 300)]
)
def test_backoff_is_exponential_and_capped(restarts, expected):
    assert backoff_seconds(make_spec().run_policy, restarts) == expected


def test_resuming_waits_for_the_backoff_then_starts_the_next_attempt():
    status = running_job()
    interrupted = step(status, [exited_pod(1, 1)], now=at(100))
    assert interrupted.status.phase == "Resuming"
    assert interrupted.requeue_after == pytest.approx(10)
    waiting = step(interrupted.status, [exited_pod(1, 1)], now=at(105))
    assert waiting.status == interrupted.status and waiting.actions == ()
    assert waiting.requeue_after == pytest.approx(5)
    resumed = step(interrupted.status, [exited_pod(1, 1)], now=at(110))
    assert (resumed.status.phase, resumed.status.attempt, resumed.status.failures) == ("Queued", 2, 1)
    assert resumed.status.attempt_start_time == at(110) and resumed.status.start_time == T0
    assert resumed.creates == (CreatePod(2),)
    assert [(e.type, e.reason) for e in resumed.events] == [("Normal", "CreatingPod")]


def test_second_restart_waits_twice_as_long():
    status = running_job()
    s = step(status, [exited_pod(1, 1)], now=at(100)).status
    s = step(s, [exited_pod(1, 1)], now=at(110)).status
    s = step(s, [exited_pod(1, 1), running_pod(2, started=at(111))], now=at(111)).status
    d = step(s, [exited_pod(1, 1), exited_pod(2, 1)], now=at(200))
    assert (d.status.phase, d.status.failures, d.status.restarts) == ("Resuming", 2, 2)
    assert d.requeue_after == pytest.approx(20)


def test_resuming_waits_for_the_old_pod_to_be_gone():
    status = running_job()
    interrupted = step(status, [running_pod(1, conditions=disruption(), deleting=True)], now=at(100)).status
    d = step(interrupted, [running_pod(1, conditions=disruption(), deleting=True)], now=at(1000))
    assert d.status.phase == "Resuming" and not d.creates
    assert not d.deletes  # already being deleted
    gone = step(interrupted, [], now=at(1000))
    assert gone.creates == (CreatePod(2),)


def test_resuming_deletes_a_live_old_pod():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 30})
    status = running_job(spec, sample=ProgressSample(step=3))
    stalled = step(status, [running_pod(1)], now=at(31), spec=spec, progress=ProgressSample(step=3))
    again = step(stalled.status, [running_pod(1)], now=at(500), spec=spec)
    assert again.creates == ()
    assert again.deletes == (DeletePod(name(1), "Stalled", None, "uid-1"),)


def test_zero_backoff_starts_the_next_attempt_in_the_same_decision():
    spec = make_spec(runPolicy={"backoffSeconds": 0})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 1)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.attempt, d.status.failures) == ("Queued", 2, 1)
    assert d.creates == (CreatePod(2),)
    assert [e.reason for e in d.events] == ["NonZeroExitCode", "CreatingPod"]


def test_the_attempt_after_the_last_allowed_one_fails_the_job_instead_of_wedging_it():
    from finetune_operator.api.models import MAX_ATTEMPTS
    spec = make_spec(runPolicy={"backoffSeconds": 0, "maxResumes": 10_000})
    status = running_job(spec).model_copy(update={"attempt": MAX_ATTEMPTS})
    d = step(status, [], now=at(30), spec=spec)  # its pod vanished: an interruption
    assert (d.status.phase, d.status.reason, d.status.attempt) == ("Failed", "AttemptLimitExceeded", MAX_ATTEMPTS)
    assert d.creates == ()


def test_checkpoint_is_mentioned_when_resuming():
    status = running_job()
    report = {"outcome": "preempted", "checkpoint": "/ck/checkpoint-400", "checkpointStep": 400}
    s = step(status, [exited_pod(1, 143, report=report)], now=at(30)).status
    d = step(s, [exited_pod(1, 143, report=report)], now=at(60))
    assert "resuming from checkpoint step 400" in d.status.message


# --- never two live attempts ------------------------------------------------------------------
def test_no_create_while_another_attempts_pod_is_live():
    status = running_job()
    s = step(status, [exited_pod(1, 1)], now=at(30)).status
    s = step(s, [exited_pod(1, 1)], now=at(60)).status  # Queued attempt 2
    stray = running_pod(1)  # e.g. a stale cache shows attempt 1 alive
    d = step(s, [stray], now=at(61))
    assert d.creates == ()
    assert d.deletes == (DeletePod(name(1), "Superseded", None, "uid-1"),)


def test_pod_of_a_newer_attempt_is_adopted():
    status = running_job()
    d = step(status, [exited_pod(1, 1), running_pod(3)], now=at(30))
    assert d.status.attempt == 3 and d.status.phase == "Running"
    assert d.creates == ()


# --- suspend ----------------------------------------------------------------------------------
def test_suspend_stops_the_pod_then_reports_suspended():
    spec = make_spec(suspend=True)
    status = running_job()
    stopping = step(status, [running_pod(1)], now=at(30), spec=spec)
    assert stopping.status.phase == "Running"
    assert stopping.deletes == (DeletePod(name(1), "Suspended", None, "uid-1"),)
    assert stopping.status.condition("Suspended").reason == "Suspending"
    terminating = step(stopping.status, [running_pod(1, deleting=True)], now=at(31), spec=spec)
    assert terminating.status.phase == "Running" and terminating.deletes == ()
    report = {"outcome": "preempted", "checkpoint": "/ck/checkpoint-40", "checkpointStep": 40}
    done = step(terminating.status, [exited_pod(1, 143, report=report)], now=at(40), spec=spec)
    assert (done.status.phase, done.status.resumes, done.status.failures) == ("Suspended", 0, 0)
    assert done.status.condition("Suspended").status == "True"
    assert done.status.checkpoint.step == 40
    assert [(e.type, e.reason) for e in done.events] == [("Normal", "Suspended")]


def test_unsuspend_starts_a_new_attempt_without_counting():
    suspended_spec = make_spec(suspend=True)
    status = running_job()
    s = step(status, [exited_pod(1, 143)], now=at(30), spec=suspended_spec).status
    assert s.phase == "Suspended"
    d = step(s, [exited_pod(1, 143)], now=at(40))
    assert (d.status.phase, d.status.attempt, d.status.resumes, d.status.failures) == ("Queued", 2, 0, 0)
    assert d.creates == (CreatePod(2),)


def test_job_created_suspended_creates_no_pod():
    d = step(None, spec=make_spec(suspend=True))
    assert (d.status.phase, d.status.attempt, d.status.start_time) == ("Suspended", 0, None)
    assert d.creates == ()
    resumed = step(d.status, now=at(10))
    assert (resumed.status.attempt, resumed.creates) == (1, (CreatePod(1),))


def test_suspend_during_backoff():
    status = running_job()
    s = step(status, [exited_pod(1, 1)], now=at(30)).status
    d = step(s, [exited_pod(1, 1)], now=at(31), spec=make_spec(suspend=True))
    assert d.status.phase == "Suspended" and d.status.failures == 1


def test_success_while_suspending_is_success():
    status = running_job()
    d = step(status, [exited_pod(1, 0)], now=at(30), spec=make_spec(suspend=True))
    assert d.status.phase == "Succeeded"


def test_deadline_is_not_enforced_while_suspended():
    spec = make_spec(suspend=True, runPolicy={"activeDeadlineSeconds": 10})
    status = running_job()
    d = step(status, [], now=at(100), spec=spec)
    assert d.status.phase == "Suspended"


# --- admission --------------------------------------------------------------------------------
def test_invalid_spec_fails_without_pods():
    d = step(None, spec=None, spec_error="spec.lora.r: Input should be less than or equal to 1024")
    assert (d.status.phase, d.status.reason) == ("Failed", "InvalidSpec")
    assert d.status.message == "spec.lora.r: Input should be less than or equal to 1024"
    assert d.creates == ()
    admitted = d.status.condition("Admitted")
    assert (admitted.status, admitted.reason) == ("False", "InvalidSpec")


PRIVILEGED = {"template": {"hostNetwork": True, "containerSecurityContext": {"privileged": True}}}


def test_privileged_template_is_refused():
    d = step(None, spec=make_spec(**PRIVILEGED))
    assert (d.status.phase, d.status.reason) == ("Failed", "PrivilegedTemplate")
    assert "template.hostNetwork" in d.status.message
    assert "template.containerSecurityContext.privileged" in d.status.message
    assert d.status.condition("Admitted").status == "False"
    assert d.creates == ()


def test_privileged_template_runs_when_allowed():
    d = step(None, spec=make_spec(**PRIVILEGED), allow_privileged=True)
    assert d.status.phase == "Queued" and d.creates == (CreatePod(1),)


# --- terminal phases, TTL ------------------------------------------------------------------
def test_terminal_phase_never_changes():
    status = running_job()
    done = step(status, [exited_pod(1, 0)], now=at(30)).status
    later = step(done, [running_pod(2)], now=at(90), spec=make_spec(suspend=True))
    assert later.status == done
    assert later.events == () and later.creates == ()
    assert later.deletes == (DeletePod(name(2), "JobFinished", None, "uid-2"),)


def test_ttl_after_finished_deletes_the_job():
    spec = make_spec(runPolicy={"ttlSecondsAfterFinished": 60})
    status = running_job(spec)
    done = step(status, [exited_pod(1, 0)], now=at(30), spec=spec)
    assert done.requeue_after == pytest.approx(60)
    assert DeleteJob() not in done.actions
    expired = step(done.status, [exited_pod(1, 0)], now=at(90), spec=spec)
    assert DeleteJob("TTLExpired") in expired.actions


# --- conditions -----------------------------------------------------------------------------
def test_all_conditions_present_with_generation():
    d = step(None, generation=7)
    types = [c.type for c in d.status.conditions]
    assert types == ["Ready", "Reconciling", "Stalled",
                     "Admitted", "Running", "Progressing", "Resumable", "Suspended", "Succeeded", "Failed"]
    assert {c.observed_generation for c in d.status.conditions} == {7}


def test_kstatus_conditions_follow_the_phase():
    def triple(s):
        return tuple(s.condition(t).status for t in ("Ready", "Reconciling", "Stalled"))
    queued = step(None).status
    assert triple(queued) == ("False", "True", "False")
    running = step(queued, [running_pod(1)], now=at(5)).status
    assert triple(running) == ("True", "False", "False")
    assert triple(step(running, [exited_pod(1, 0)], now=at(9)).status) == ("True", "False", "False")
    spec = make_spec(runPolicy={"backoffLimit": 0})
    failed = step(running_job(spec), [exited_pod(1, 3)], now=at(9), spec=spec).status
    assert failed.phase == "Failed" and triple(failed) == ("False", "False", "True")
    stalled = failed.condition("Stalled")
    assert (stalled.reason, stalled.message) == (failed.reason, failed.message)


def test_last_transition_time_moves_only_on_flip():
    queued = step(None, now=T0).status
    running = step(queued, [running_pod(1)], now=at(50)).status
    assert running.condition("Running").last_transition_time == at(50)
    assert running.condition("Admitted").last_transition_time == T0
    assert running.condition("Failed").last_transition_time == T0  # reason changed, status did not
    still = step(running, [running_pod(1)], now=at(80)).status
    assert still.condition("Running").last_transition_time == at(50)


def test_progressing_needs_a_step_in_this_attempt():
    queued = step(None).status
    running = step(queued, [running_pod(1)], now=at(5)).status
    assert running.condition("Progressing").reason == "WaitingForFirstStep"
    stepping = step(running, [running_pod(1)], now=at(6), progress=ProgressSample(step=1, total_steps=10)).status
    assert stepping.condition("Progressing").status == "True"


def test_resumable_turns_false_when_resumes_are_used_up():
    spec = make_spec(runPolicy={"maxResumes": 1})
    status = running_job(spec)
    s = step(status, [running_pod(1, deleting=True)], now=at(30), spec=spec).status
    assert s.resumes == 1
    assert (s.condition("Resumable").status, s.condition("Resumable").reason) == ("False", "MaxResumesReached")


# --- progress ---------------------------------------------------------------------------------
def test_progress_is_folded_in():
    status = running_job()
    sample = ProgressSample(step=450, total_steps=1000, epoch=0.45, loss=1.25, tokens_per_second=900.0,
                            heartbeat_time=at(59))
    d = step(status, [running_pod(1)], now=at(60), progress=sample)
    p = d.status.progress
    assert (p.step, p.total_steps, p.display, p.loss, p.tokens_per_second) == (450, 1000, "450/1000", 1.25, 900.0)
    assert p.update_time == at(60) and p.heartbeat_time == at(59)
    # The first step of an attempt flips Progressing: that is material.
    assert status_changed_materially(status, d.status)


def test_progress_only_change_is_not_material():
    status = running_job(sample=ProgressSample(step=1, total_steps=10))
    d = step(status, [running_pod(1)], now=at(60), progress=ProgressSample(step=2, total_steps=10))
    assert d.status.progress.step == 2
    assert not status_changed_materially(status, d.status)
    assert status_changed_materially(status, d.status.model_copy(update={"phase": "Resuming"}))


def test_nan_loss_is_not_stored():
    status = running_job()
    d = step(status, [running_pod(1)], now=at(60), progress=ProgressSample(step=3, loss=float("nan")))
    assert d.status.progress.loss is None and d.status.progress.display == "3"


def test_checkpoint_never_moves_backwards():
    status = running_job()
    newer = exited_pod(1, 143, report={"outcome": "preempted", "checkpoint": "/c/500", "checkpointStep": 500})
    s = step(status, [newer], now=at(30)).status
    older = exited_pod(2, 143, report={"outcome": "preempted", "checkpoint": "/c/400", "checkpointStep": 400})
    d = step(s, [newer, older], now=at(60))
    assert (d.status.checkpoint.step, d.status.checkpoint.path) == (500, "/c/500")


def test_requeue_after_for_deadline_while_queued():
    spec = make_spec(runPolicy={"activeDeadlineSeconds": 100})
    d = step(None, spec=spec)
    assert d.requeue_after == pytest.approx(100)


def test_status_round_trips_through_the_api_shape():
    from finetune_operator.api import parse_status, status_to_dict

    status = running_job(sample=ProgressSample(step=4, total_steps=8, heartbeat_time=T0 + timedelta(seconds=1)))
    assert parse_status(status_to_dict(status)) == status
    again = step(parse_status(status_to_dict(status)), [running_pod(1)], now=at(5))
    assert again.events == ()


def test_pending_pod_after_start_is_queued_again_on_no_transition():
    queued = step(None).status
    d = step(queued, [pending_pod(1)], now=at(1))
    assert (d.status.phase, d.status.reason) == ("Queued", "PodPending")
    starting = step(d.status, [starting_pod(1, "ContainerCreating")], now=at(2))
    assert starting.status.phase == "Starting"


def test_empty_status_model_is_a_new_job():
    assert step(TrainingJobStatus()).status.attempt == 1


# --- where the job's files live; checkpoints followed while running; spec drift -------------
def test_status_names_the_jobs_own_directories_and_success_says_where_the_adapter_is():
    from jobkit import JOB, exited_pod

    spec = make_spec(checkpoint={"claimName": "team"})
    first = step(None, spec=spec, namespace="ns", uid="u-1").status
    assert first.output_path == f"pvc://team/trainingjobs/ns/{JOB}/u-1/output"
    assert first.checkpoint_path.endswith(f"/trainingjobs/ns/{JOB}/u-1/checkpoints")
    done = step(first, [exited_pod(1, 0, report={"outcome": "completed", "step": 5})], now=at(9), spec=spec,
                namespace="ns", uid="u-1").status
    assert done.phase == "Succeeded" and f"adapter in {first.output_path}" in done.message


def test_checkpoint_status_follows_the_running_trainer():
    from jobkit import running_pod

    from finetune_operator.core.observation import ProgressSample

    spec = make_spec(checkpoint={"claimName": "team", "mountPath": "/ck"})
    status = step(None, spec=spec).status
    sample = ProgressSample(step=120, last_checkpoint_step=100)
    d = step(status, [running_pod(1)], now=at(5), spec=spec, progress=sample)
    assert (d.status.checkpoint.step, d.status.checkpoint.path) == (100, "/ck/checkpoints/checkpoint-100")
    later = step(
        d.status, [running_pod(1)], now=at(6), spec=spec, progress=ProgressSample(step=121, last_checkpoint_step=None)
    )
    assert later.status.checkpoint.step == 100  # never moves backwards or vanishes


def test_a_run_definition_changed_behind_validation_fails_the_job_without_applying_it():
    from jobkit import JOB, running_pod

    spec = make_spec()
    status = step(step(None, spec=spec).status, [running_pod(1)], now=at(1), spec=spec).status
    assert status.phase == "Running" and status.run_fingerprint
    edited = make_spec(model="/models/another")
    d = step(status, [running_pod(1)], now=at(2), spec=edited)
    assert (d.status.phase, d.status.reason) == ("Failed", "SpecChanged")
    assert "create a new TrainingJob" in d.status.message
    assert not any(isinstance(a, CreatePod) for a in d.actions)
    assert any(isinstance(a, DeletePod) and a.name == f"{JOB}-1" for a in d.actions)
    still = step(status, [running_pod(1)], now=at(2), spec=make_spec(suspend=False, runPolicy={"backoffLimit": 7}))
    assert still.status.phase == "Running"  # editable fields are no drift
