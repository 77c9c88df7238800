"""What the API server refused, and statuses read back damaged, become clear status."""
from __future__ import annotations

from jobkit import running_job, running_pod, step

from finetune_operator.core import CreatePod, DeletePod, Event


def test_rejected_pod_fails_the_job_naming_the_field():
    queued = step(None).status
    d = step(queued, create_error=("rejected", 'spec.tolerations[0].operator: Unsupported value: "x"'))
    assert (d.status.phase, d.status.reason) == ("Failed", "PodRejected")
    assert "tolerations" in d.status.message and "ft-1" in d.status.message
    assert not any(isinstance(a, CreatePod) for a in d.actions)
    assert any(isinstance(a, Event) and a.type == "Warning" for a in d.actions)


def test_name_conflict_is_reported_once_and_keeps_the_job_queued():
    queued = step(None).status
    d = step(queued, create_error=("conflict", "no ownerReference to this TrainingJob"))
    assert (d.status.phase, d.status.reason) == ("Queued", "PodNameConflict")
    assert "ft-1 exists but is not controlled" in d.status.message
    assert [a.reason for a in d.actions if isinstance(a, Event)] == ["PodNameConflict"]
    again = step(d.status, create_error=("conflict", "no ownerReference to this TrainingJob"))
    assert again.status == d.status and not [a for a in again.actions if isinstance(a, Event)]
    # Without the error (the next reconcile before its own create) it tries again, no new Event.
    retry = step(d.status)
    assert CreatePod(1) in retry.actions and not [a for a in retry.actions if isinstance(a, Event)]


def test_unreadable_phase_is_recovered_from_the_running_pod():
    running = running_job()
    damaged = running.model_copy(update={"phase": None})
    d = step(damaged, [running_pod(1)])
    assert d.status.phase == "Running" and d.status.attempt == 1
    assert not any(isinstance(a, (CreatePod, DeletePod)) for a in d.actions)
    assert any(isinstance(a, Event) and a.type == "Warning" and a.reason == "StatusRecovered"
               for a in d.actions)


def test_admission_refusal_keeps_the_job_queued_with_the_reason():
    queued = step(None).status
    d = step(queued, create_error=("forbidden", 'no PriorityClass with name no-such-class was found'))
    assert (d.status.phase, d.status.reason) == ("Queued", "PodForbidden")
    assert "no-such-class" in d.status.message
    assert [a.reason for a in d.actions if isinstance(a, Event)] == ["PodForbidden"]
