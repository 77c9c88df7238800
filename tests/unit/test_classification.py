"""One test (at least) per row of the classification table in docs/CONTRACTS.md, through decide()."""

from __future__ import annotations

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

from finetune_operator.core import CreatePod, DeletePod, PodCondition, ProgressSample


# --- container exited 0 on the last attempt -> Succeeded -------------------------------------
def test_exit_zero_succeeds_with_completion_time_and_final_progress():
    status = running_job()
    report = {"outcome": "completed", "step": 1000, "maxSteps": 1000, "loss": 0.42, "checkpoint": "/c/ck-1000",
              "checkpointStep": 1000, "message": "done"}
    d = step(status, [exited_pod(1, 0, report=report, finished=at(50))], now=at(60))
    assert d.status.phase == "Succeeded"
    assert d.status.reason == "Completed"
    assert d.status.completion_time == at(60)
    assert d.status.progress.display == "1000/1000"
    assert d.status.progress.loss == 0.42
    assert d.status.checkpoint.step == 1000 and d.status.checkpoint.path == "/c/ck-1000"
    assert d.status.failures == 0 and d.status.resumes == 0
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Completed")]
    assert d.status.condition("Succeeded").status == "True"
    assert not d.creates


def test_exit_zero_of_an_old_attempt_does_not_complete_the_job():
    status = running_job()
    # attempt 1 ended (interrupted), attempt 2 is the current one; a stale Succeeded pod 1 means nothing
    resumed = step(status, [exited_pod(1, 143, report={"outcome": "preempted"})], now=at(10)).status
    again = step(resumed, [exited_pod(1, 143, report={"outcome": "preempted"})], now=at(100))
    assert again.status.attempt == 2 and again.status.phase == "Queued"


# --- DisruptionTarget / Evicted -> interruption ------------------------------------------------
@pytest.mark.parametrize(
    "condition_reason, expected",
    [
        ("EvictionByEvictionAPI", "Evicted"),
        ("PreemptionByScheduler", "Preempted"),
        ("DeletionByTaintManager", "NodeLost"),
        ("TerminationByKubelet", "NodeShutdown"),
        ("SomethingNew", "Disrupted"),
    ],
)
def test_disruption_target_is_an_interruption(condition_reason, expected):
    status = running_job()
    pod = running_pod(1, conditions=disruption(condition_reason), deleting=True)
    d = step(status, [pod], now=at(30))
    assert d.status.phase == "Resuming"
    assert d.status.reason == expected
    assert d.status.resumes == 1 and d.status.failures == 0 and d.status.restarts == 1
    assert d.status.last_interruption.reason == expected
    assert d.status.last_interruption.pod == name(1)
    assert d.status.last_interruption.attempt == 1
    assert [(e.type, e.reason) for e in d.events] == [("Warning", expected)]


def test_evicted_status_reason_is_an_interruption_even_after_exit():
    status = running_job()
    pod = exited_pod(1, 137, pod_reason="Evicted", pod_message="The node was low on memory.")
    d = step(status, [pod], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.resumes, d.status.failures) == ("Resuming", "Evicted", 1, 0)
    assert d.status.last_interruption.exit_code == 137


def test_live_pod_with_disruption_target_is_interrupted_and_deleted():
    status = running_job()
    pod = running_pod(1, conditions=disruption("PreemptionByScheduler"))
    d = step(status, [pod], now=at(30))
    assert d.status.phase == "Resuming"
    assert DeletePod(name(1), "Preempted", None, "uid-1") in d.actions


# --- node gone / NotReady / pod phase Unknown / pod deleted -----------------------------------
def test_missing_node_is_node_lost_and_the_pod_is_force_deleted():
    status = running_job()
    d = step(status, [running_pod(1, node_name="node-a")], now=at(30), unready_nodes=["node-a"])
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Resuming", "NodeLost", 1)
    assert DeletePod(name(1), "NodeLost", 0, "uid-1") in d.actions


def test_not_ready_node_counts_only_after_the_timeout():
    status = running_job()
    kwargs = dict(unready_nodes={"node-a": at(10)}, node_lost_after_seconds=40)
    early = step(status, [running_pod(1)], now=at(30), **kwargs)
    assert early.status.phase == "Running"
    assert early.requeue_after == pytest.approx(20)
    late = step(status, [running_pod(1)], now=at(50), **kwargs)
    assert (late.status.phase, late.status.reason) == ("Resuming", "NodeLost")


def test_pod_phase_unknown_is_node_lost():
    status = running_job()
    pod = running_pod(1)
    unknown = type(pod)(**{**pod.__dict__, "phase": "Unknown"})
    d = step(status, [unknown], now=at(30))
    assert (d.status.phase, d.status.reason) == ("Resuming", "NodeLost")


def test_pod_deleted_while_wanted_is_an_interruption():
    status = running_job()
    d = step(status, [running_pod(1, deleting=True)], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Resuming", "PodDeleted", 1)


def test_pod_gone_after_it_was_seen_running_is_an_interruption():
    status = running_job()
    d = step(status, [], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Resuming", "PodDeleted", 1)
    assert not d.creates  # backoff first


def test_deleted_pod_that_exited_143_counts_as_pod_deleted_once():
    status = running_job()
    pod = exited_pod(1, 143, report={"outcome": "preempted", "checkpoint": "/c/ck-400", "checkpointStep": 400},
                     deleting=True)
    d = step(status, [pod], now=at(30))
    assert (d.status.reason, d.status.resumes) == ("PodDeleted", 1)
    assert d.status.checkpoint.step == 400


# --- trainer stopped after SIGTERM with its checkpoint -> interruption --------------------------
def test_preempted_termination_message_is_an_interruption():
    status = running_job()
    report = {"outcome": "preempted", "step": 412, "checkpoint": "/ck/checkpoint-400", "checkpointStep": 400,
              "message": "SIGTERM"}
    d = step(status, [exited_pod(1, 143, report=report, finished=at(25))], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.resumes, d.status.failures) == ("Resuming", "Preempted", 1, 0)
    assert d.status.last_interruption.exit_code == 143
    assert d.status.checkpoint.step == 400 and d.status.checkpoint.time == at(25)


def test_exit_143_without_message_is_an_interruption():
    status = running_job()
    d = step(status, [exited_pod(1, 143)], now=at(30))
    assert (d.status.phase, d.status.reason) == ("Resuming", "Preempted")


# --- stall ------------------------------------------------------------------------------------
def test_stall_resumes_and_deletes_the_pod():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 60})
    sample = ProgressSample(step=10, total_steps=1000, heartbeat_time=at(5))
    status = running_job(spec, sample=sample)
    still = step(status, [running_pod(1)], now=at(50), spec=spec, progress=sample)
    assert still.status.phase == "Running"
    assert still.requeue_after == pytest.approx(15)  # last heartbeat at 5s + 60s
    stalled = step(status, [running_pod(1)], now=at(70), spec=spec, progress=sample)
    assert (stalled.status.phase, stalled.status.reason, stalled.status.resumes) == ("Resuming", "Stalled", 1)
    assert DeletePod(name(1), "Stalled", None, "uid-1") in stalled.actions


def test_step_advance_postpones_the_stall():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 60})
    status = running_job(spec, sample=ProgressSample(step=10))
    advanced = step(status, [running_pod(1)], now=at(50), spec=spec, progress=ProgressSample(step=11)).status
    assert advanced.progress.update_time == at(50)
    d = step(advanced, [running_pod(1)], now=at(100), spec=spec, progress=ProgressSample(step=11))
    assert d.status.phase == "Running"
    assert d.requeue_after == pytest.approx(10)


def test_unknown_progress_is_not_a_stall():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 60})
    status = running_job(spec)
    d = step(status, [running_pod(1)], now=at(10_000), spec=spec, progress=None)
    assert d.status.phase == "Running"


# --- OOMKilled / non-zero exit / config error -------------------------------------------------
def test_oom_killed_is_a_failure():
    status = running_job()
    d = step(status, [exited_pod(1, 137, reason="OOMKilled")], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.failures, d.status.resumes) == ("Resuming", "OOMKilled", 1, 0)
    assert d.status.last_interruption.exit_code == 137


def test_non_zero_exit_is_a_failure():
    status = running_job()
    d = step(status, [exited_pod(1, 1, report={"outcome": "error", "message": "boom"})], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.failures) == ("Resuming", "NonZeroExitCode", 1)
    assert "boom" in d.status.message and "code 1" in d.status.message


@pytest.mark.parametrize("report", [{"outcome": "config_error", "message": "no dataset"}, None])
def test_config_error_fails_at_once(report):
    status = running_job()
    d = step(status, [exited_pod(1, 78, report=report)], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.failures) == ("Failed", "InvalidConfiguration", 0)
    assert d.status.completion_time == at(30)


def test_pod_failed_without_exit_code_is_an_interruption():
    status = running_job()
    pod = running_pod(1)
    rejected = type(pod)(**{**pod.__dict__, "phase": "Failed", "container": None, "pod_reason": "OutOfnvidia.com/gpu"})
    d = step(status, [rejected], now=at(30))
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Resuming", "OutOfnvidia.com/gpu", 1)


# --- failurePolicy ----------------------------------------------------------------------------
def _policy(*rules):
    return make_spec(failurePolicy={"rules": list(rules)})


def test_failure_policy_resume_counts_as_resume():
    spec = _policy({"action": "Resume", "onExitCodes": {"operator": "In", "values": [3]}})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 3)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.resumes, d.status.failures) == ("Resuming", 1, 0)
    assert "failurePolicy.rules[0] says Resume" in d.status.message


def test_failure_policy_fail_fails_at_once():
    spec = _policy({"action": "Fail", "onExitCodes": {"operator": "In", "values": [2, 3]}})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 2)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason, d.status.failures) == ("Failed", "FailurePolicy", 0)


def test_failure_policy_count_makes_a_disruption_a_failure():
    spec = _policy({"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 143, conditions=disruption())], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason, d.status.failures, d.status.resumes) == ("Resuming", "Evicted", 1, 0)


def test_failure_policy_not_in_and_first_match_wins():
    spec = _policy(
        {"action": "Fail", "onExitCodes": {"operator": "NotIn", "values": [1, 143]}},
        {"action": "Resume", "onExitCodes": {"operator": "In", "values": [1]}},
    )
    status = running_job(spec)
    resumed = step(status, [exited_pod(1, 1)], now=at(30), spec=spec)
    assert (resumed.status.phase, resumed.status.resumes) == ("Resuming", 1)
    failed = step(status, [exited_pod(1, 5)], now=at(30), spec=spec)
    assert (failed.status.phase, failed.status.reason) == ("Failed", "FailurePolicy")


def test_failure_policy_on_pod_condition_fail():
    spec = _policy({"action": "Fail", "onPodConditions": [{"type": "DisruptionTarget"}]})
    status = running_job(spec)
    d = step(status, [running_pod(1, conditions=disruption("PreemptionByScheduler"))], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason) == ("Failed", "FailurePolicy")
    assert DeletePod(name(1), "JobFinished", None, "uid-1") in d.actions


def test_condition_that_is_false_does_not_match():
    spec = _policy({"action": "Fail", "onPodConditions": [{"type": "DisruptionTarget"}]})
    status = running_job(spec)
    pod = exited_pod(1, 1, conditions=(PodCondition("DisruptionTarget", "False"),))
    d = step(status, [pod], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason) == ("Resuming", "NonZeroExitCode")


# --- image pull / container config errors past startTimeoutSeconds ----------------------------
@pytest.mark.parametrize(
    "waiting",
    ["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"],
)
def test_start_errors_fail_after_the_start_timeout(waiting):
    spec = make_spec(runPolicy={"startTimeoutSeconds": 120})
    queued = step(None, now=T0, spec=spec).status
    early = step(queued, [starting_pod(1, waiting, "pull access denied")], now=at(60), spec=spec)
    assert (early.status.phase, early.status.reason) == ("Starting", waiting)
    assert early.requeue_after == pytest.approx(60)
    late = step(early.status, [starting_pod(1, waiting, "pull access denied")], now=at(121), spec=spec)
    assert (late.status.phase, late.status.reason) == ("Failed", waiting)
    assert "pull access denied" in late.status.message
    assert DeletePod(name(1), "JobFinished", None, "uid-1") in late.actions


def test_slow_container_creation_is_not_a_start_error():
    spec = make_spec(runPolicy={"startTimeoutSeconds": 120})
    queued = step(None, now=T0, spec=spec).status
    d = step(queued, [starting_pod(1, "ContainerCreating")], now=at(500), spec=spec)
    assert (d.status.phase, d.status.reason) == ("Starting", "ContainerCreating")


# --- activeDeadlineSeconds ------------------------------------------------------------------
def test_active_deadline_fails_and_deletes_live_pods():
    spec = make_spec(runPolicy={"activeDeadlineSeconds": 3600})
    status = running_job(spec)
    before = step(status, [running_pod(1)], now=at(3000), spec=spec)
    assert before.status.phase == "Running" and before.requeue_after == pytest.approx(600)
    d = step(status, [running_pod(1)], now=at(3600), spec=spec)
    assert (d.status.phase, d.status.reason) == ("Failed", "DeadlineExceeded")
    assert DeletePod(name(1), "DeadlineExceeded", None, "uid-1") in d.actions


def test_success_beats_a_passed_deadline():
    spec = make_spec(runPolicy={"activeDeadlineSeconds": 10})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 0)], now=at(100), spec=spec)
    assert d.status.phase == "Succeeded"


# --- backoffLimit / maxResumes exhausted ----------------------------------------------------
def test_backoff_limit_exceeded_keeps_the_exit_code():
    spec = make_spec(runPolicy={"backoffLimit": 0})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 2)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason, d.status.failures) == ("Failed", "BackoffLimitExceeded", 1)
    assert d.status.last_interruption.exit_code == 2
    assert d.status.condition("Failed").status == "True"


def test_max_resumes_exceeded():
    spec = make_spec(runPolicy={"maxResumes": 0})
    status = running_job(spec)
    d = step(status, [running_pod(1, deleting=True)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Failed", "MaxResumesExceeded", 1)


def test_auto_resume_false_fails_on_interruption():
    spec = make_spec(runPolicy={"autoResume": False})
    status = running_job(spec)
    d = step(status, [running_pod(1, conditions=disruption())], now=at(30), spec=spec)
    assert (d.status.phase, d.status.reason) == ("Failed", "Interrupted")
    assert "(Evicted)" in d.status.message and "autoResume is false" in d.status.message


def test_auto_resume_false_still_retries_failures():
    spec = make_spec(runPolicy={"autoResume": False})
    status = running_job(spec)
    d = step(status, [exited_pod(1, 1)], now=at(30), spec=spec)
    assert (d.status.phase, d.status.failures) == ("Resuming", 1)


# --- pending / unschedulable / starting -----------------------------------------------------
def test_unschedulable_pod_is_queued_with_the_scheduler_message():
    queued = step(None).status
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    d = step(queued, [pending_pod(1, unschedulable=msg)], now=at(5))
    assert (d.status.phase, d.status.reason, d.status.message) == ("Queued", "Unschedulable", msg)
    assert not d.events  # still Queued: no transition


def test_scheduled_pod_waiting_is_starting():
    queued = step(None).status
    d = step(queued, [starting_pod(1)], now=at(5))
    assert (d.status.phase, d.status.reason) == ("Starting", "ContainerCreating")
    assert d.events == ()  # a quiet phase: the pod's own Events say it


def test_queued_attempt_whose_pod_is_not_seen_is_created_again_without_counting():
    queued = step(None).status
    d = step(queued, [], now=at(5))
    assert d.status == queued.model_copy(update={"conditions": d.status.conditions})
    assert d.creates == (CreatePod(1),)
    assert (d.status.failures, d.status.resumes) == (0, 0)


# --- model loading is not a stall; the first-step budget ------------------------------------
def test_loading_trainer_is_not_stalled_however_long_it_takes():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 5})
    loading = ProgressSample(step=0, loading=True)
    status = running_job(spec, sample=loading)
    d = step(status, [running_pod(1)], now=at(3_600), spec=spec, progress=loading)
    assert d.status.phase == "Running" and d.requeue_after is None


def test_first_step_budget_restarts_a_trainer_that_never_steps():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 5, "firstStepTimeoutSeconds": 600})
    loading = ProgressSample(step=0, loading=True)
    status = running_job(spec, sample=loading)
    still = step(status, [running_pod(1)], now=at(599), spec=spec, progress=loading)
    assert still.status.phase == "Running" and still.requeue_after == pytest.approx(1)
    d = step(status, [running_pod(1)], now=at(600), spec=spec, progress=loading)
    assert (d.status.phase, d.status.reason) == ("Resuming", "Stalled")
    assert "runPolicy.firstStepTimeoutSeconds" in d.status.message


def test_stall_clock_starts_at_the_first_step():
    spec = make_spec(runPolicy={"stallTimeoutSeconds": 60})
    stepping = ProgressSample(step=1, heartbeat_time=at(500))  # loading took 500 s
    status = running_job(spec, sample=ProgressSample(step=0, loading=True))
    d = step(status, [running_pod(1)], now=at(520), spec=spec, progress=stepping)
    # counted from the first step seen (520 s), not from the container start (0 s)
    assert d.status.phase == "Running" and d.requeue_after == pytest.approx(60)
