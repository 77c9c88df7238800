"""End to end through a real Kueue (issue 16): a Kueue preemption of the real trainer on the real
node costs only the steps since its last checkpoint (docs/CONTRACTS.md, "Queueing with Kueue").

The ClusterQueue's quota (1 GPU) fits one job though the node has 2: the preemption is Kueue's
doing, not the scheduler's. The latencies come from one watch of the namespace (Timeline) and are
printed, not asserted."""
from __future__ import annotations

import json

import pytest

from finetune_testbed.jobs import Jobs
from finetune_testbed.kueue import HIGH, LOW, QUEUE, evicted_by_kueue, gated, open_queues
from finetune_testbed.realjob import real_job
from finetune_testbed.timeline import Timeline, phase

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
EVERY = 5  # A's checkpoint interval (steps)




@pytest.fixture
def queued(cluster, namespace, kueue, real_node):
    """The test's namespace behind a LocalQueue whose ClusterQueue holds 1 GPU."""
    cluster_queue = open_queues(cluster, namespace, gpus=1)
    yield namespace
    cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)


@pytest.fixture
def timeline(cluster, queued):
    t = Timeline(cluster.kubeconfig, queued).start()
    yield t
    t.stop()


def queued_job(name: str, priority: str, **kw) -> dict:
    job = real_job(name, claim=f"{name}-ckpt", **kw)
    job["spec"].update(queueName=QUEUE, workloadPriorityClassName=priority)
    return job


def terminated(pod: dict) -> dict | None:
    """The trainer container's terminated state, if it has one."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}).get("terminated") if statuses else None


def test_kueue_preemption_checkpoints_and_the_readmitted_job_resumes_from_it(
        cluster, queued, live_operator, claims, timeline):
    jobs = Jobs(cluster, queued)
    for name in ("a", "c"):
        claims(f"{name}-ckpt")

    # A: low priority; slow enough (0.4 s a step) to be preempted between checkpoints.
    jobs.apply(queued_job("a", LOW, max_steps=30, every_steps=EVERY, step_delay=0.4))
    timeline.wait("tj", "a", phase("Running"), "A Running", 180)
    assert timeline.first("pod", "a-1", gated) is not None, "Kueue never gated A's pod"
    first_saved = jobs.wait("a", lambda s: ((s.get("checkpoint") or {}).get("step") or 0) >= EVERY,
                            120, "A's first checkpoint")["checkpoint"]["step"]

    # C: high priority, short. Kueue preempts A: TerminationTarget, then deletion (SIGTERM).
    jobs.apply(queued_job("c", HIGH, max_steps=4, every_steps=4, step_delay=0))
    preempted = timeline.wait("pod", "a-1", evicted_by_kueue, "A's pod marked TerminationTarget by Kueue")
    timeline.wait("tj", "a", phase("Resuming", "Preempted"), "A Resuming/Preempted")
    replacement_gated = timeline.wait("pod", "a-2", gated, "A's replacement pod gated")
    seen = timeline.seen("pod", "a-1", lambda p: terminated(p) is not None)
    assert seen is not None, "A's first pod was never seen terminated"
    end = terminated(seen[1])
    assert end is not None
    message = json.loads(end["message"])
    assert (end["exitCode"], message["outcome"]) == (143, "preempted"), end  # SIGTERM, checkpoint saved
    saved = message["checkpointStep"]
    assert saved >= first_saved, message
    a = jobs.status("a")
    assert (a["failures"], a["resumes"], a["lastInterruption"]["reason"]) == (0, 1, "Preempted"), a

    # C runs on the quota A gave up and succeeds; A is re-admitted and resumes from `saved`.
    timeline.wait("tj", "c", phase("Running"), "C Running", 120)
    jobs.wait_phase("c", "Succeeded", 120)
    readmitted = timeline.wait("pod", "a-2", lambda p: not gated(p), "A's replacement pod admitted", 60)
    running_again = timeline.wait("tj", "a", phase("Running", attempt=2), "A Running again (attempt 2)", 120)
    a = jobs.wait_phase("a", "Succeeded", 180)
    assert (a["attempt"], a["failures"], a["resumes"]) == (2, 0, 1), a
    seen = timeline.seen("pod", "a-2", lambda p: terminated(p) is not None)
    assert seen is not None, "A's second pod was never seen terminated"
    end = terminated(seen[1])
    assert end is not None
    resumed = json.loads(end["message"])
    assert (resumed["outcome"], resumed["resumedFrom"], resumed["step"]) == ("completed", saved, 30), resumed
    print(f"\nA checkpointed at step {saved} when preempted; "
          f"preemption (TerminationTarget seen) -> replacement pod gated: {replacement_gated - preempted:.2f}s; "
          f"re-admission (gate removed) -> A Running again: {running_again - readmitted:.2f}s")
