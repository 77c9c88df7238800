"""Multi-node gangs in the pure core (docs/CONTRACTS.md "Gangs"): all-or-nothing, one count per
attempt, the root cause decides, partial gangs are released, stuck pods do not block."""

from __future__ import annotations

import dataclasses

from jobkit import (
    T0,
    at,
    disruption,
    exited_pod,
    make_spec,
    observe,
    pending_pod,
    running_pod,
    starting_pod,
    step,
)

from finetune_operator.api import TrainingJobStatus
from finetune_operator.core import CreatePod, CreateService, DeletePod, decide
from finetune_operator.core.gang import GANG_SETTLE_SECONDS, STUCK_TERMINATING_SECONDS

GANG = make_spec(workers=2, runPolicy={"backoffSeconds": 0, "startTimeoutSeconds": 300})


def ranked(pod, rank: int):
    return dataclasses.replace(pod, name=f"ft-{pod.attempt}-{rank}", rank=rank, uid=f"uid-{pod.attempt}-{rank}")


def running_gang(attempt: int = 1) -> list:
    return [ranked(running_pod(attempt, node_name=f"node-{r}"), r) for r in range(2)]


def gang_status(pods=None, now=T0) -> TrainingJobStatus:
    queued = step(None, spec=GANG, now=now).status
    return step(queued, pods if pods is not None else running_gang(), spec=GANG, now=now).status


def test_a_new_gang_creates_its_service_then_every_rank():
    d = step(None, spec=GANG)
    assert d.status.phase == "Queued" and d.status.attempt == 1
    assert [a for a in d.actions if isinstance(a, (CreateService, CreatePod))] == [
        CreateService(), CreatePod(1, 0), CreatePod(1, 1)]
    assert "pods ft-1-0..ft-1-1" in (d.status.message or "")
    assert d.status.ranks is not None and d.status.ranks.display == "0/2"


def test_only_the_missing_rank_is_recreated_while_queued():
    queued = step(None, spec=GANG).status
    d = step(queued, [ranked(pending_pod(1), 0)], spec=GANG)
    assert d.creates == (CreatePod(1, 1),)


def test_running_only_when_every_rank_runs():
    one_up = [ranked(running_pod(1), 0), ranked(starting_pod(1, "ContainerCreating", "pulling"), 1)]
    starting = gang_status(one_up)
    assert starting.phase == "Starting" and starting.ranks.display == "1/2"
    assert starting.message.startswith("rank 1/2: ")
    running = step(starting, running_gang(), spec=GANG).status
    assert running.phase == "Running" and running.ranks.display == "2/2"
    assert "2 pods" in running.message and "node-0" in running.message and "node-1" in running.message


def test_an_evicted_rank_replaces_the_whole_gang_and_counts_one_resume():
    status = gang_status()
    # rank 1 evicted; rank 0's trainer then fails talking to its vanished peer
    pods = [ranked(exited_pod(1, 1, finished=at(3)), 0),
            ranked(exited_pod(1, 143, phase="Failed", conditions=disruption(), finished=at(2)), 1)]
    d = step(status, pods, spec=GANG, now=at(5))
    assert d.status.last_interruption.reason == "Evicted"
    assert (d.status.resumes, d.status.failures) == (1, 0)
    assert d.status.attempt == 2 and d.creates == (CreatePod(2, 0), CreatePod(2, 1))  # no backoff: at once
    assert d.status.last_interruption.pod == "ft-1-1"
    assert "rank 1/2" in d.status.last_interruption.message


def test_a_crashed_rank_counts_one_failure_and_stops_the_rest():
    status = gang_status()
    crashed = [ranked(running_pod(1), 0), ranked(exited_pod(1, 1, finished=at(2)), 1)]
    settling = step(status, crashed, spec=GANG, now=at(3))  # the peer's own state may not be reported yet
    assert (settling.status.phase, settling.status.failures) == ("Running", 0) and settling.deletes == ()
    assert "waiting for the state of the other ranks" in settling.status.message
    assert settling.requeue_after == 2 + GANG_SETTLE_SECONDS - 3
    d = step(status, crashed, spec=GANG, now=at(2 + GANG_SETTLE_SECONDS))
    assert (d.status.phase, d.status.failures, d.status.resumes) == ("Resuming", 1, 0)
    assert DeletePod("ft-1-0", "NonZeroExitCode", uid="uid-1-0") in d.deletes  # no partial gang left running
    # rank 0 then fails as well: still one count for the attempt
    both = [ranked(exited_pod(1, 1, finished=at(4)), 0), crashed[1]]
    again = step(d.status, both, spec=GANG, now=at(9))
    assert (again.status.failures, again.status.resumes) == (1, 0)


def test_a_peer_reported_late_is_still_the_cause():
    """Rank 1 is SIGKILLed; rank 0's collective fails a moment later, and its kubelet reports
    first. The attempt waits GANG_SETTLE_SECONDS for rank 1, whose earlier exit is the cause."""
    status = gang_status()
    peer_failed = [ranked(exited_pod(1, 1, finished=at(3)), 0), ranked(running_pod(1), 1)]
    assert step(status, peer_failed, spec=GANG, now=at(4)).status.failures == 0
    killed = [peer_failed[0], ranked(exited_pod(1, 137, finished=at(2)), 1)]
    d = step(status, killed, spec=GANG, now=at(5))
    assert (d.status.failures, d.status.last_interruption.pod, d.status.last_interruption.exit_code) == (
        1, "ft-1-1", 137)


def test_on_the_same_second_a_rank_killed_by_a_signal_is_the_cause():
    status = gang_status()
    pods = [ranked(exited_pod(1, 1, finished=at(3)), 0), ranked(exited_pod(1, 137, finished=at(3)), 1)]
    assert step(status, pods, spec=GANG, now=at(4)).status.last_interruption.pod == "ft-1-1"


def test_a_peer_on_a_not_ready_node_is_waited_for_until_its_node_counts_as_lost():
    status = gang_status()
    pods = [ranked(exited_pod(1, 1, finished=at(3)), 0), ranked(running_pod(1, node_name="node-b"), 1)]
    unready = {"node-b": at(1)}
    held = step(status, pods, spec=GANG, now=at(20), unready_nodes=unready, node_lost_after_seconds=40)
    assert held.status.failures == 0 and held.requeue_after == 21
    lost = step(status, pods, spec=GANG, now=at(41), unready_nodes=unready, node_lost_after_seconds=40)
    assert (lost.status.last_interruption.reason, lost.status.resumes, lost.status.failures) == ("NodeLost", 1, 0)


def test_the_first_exit_is_the_cause_and_a_tie_goes_to_the_more_severe():
    status = gang_status()
    # rank 0 reports SIGTERM (torchrun stopping it after its peer died), rank 1 crashed first
    pods = [ranked(exited_pod(1, 143, report={"outcome": "preempted"}, finished=at(4)), 0),
            ranked(exited_pod(1, 1, finished=at(3)), 1)]
    assert step(status, pods, spec=GANG, now=at(5)).status.failures == 1
    same_second = [dataclasses.replace(pods[0], container=dataclasses.replace(pods[0].container, finished_at=at(3))),
                   pods[1]]
    assert step(status, same_second, spec=GANG, now=at(5)).status.failures == 1


def test_next_attempt_waits_for_every_old_rank_then_creates_a_new_gang():
    status = gang_status()
    crashed = [ranked(running_pod(1), 0), ranked(exited_pod(1, 1, finished=at(2)), 1)]
    resuming = step(status, crashed, spec=GANG, now=at(8)).status
    stopping = [dataclasses.replace(crashed[0], deleting=True), crashed[1]]
    assert step(resuming, stopping, spec=GANG, now=at(9)).creates == ()
    gone = [crashed[1]]
    d = step(resuming, gone, spec=GANG, now=at(10))
    assert d.status.attempt == 2
    assert d.creates == (CreatePod(2, 0), CreatePod(2, 1))


def test_a_gang_that_does_not_fit_is_queued_with_the_schedulers_reason():
    pods = [ranked(pending_pod(1, unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."), r)
            for r in range(2)]
    status = gang_status(pods)
    assert status.phase == "Queued" and "Insufficient nvidia.com/gpu" in status.message
    later = step(status, pods, spec=GANG, now=at(3600)).status  # holds no GPU: no timeout applies
    assert later.phase == "Queued" and later.resumes == 0


def test_a_partly_placed_gang_is_released_after_the_start_timeout():
    pods = [ranked(running_pod(1), 0), ranked(pending_pod(1, unschedulable="0/3 nodes are available"), 1)]
    status = gang_status(pods)
    d = step(status, pods, spec=GANG, now=at(100))
    assert d.status.phase == "Queued" and d.requeue_after == 200
    released = step(status, pods, spec=GANG, now=at(300))
    assert (released.status.phase, released.status.reason) == ("Resuming", "GangNotScheduled")
    assert released.status.resumes == 1
    assert {a.name for a in released.deletes} == {"ft-1-0", "ft-1-1"}


def test_rank_zero_completing_is_the_job_completing():
    status = gang_status()
    pods = [ranked(exited_pod(1, 0, report={"outcome": "completed", "step": 9}), 0), ranked(running_pod(1), 1)]
    d = step(status, pods, spec=GANG, now=at(10))
    assert d.status.phase == "Succeeded"
    assert [a.name for a in d.deletes] == ["ft-1-1"]


def test_a_rank_that_vanishes_while_running_interrupts_the_gang():
    status = gang_status()
    d = step(status, running_gang()[:1], spec=GANG, now=at(10))
    assert (d.status.phase, d.status.reason, d.status.resumes) == ("Resuming", "PodDeleted", 1)
    assert "ft-1-1 disappeared" in d.status.message


def test_a_pod_stuck_terminating_is_forced_after_its_grace_and_a_margin():
    status = gang_status()
    crashed = [ranked(running_pod(1), 0), ranked(exited_pod(1, 1, finished=at(2)), 1)]
    resuming = step(status, crashed, spec=GANG, now=at(8)).status
    stuck = [dataclasses.replace(crashed[0], deleting=True, delete_by=at(120)), crashed[1]]
    waiting = step(resuming, stuck, spec=GANG, now=at(150))
    assert waiting.deletes == () and waiting.requeue_after == 120 + STUCK_TERMINATING_SECONDS - 150
    forced = step(resuming, stuck, spec=GANG, now=at(120 + STUCK_TERMINATING_SECONDS))
    assert forced.deletes == (DeletePod("ft-1-0", "StuckTerminating", grace_seconds=0, uid="uid-1-0"),)


def test_a_gang_needs_a_dns_label_name():
    obs = dataclasses.replace(observe(None, spec=GANG), job_name="my.job")
    failed = decide(obs).status
    assert (failed.phase, failed.reason) == ("Failed", "InvalidSpec")
    assert "metadata.name must be a DNS label" in failed.message


def test_single_node_jobs_keep_their_pod_names():
    d = step(None)
    assert d.creates == (CreatePod(1, 0),)
    assert d.status.ranks.display == "0/1" and "pod ft-1 " in d.status.message
    assert step(d.status, [running_pod(1)]).status.ranks.display == "1/1"


def test_no_wake_up_for_a_full_gang():
    status = gang_status()
    assert step(status, running_gang(), spec=GANG, now=at(10)).requeue_after is None
