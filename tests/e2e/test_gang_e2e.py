"""End to end, multi-node: a `workers: 2` job is two pods on the real node (kubelet + containerd),
each a torchrun node of one process, talking over gloo through the pod network; rank 1 finds rank
0 through the job's headless Service and the cluster DNS. One rank's trainer is SIGKILLed mid-run:
the whole gang is replaced and the run resumes from its checkpoint to the same adapter, bit for bit,
as an uninterrupted run (docs/CONTRACTS.md "Gangs")."""
from __future__ import annotations

import json
import signal

import psutil
import pytest
import torch
from safetensors.torch import load_file

from finetune_testbed.jobs import Jobs
from finetune_testbed.procs import wait_for
from finetune_testbed.realjob import real_job
from finetune_testbed.realnode import RealNode

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
STEPS, EVERY = 30, 5


def gang_job(name: str) -> dict:
    job = real_job(name, claim=f"{name}-ckpt", max_steps=STEPS, every_steps=EVERY, step_delay=0.3)
    job["spec"]["workers"] = 2
    return job


def pod(jobs: Jobs, job: str, name: str) -> dict:
    return next(p for p in jobs.pods(job) if p["metadata"]["name"] == name)


def trainer_process(jobs: Jobs, node: RealNode, job: str, name: str, hostname: str) -> psutil.Process:
    """The rank's launcher process, from the container ID the kubelet reports."""
    def find():
        statuses = (pod(jobs, job, name).get("status") or {}).get("containerStatuses") or []
        if not statuses or "running" not in (statuses[0].get("state") or {}):
            return None
        proc = psutil.Process(node.container_pid(statuses[0]["containerID"]))
        assert proc.environ().get("HOSTNAME") == hostname, proc.environ().get("HOSTNAME")
        return proc
    return wait_for(find, 30, f"trainer process of {name}")


def adapter(node: RealNode, namespace: str, claim: str) -> dict[str, torch.Tensor]:
    found = [p for p in node.pvc_dir(namespace, claim).rglob("adapter_model.safetensors")
             if "output" in p.parts and not any(part.startswith("checkpoint-") for part in p.parts)]
    assert len(found) == 1, found
    return load_file(str(found[0]))


def test_two_ranks_train_over_gloo_and_a_killed_rank_resumes_the_whole_gang_bit_exact(
        cluster, namespace, live_operator, claims, real_node):
    jobs = Jobs(cluster, namespace)
    for name in ("whole", "killed"):
        claims(f"{name}-ckpt")

    jobs.apply(gang_job("whole"))
    running = jobs.wait("whole", lambda s: (s.get("ranks") or {}).get("display") == "2/2"
                        and s.get("phase") == "Running", 240, "both ranks running")
    assert running["attempt"] == 1
    row = cluster.kubectl("get", "tj", "whole", "-n", namespace).stdout.splitlines()[1]
    assert " 2/2 " in f" {row} ", row  # the READY column
    service = json.loads(cluster.kubectl("get", "service", "whole", "-n", namespace, "-o", "json").stdout)
    assert service["spec"]["clusterIP"] == "None"
    whole = jobs.wait_phase("whole", "Succeeded", 300)
    assert (whole["attempt"], whole["failures"], whole["resumes"]) == (1, 0, 0)
    assert whole["progress"]["step"] == STEPS
    # One process group across the two pods (global rank 0 logs its size), not two single-node runs.
    logs = {r: cluster.kubectl("logs", f"whole-1-{r}", "-n", namespace).stdout for r in (0, 1)}
    assert "world_size=2" in logs[0], logs

    jobs.apply(gang_job("killed"))
    jobs.wait("killed", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= 2 * EVERY
              and ((s.get("progress") or {}).get("step") or 0) > 2 * EVERY, 300, "a checkpoint and more steps")
    trainer_process(jobs, real_node, "killed", "killed-1-1", "rank-1").send_signal(signal.SIGKILL)
    second = jobs.wait("killed", lambda s: s.get("attempt") == 2, 180, "the replacement gang")
    # For the message only; attempt 2's pods may not have a container status yet (status first).
    ends = {p["metadata"]["name"]: ((p.get("status") or {}).get("containerStatuses") or [{}])[0].get("state")
            for p in jobs.pods("killed")}
    assert second["lastInterruption"]["pod"] == "killed-1-1", (second["lastInterruption"], ends)
    assert second["lastInterruption"]["exitCode"] == 137
    wait_for(lambda: not any(p["metadata"]["name"].startswith("killed-1-") and
                             (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                             for p in jobs.pods("killed")), 120, "no pod of attempt 1 left running")
    done = jobs.wait_phase("killed", "Succeeded", 300)
    assert (done["attempt"], done["failures"], done["resumes"]) == (2, 1, 0)  # one count for the gang
    report = json.loads(pod(jobs, "killed", "killed-2-0")["status"]["containerStatuses"][0]["state"]
                        ["terminated"]["message"])
    assert report["resumedFrom"] is not None and report["resumedFrom"] >= 2 * EVERY

    expected, got = adapter(real_node, namespace, "whole-ckpt"), adapter(real_node, namespace, "killed-ckpt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
