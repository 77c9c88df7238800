"""The operator keeps TrainingJob status true on a real control plane with kwok GPU nodes.
Each test waits on conditions with deadlines and asserts the observed state."""
from __future__ import annotations

import json
import threading

import pytest

from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.procs import wait_for

pytestmark = pytest.mark.cluster


class PhaseHistory:
    """Every phase a job's status passed through, from a watch (fast phases included)."""

    def __init__(self, cluster, namespace, name):
        from kubernetes import client, config, watch
        self.api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(self.api)
        self.phases: list[str] = []
        self._w = watch.Watch()

        def run():
            try:
                for ev in self._w.stream(custom.list_namespaced_custom_object, "finetune.dev",
                                         "v1alpha1", namespace, "trainingjobs",
                                         field_selector=f"metadata.name={name}",
                                         timeout_seconds=300):
                    phase = (ev["object"].get("status") or {}).get("phase")
                    if phase and (not self.phases or self.phases[-1] != phase):
                        self.phases.append(phase)
            except Exception:
                pass
        threading.Thread(target=run, daemon=True).start()

    def stop(self):
        self._w.stop()


def test_happy_path_queued_starting_running_succeeded(jobs, cluster, namespace):
    history = PhaseHistory(cluster, namespace, "happy")
    jobs.apply(job_manifest("happy", template=sim(outcome="succeed", run_for="3s",
                                                  start_after="2s")))
    status = jobs.wait_phase("happy", "Succeeded", 60)
    history.stop()
    assert history.phases == ["Queued", "Starting", "Running", "Succeeded"]
    assert status["attempt"] == 1 and status["failures"] == 0 and status["resumes"] == 0
    assert status["completionTime"] and status["startTime"]
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Succeeded"] == "True" and conds["Failed"] == "False"
    pods = jobs.pods("happy")
    assert [p["metadata"]["name"] for p in pods] == ["happy-1"]
    pod = pods[0]
    assert pod["metadata"]["labels"]["finetune.dev/attempt"] == "1"
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingJob" and owner["controller"] is True
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    reasons = [e["reason"] for e in jobs.events("happy")]
    assert sorted(reasons) == ["Completed", "CreatingPod"], reasons  # Starting, Running: quiet
    printed = cluster.kubectl("get", "tj", "happy", "-n", namespace).stdout
    assert "Succeeded" in printed.splitlines()[1]


def test_exit_code_retried_then_backoff_limit_exceeded(jobs):
    jobs.apply(job_manifest("crashy", runPolicy={"backoffLimit": 1},
                            template=sim(outcome="fail", run_for="300ms", exit_code=3)))
    status = jobs.wait_phase("crashy", "Failed", 60)
    assert status["reason"] == "BackoffLimitExceeded"
    assert status["failures"] == 2 and status["attempt"] == 2 and status["resumes"] == 0
    assert status["lastInterruption"]["exitCode"] == 3
    assert sorted(p["metadata"]["name"] for p in jobs.pods("crashy")) == ["crashy-1", "crashy-2"]


def test_oom_killed_counts_as_failure_with_reason(jobs):
    jobs.apply(job_manifest("oom", runPolicy={"backoffLimit": 0},
                            template=sim(outcome="fail", run_for="300ms", exit_code=137,
                                         reason="OOMKilled")))
    status = jobs.wait_phase("oom", "Failed", 60)
    assert status["failures"] == 1 and status["resumes"] == 0
    assert status["lastInterruption"]["reason"] == "OOMKilled"
    assert "out of memory" in status["message"] and "exit code 137" in status["message"]


def test_unschedulable_job_stays_queued_with_scheduler_message(jobs):
    jobs.apply(job_manifest("greedy", resources={"gpus": 9}))
    status = jobs.wait(
        "greedy", lambda s: s.get("phase") == "Queued" and "nvidia.com/gpu" in (s.get("message") or ""),
        60, "Queued with the scheduler's message")
    assert status["reason"] == "Unschedulable"
    assert len(jobs.pods("greedy")) == 1


def test_image_pull_error_past_start_timeout_fails(jobs):
    jobs.apply(job_manifest("badimage", runPolicy={"startTimeoutSeconds": 3},
                            template=sim(start="image-pull-error")))
    status = jobs.wait_phase("badimage", "Failed", 60)
    assert "ErrImagePull" in status["reason"] + (status.get("message") or "")
    assert jobs.live_pods("badimage") == []


def test_drain_resumes_on_another_node_counted_as_resume(jobs, cluster):
    jobs.apply(job_manifest("drained", template=sim(outcome="run")))
    jobs.wait_phase("drained", "Running", 60)
    node = jobs.pods("drained")[0]["spec"]["nodeName"]
    try:
        cluster.kubectl("drain", node, "--force", "--ignore-daemonsets",
                        "--delete-emptydir-data", "--timeout=60s", timeout=90)
        status = jobs.wait(
            "drained", lambda s: s.get("phase") == "Running" and s.get("attempt") == 2, 60,
            "second attempt Running")
        assert status["resumes"] == 1 and status["failures"] == 0
        assert status["lastInterruption"]["attempt"] == 1
        second = [p for p in jobs.pods("drained") if p["metadata"]["name"] == "drained-2"][0]
        assert second["spec"]["nodeName"] != node
    finally:
        cluster.kubectl("uncordon", node)


def test_pod_deleted_behind_the_operators_back_resumes(jobs, cluster, namespace):
    jobs.apply(job_manifest("orphaned", template=sim(outcome="run")))
    jobs.wait_phase("orphaned", "Running", 60)
    cluster.kubectl("delete", "pod", "orphaned-1", "-n", namespace, "--wait=false")
    status = jobs.wait("orphaned", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running",
                       60, "attempt 2 Running")
    assert status["resumes"] == 1 and status["failures"] == 0


def test_suspend_removes_pods_and_unsuspend_starts_new_attempt(jobs, cluster, namespace):
    jobs.apply(job_manifest("pausable", template=sim(outcome="run")))
    jobs.wait_phase("pausable", "Running", 60)
    cluster.kubectl("patch", "tj", "pausable", "-n", namespace, "--type", "merge",
                    "-p", '{"spec":{"suspend":true}}')
    status = jobs.wait_phase("pausable", "Suspended", 60)
    wait_for(lambda: jobs.live_pods("pausable") == [], 30, "pods gone")
    assert status["failures"] == 0
    cluster.kubectl("patch", "tj", "pausable", "-n", namespace, "--type", "merge",
                    "-p", '{"spec":{"suspend":false}}')
    status = jobs.wait("pausable", lambda s: s.get("phase") == "Running" and s.get("attempt") == 2,
                       60, "new attempt Running")
    assert status["failures"] == 0


def test_deleting_job_deletes_its_pods(jobs, cluster, namespace):
    jobs.apply(job_manifest("doomed", template=sim(outcome="run")))
    jobs.wait_phase("doomed", "Running", 60)
    cluster.kubectl("delete", "tj", "doomed", "-n", namespace, "--wait=false")
    wait_for(lambda: jobs.pods("doomed") == [], 90, "pods garbage-collected")
    wait_for(lambda: jobs.get("doomed") is None, 60, "job gone")


def test_operator_killed_mid_run_keeps_truth_and_no_duplicate(jobs, live_operator):
    jobs.apply(job_manifest("survivor", template=sim(outcome="succeed", run_for="6s")))
    jobs.wait_phase("survivor", "Running", 60)
    live_operator.kill()
    # While the operator is down the pod finishes; the restarted operator must notice.
    wait_for(lambda: jobs.pods("survivor")[0]["status"]["phase"] == "Succeeded", 60, "pod done")
    assert jobs.status("survivor")["phase"] == "Running"  # stale while nobody watches
    live_operator.start()
    status = jobs.wait_phase("survivor", "Succeeded", 60)
    assert status["attempt"] == 1
    assert [p["metadata"]["name"] for p in jobs.pods("survivor")] == ["survivor-1"]


def test_invalid_manifest_rejected_by_kubectl_with_cel_message(cluster, namespace, crd):
    bad = job_manifest("too.wide", workers=2)  # a gang names its Service after the job: a DNS label
    res = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0
    assert "with spec.workers > 1, metadata.name must be a DNS label" in res.stderr
    assert cluster.kubectl("get", "tj", "too.wide", "-n", namespace, check=False).returncode != 0


def test_privileged_template_refused_with_condition(jobs):
    jobs.apply(job_manifest("sneaky", template={"hostNetwork": True}))
    status = jobs.wait_phase("sneaky", "Failed", 60)
    assert status["reason"] == "PrivilegedTemplate"
    assert "hostNetwork" in status["message"]
    assert jobs.pods("sneaky") == []


def test_job_can_be_deleted_while_the_operator_is_down(jobs, cluster, namespace, live_operator):
    jobs.apply(job_manifest("orphanable", template=sim(outcome="run")))
    jobs.wait_phase("orphanable", "Running", 60)
    assert not (jobs.get("orphanable")["metadata"].get("finalizers") or [])
    live_operator.kill()
    try:
        cluster.kubectl("delete", "tj", "orphanable", "-n", namespace, "--wait=false")
        wait_for(lambda: jobs.get("orphanable") is None, 30, "job gone without the operator")
        wait_for(lambda: jobs.pods("orphanable") == [], 90, "pods garbage-collected")
    finally:
        live_operator.start()


def test_run_definition_is_immutable_while_editable_fields_stay_editable(jobs, cluster, namespace):
    """kubectl edits of a running job: the model (and every run-defining field) is refused at
    apply with a message that says to create a new job; suspend and runPolicy go through."""
    jobs.apply(job_manifest("fixed", template=sim(outcome="run")))
    jobs.wait_phase("fixed", "Running", 60)
    for patch, field in (({"model": "/models/other"}, "model"),
                         ({"hyperparameters": {"maxSteps": 5}}, "hyperparameters"),
                         ({"checkpoint": {"claimName": "elsewhere"}}, "checkpoint.claimName")):
        res = cluster.kubectl("patch", "tj", "fixed", "-n", namespace, "--type", "merge",
                              "-p", json.dumps({"spec": patch}), check=False)
        assert res.returncode != 0, patch
        assert f"{field} is immutable" in res.stderr and "create a new TrainingJob" in res.stderr, res.stderr
    assert jobs.get("fixed")["spec"]["model"] == "/models/tiny"
    cluster.kubectl("patch", "tj", "fixed", "-n", namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"runPolicy": {"backoffLimit": 7}}}))
    status = jobs.wait("fixed", lambda s: s.get("observedGeneration") == 2, 30, "generation 2 observed")
    assert status["phase"] == "Running" and status["runFingerprint"]


def test_prompt_without_completion_is_refused_at_apply(cluster, namespace, crd):
    bad = job_manifest("halfpc", dataset={"path": "/data/x.jsonl", "promptField": "q"})
    res = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0
    assert "dataset.promptField and dataset.completionField must be set together" in res.stderr
    assert "FT_" not in res.stderr
