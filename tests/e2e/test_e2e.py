"""End to end: local control plane, the operator, a real node (kubelet + containerd + runc)
running the trainer image on a tiny model. Interruptions are injected the way a cluster
produces them: the Eviction API, a SIGKILL or SIGSTOP of the container's process; the kubelet
delivers SIGTERM and reads the termination message."""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from finetune_testbed.jobs import Jobs
from finetune_testbed.procs import wait_for
from finetune_testbed.realjob import real_job
from finetune_testbed.realnode import RealNode

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


@pytest.fixture
def run(cluster, namespace, live_operator, claims):
    jobs = Jobs(cluster, namespace)

    def start(name, **kw):
        claims(f"{name}-ckpt")
        jobs.apply(real_job(name, claim=f"{name}-ckpt", **kw))
        return jobs
    return start


def termination(jobs, pod_name) -> dict:
    pod = [p for p in jobs.pods(pod_name.rsplit("-", 1)[0]) if p["metadata"]["name"] == pod_name][0]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return json.loads(term["message"])


def trainer_process(jobs, node: RealNode, pod_name: str) -> psutil.Process:
    """The pod's trainer process on this machine, from the container ID the kubelet reports:
    the runtime's own record, not a scan of every process."""
    def find():
        pods = [p for p in jobs.pods(pod_name.rsplit("-", 1)[0]) if p["metadata"]["name"] == pod_name]
        statuses = (pods[0].get("status") or {}).get("containerStatuses") or [] if pods else []
        if not statuses or "running" not in (statuses[0].get("state") or {}):
            return None
        proc = psutil.Process(node.container_pid(statuses[0]["containerID"]))
        assert proc.environ().get("HOSTNAME") == pod_name, proc.environ().get("HOSTNAME")
        assert "finetune_trainer" in " ".join(proc.cmdline()), proc.cmdline()
        return proc
    return wait_for(find, 30, f"trainer process of {pod_name}")


def wait_step(jobs, name, step, timeout=120):
    return jobs.wait(name, lambda s: ((s.get("progress") or {}).get("step") or 0) >= step,
                     timeout, f"{name} at step {step}")


def test_real_training_succeeds_with_progress_and_adapter(run, real_node, namespace, cluster):
    jobs = run("tiny", max_steps=30)
    wait_step(jobs, "tiny", 3)
    row = cluster.kubectl("get", "tj", "tiny", "-n", namespace).stdout.splitlines()[1]
    assert "Running" in row and "/30" in row  # PROGRESS column while running
    status = jobs.wait_phase("tiny", "Succeeded", 180)
    assert status["attempt"] == 1 and status["progress"]["step"] == 30
    assert status["progress"]["loss"] > 0
    adapters = list(real_node.pvc_dir(namespace, "tiny-ckpt").rglob("adapter_model.safetensors"))
    assert any("output" in str(p) and "checkpoint-" not in str(p) for p in adapters), adapters
    assert termination(jobs, "tiny-1")["outcome"] == "completed"


def test_evicted_mid_run_resumes_from_its_checkpoint(run, kube, api_client, namespace):
    jobs = run("evicted", max_steps=40)
    wait_step(jobs, "evicted", 12)
    core = kube.CoreV1Api(api_client)
    core.create_namespaced_pod_eviction(
        "evicted-1", namespace,
        kube.V1Eviction(metadata=kube.V1ObjectMeta(name="evicted-1", namespace=namespace)))
    # The evicted pod is gone; its termination message (SIGTERM -> checkpoint -> exit 143)
    # lives on in the job's status as the checkpoint to resume from.
    resuming = jobs.wait("evicted", lambda s: s.get("attempt") == 2, 120, "second attempt")
    saved = resuming["checkpoint"]["step"]
    assert saved >= 12
    status = jobs.wait_phase("evicted", "Succeeded", 240)
    assert status["resumes"] == 1 and status["failures"] == 0 and status["attempt"] == 2
    assert status["lastInterruption"]["reason"] == "Evicted"
    assert termination(jobs, "evicted-2")["resumedFrom"] == saved  # not from zero


def test_sigkilled_trainer_resumes_from_last_saved_checkpoint(run, real_node, namespace):
    jobs = run("killed", max_steps=40)
    wait_step(jobs, "killed", 12)
    trainer_process(jobs, real_node, "killed-1").send_signal(signal.SIGKILL)
    status = jobs.wait_phase("killed", "Succeeded", 240)
    assert status["attempt"] == 2 and status["failures"] == 1
    assert status["lastInterruption"]["exitCode"] == 137
    resumed = termination(jobs, "killed-2")["resumedFrom"]
    assert resumed is not None and resumed >= 10 and resumed % 5 == 0


def test_frozen_trainer_is_detected_as_stalled_and_restarted(run, real_node, namespace):
    jobs = run("frozen", max_steps=60, run_policy={"stallTimeoutSeconds": 8,
                                                    "terminationGracePeriodSeconds": 3})
    wait_step(jobs, "frozen", 12)
    proc = trainer_process(jobs, real_node, "frozen-1")
    proc.send_signal(signal.SIGSTOP)
    try:
        status = jobs.wait("frozen", lambda s: s.get("attempt") == 2, 120, "restart after stall")
        assert status["lastInterruption"]["reason"] == "Stalled"
    finally:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    status = jobs.wait_phase("frozen", "Succeeded", 240)
    assert status["resumes"] == 1 and status["failures"] == 0
    assert termination(jobs, "frozen-2")["resumedFrom"] >= 10


def test_jobs_sharing_a_claim_keep_their_own_files_and_start_only_from_what_they_name(
        cluster, namespace, live_operator, real_node, claims):
    """Two jobs on one claim both succeed with separate adapters and neither resumes the
    other; a job deleted and re-created under the same name starts from step 0; a job that
    names an earlier run's checkpoint in checkpoint.resumeFrom starts from exactly that."""
    jobs = Jobs(cluster, namespace)
    claims("team-ckpt")

    def job(name, **checkpoint):
        manifest = real_job(name, claim="team-ckpt", max_steps=10, step_delay=0.1)
        manifest["spec"]["checkpoint"].update(checkpoint)
        return manifest

    jobs.apply(job("share-a"))
    jobs.apply(job("share-b"))
    first = {n: jobs.wait_phase(n, "Succeeded", 240) for n in ("share-a", "share-b")}
    assert first["share-a"]["outputPath"] != first["share-b"]["outputPath"]
    for name, status in first.items():
        assert termination(jobs, f"{name}-1")["resumedFrom"] is None, name  # neither resumed the other
        assert (real_node.uri_dir(namespace, status["outputPath"]) / "adapter_model.safetensors").is_file()
        assert f"adapter in {status['outputPath']}" in status["message"]
        assert status["checkpoint"]["step"] == 10

    uid_before = jobs.get("share-a")["metadata"]["uid"]
    cluster.kubectl("delete", "tj", "share-a", "-n", namespace, "--wait=true")
    jobs.apply(job("share-a"))
    again = jobs.wait_phase("share-a", "Succeeded", 240)
    assert uid_before not in again["outputPath"] and again["outputPath"] != first["share-a"]["outputPath"]
    assert termination(jobs, "share-a-1")["resumedFrom"] is None  # not its predecessor's step 10

    start = first["share-b"]["checkpointPath"] + "/checkpoint-10"
    longer = job("share-c", resumeFrom=start)
    longer["spec"]["hyperparameters"]["maxSteps"] = 14
    jobs.apply(longer)
    status = jobs.wait_phase("share-c", "Succeeded", 240)
    msg = termination(jobs, "share-c-1")
    assert (msg["resumedFrom"], msg["step"]) == (10, 14)
    assert status["attempt"] == 1 and status["resumes"] == 0


def test_slow_model_load_is_not_a_stall(run, namespace):
    """Loading takes longer than stallTimeoutSeconds: the stall clock starts at the first step.
    (6 s leaves room for a checkpoint save on a loaded 2-core machine; 3 s once did not.)"""
    jobs = run("slowload", max_steps=8, run_policy={"stallTimeoutSeconds": 6},
               env={"FT_DEBUG_LOAD_DELAY": "15"})
    status = jobs.wait_phase("slowload", "Succeeded", 240)
    assert (status["attempt"], status["resumes"], status["failures"]) == (1, 0, 0), status


def test_real_node_runs_containerd_next_to_the_kwok_nodes(cluster, real_node):
    rows = [line.split() for line in
            cluster.kubectl("get", "nodes", "-o", "wide", "--no-headers").stdout.splitlines()]
    by_name = {row[0]: row for row in rows}
    real = by_name[real_node.name]
    assert real[1] == "Ready" and real[5] == real_node.ip, real
    assert real[-1].startswith("containerd://"), real  # CONTAINER-RUNTIME, from the kubelet
    kwok_nodes = cluster.get_json("nodes", "-l", "type=kwok")["items"]
    assert kwok_nodes and all(n["metadata"]["name"] in by_name for n in kwok_nodes)
    node = cluster.get_json("node", real_node.name)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(real_node.gpus)  # device plugin
