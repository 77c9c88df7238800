"""Pure helpers around the core: pod manifests -> facts, which pods count, metrics text, privileges."""

from __future__ import annotations

import json

from jobkit import T0, make_spec, spec_dict

from finetune_operator.core import (
    ContainerRunning,
    ContainerTerminated,
    ContainerWaiting,
    counts_for,
    decide,
    observe_job,
    observe_pod,
    observe_pods,
    parse_trainer_metrics,
    privileged_settings,
)


def _pod(status, **meta):
    return {"metadata": {"name": "ft-2", "uid": "u2", "labels": {"finetune.dev/attempt": "2"},
                         "creationTimestamp": "2025-01-01T00:00:00Z", **meta},
            "spec": {"nodeName": "node-a"}, "status": status}


def test_observe_terminated_pod_with_json_message():
    report = {"outcome": "preempted", "step": 12, "checkpoint": "/c/10", "checkpointStep": 10}
    pod = _pod({"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {
            "exitCode": 143, "reason": "Error", "message": json.dumps(report),
            "finishedAt": "2025-01-01T00:01:00Z"}}}]}, deletionTimestamp="2025-01-01T00:00:59Z")
    facts = observe_pod(pod)
    assert (facts.name, facts.attempt, facts.uid, facts.phase, facts.deleting) == ("ft-2", 2, "u2", "Failed", True)
    assert facts.node_name == "node-a" and facts.scheduled
    assert facts.container == ContainerTerminated(143, "Error", json.dumps(report), T0.replace(minute=1))
    assert facts.termination_message == report and facts.outcome == "preempted"
    assert facts.condition_true("DisruptionTarget").reason == "EvictionByEvictionAPI"
    assert facts.creation_time == T0


def test_observe_log_fallback_message_is_not_a_report():
    pod = _pod({"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "exitCode": 1, "message": "Traceback (most recent call last):\n  boom"}}}]})
    assert observe_pod(pod).termination_message is None


def test_observe_unschedulable_and_waiting_and_running():
    unsched = _pod({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]})
    unsched["spec"] = {}
    facts = observe_pod(unsched)
    assert (facts.scheduled, facts.unschedulable_message, facts.container) == (False, "0/1 nodes", None)
    waiting = observe_pod(_pod({"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull", "message": "nope"}}}]}))
    assert waiting.container == ContainerWaiting("ErrImagePull", "nope")
    running = observe_pod(_pod({"phase": "Running", "containerStatuses": [
        {"name": "sidecar", "state": {"waiting": {}}},
        {"name": "trainer", "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]}))
    assert running.container == ContainerRunning(T0)


def test_attempt_falls_back_to_the_name():
    pod = _pod({})
    pod["metadata"]["labels"] = {}
    pod["metadata"]["name"] = "my-job-7"
    assert observe_pod(pod).attempt == 7


def test_parse_trainer_metrics():
    text = "\n".join([
        "# HELP finetune_trainer_step Steps.", "# TYPE finetune_trainer_step gauge",
        "finetune_trainer_step 450.0", "finetune_trainer_total_steps 1000",
        "finetune_trainer_epoch 0.45", "finetune_trainer_loss 1.5",
        "finetune_trainer_tokens_per_second 1234.5",
        "finetune_trainer_heartbeat_timestamp_seconds 1735689600",
        'python_info{version="3.11"} 1.0',
    ])
    sample = parse_trainer_metrics(text)
    assert (sample.step, sample.total_steps, sample.epoch, sample.loss, sample.tokens_per_second) == (
        450, 1000, 0.45, 1.5, 1234.5)
    assert sample.heartbeat_time == T0
    assert parse_trainer_metrics("python_info 1\n") is None
    assert parse_trainer_metrics("finetune_trainer_heartbeat_timestamp_seconds 0\n").heartbeat_time is None


def test_privileged_settings_lists_each_setting():
    spec = make_spec(template={
        "hostNetwork": True,
        "volumes": [{"name": "ok", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/"}}],
        "containerSecurityContext": {"privileged": True, "allowPrivilegeEscalation": True,
                                     "capabilities": {"add": ["SYS_ADMIN"]}},
    })
    assert privileged_settings(spec) == [
        "template.hostNetwork",
        "template.volumes[1].hostPath",
        "template.containerSecurityContext.privileged",
        "template.containerSecurityContext.capabilities.add",
        "template.containerSecurityContext.allowPrivilegeEscalation",
    ]


def test_unprivileged_templates_pass():
    assert privileged_settings(make_spec()) == []
    spec = make_spec(template={"hostNetwork": False, "containerSecurityContext": {
        "privileged": False, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": []}}})
    assert privileged_settings(spec) == []


def _owned(uid: str | None, controller: bool = True, **status):
    refs = [{"uid": uid, "controller": controller}] if uid else []
    return _pod({"phase": "Running", **status}, ownerReferences=refs)


def test_only_pods_the_job_controls_count():
    mine = _owned("job-uid")
    old = _owned("deleted-job-uid")  # a deleted job's pod, same name and labels, not yet collected
    hand_made = _owned(None)  # our labels, no owner at all
    not_controller = _owned("job-uid", controller=False)  # owned, but another controller manages it
    assert [counts_for(p, "job-uid") for p in (mine, old, hand_made, not_controller)] == [True, False, False, False]
    assert [p.uid for p in observe_pods([mine, old, hand_made, not_controller], "job-uid")] == ["u2"]
    assert observe_pods([mine, hand_made], "") == ()  # a job without a uid (never from the API) owns nothing


def test_observe_job_counts_only_the_pods_the_job_controls():
    job = {"metadata": {"name": "ft", "namespace": "ns", "uid": "job-uid"}, "spec": spec_dict(),
           "status": {"phase": "Queued", "attempt": 2, "reason": "CreatingPod"}}
    stray = _owned(None)  # would read as attempt 2's pod if it counted
    assert observe_job(job, [stray], now=T0).pods == ()
    assert [p.name for p in observe_job(job, [stray, _owned("job-uid")], now=T0).pods] == ["ft-2"]


def test_observe_job_asks_for_the_nodes_of_the_pods_that_count_only():
    job = {"metadata": {"name": "ft", "uid": "job-uid"}, "spec": spec_dict()}
    asked = []

    def unready(pods):
        asked.append([p.node_name for p in pods])
        return {"node-a": None}

    obs = observe_job(job, [_owned("job-uid"), _owned("other")], now=T0, unready_nodes=unready)
    assert asked == [["node-a"]] and obs.unready_nodes == {"node-a": None}


def test_observe_job_parses_spec_status_and_pods():
    job = {"metadata": {"name": "ft", "uid": "job-uid", "generation": 4,
                        "creationTimestamp": "2025-01-01T00:00:00Z"},
           "spec": spec_dict(), "status": {"phase": "Queued", "attempt": 1, "reason": "CreatingPod"}}
    pod = _pod({"phase": "Running", "containerStatuses": [
        {"name": "trainer", "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]},
        ownerReferences=[{"uid": "job-uid", "controller": True}])
    pod["metadata"]["name"], pod["metadata"]["labels"] = "ft-1", {"finetune.dev/attempt": "1"}
    obs = observe_job(job, [pod], now=T0, unready_nodes=["node-b"])
    assert (obs.job_name, obs.generation, obs.status.attempt, obs.spec_error) == ("ft", 4, 1, None)
    assert obs.unready_nodes == {"node-b": None}
    assert decide(obs).status.phase == "Running"


def test_observe_job_turns_a_bad_spec_into_spec_error():
    obs = observe_job({"metadata": {"name": "ft"}, "spec": {"image": "x"}}, [], now=T0)
    assert obs.spec is None and obs.spec_error.startswith("spec.model: Field required")
    assert decide(obs).status.reason == "InvalidSpec"
