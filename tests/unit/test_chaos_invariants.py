"""The chaos run's invariants (finetune_testbed.chaos.invariants) on hand-made jobs, pods
and Events: each check must find what is wrong and stay quiet about what is right, or a
chaos run could pass while the operator misbehaves."""
from __future__ import annotations

import time

import pytest

from finetune_testbed.chaos.invariants import (
    PodSpan,
    all_resting,
    at_rest,
    attempt_overlaps,
    consistency_problems,
    event_problems,
    inconsistent_jobs,
    job_violations,
    lingering_gang_problems,
    nonzero_attempts,
    operator_tracebacks,
    outcome_problems,
    overlap_violations,
    own_tracebacks,
    will_finish_soon,
)
from finetune_testbed.chaos.plans import JobPlan


def job(name="j", phase="Running", attempt=1, failures=0, resumes=0, restarts=None, reason=None, uid="u1",
        workers=None):
    status = {"phase": phase, "attempt": attempt, "failures": failures, "resumes": resumes,
              "restarts": failures + resumes if restarts is None else restarts}
    if reason:
        status["reason"] = reason
    out = {"metadata": {"name": name, "uid": uid}, "status": status}
    if workers is not None:
        out["spec"] = {"workers": workers}
    return out


def pod(job_name="j", attempt=1, phase="Running", exit_code=None, deleting=False, evicted=False,
        started=None, rank=None):
    meta = {"name": f"{job_name}-{attempt}" if rank is None else f"{job_name}-{attempt}-{rank}",
            "labels": {"finetune.dev/job-name": job_name, "finetune.dev/attempt": str(attempt)}}
    if rank is not None:
        meta["labels"]["finetune.dev/rank"] = str(rank)
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"state": {"terminated": {"exitCode": exit_code}}}]
    elif started is not None:
        status["containerStatuses"] = [{"state": {"running": {
            "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}}}]
    if evicted:
        status["reason"] = "Evicted"
    return {"metadata": meta, "spec": {"nodeName": "n-0"}, "status": status}


# --- status vs pods -------------------------------------------------------------------------
def test_running_job_with_its_running_pod_is_consistent():
    assert consistency_problems(job(), [pod()]) == []


@pytest.mark.parametrize("pods, expected", [
    ([], "Running but pod j-1 is missing"),
    ([pod(phase="Pending")], "Running but pod j-1 is Pending"),
    ([pod(deleting=True)], "Running but pod j-1 is Running (deleting)"),
])
def test_running_without_a_running_pod(pods, expected):
    assert consistency_problems(job(), pods) == [expected]


def test_running_with_an_old_attempt_still_live():
    problems = consistency_problems(job(attempt=2, resumes=1), [pod(attempt=1), pod(attempt=2)])
    assert problems == ["Running with extra live pods ['j-1', 'j-2']"]


def test_finished_job_with_a_live_pod():
    problems = consistency_problems(job(phase="Succeeded"), [pod()])
    assert problems == ["Succeeded but pods still live: ['j-1']"]


def test_pods_of_later_attempts_than_the_status():
    resuming = job(phase="Resuming", attempt=1, resumes=1, reason="WaitingForPodToStop")
    problems = consistency_problems(resuming, [pod(attempt=1, phase="Failed", exit_code=143),
                                               pod(attempt=2, phase="Pending")])
    assert problems == ["pods of later attempts than status.attempt=1: ['j-2']"]


def test_starting_queued_resuming_against_the_current_pod():
    assert consistency_problems(job(phase="Starting"), [pod(phase="Pending")]) == []
    assert consistency_problems(job(phase="Starting"), []) == ["Starting but pod j-1 is missing"]
    assert consistency_problems(job(phase="Queued"), [pod()]) == ["Queued but pod j-1 is Running"]
    resuming = job(phase="Resuming", attempt=1, resumes=1)
    assert consistency_problems(resuming, [pod()]) == ["Resuming but pod j-1 is Running and not being stopped"]
    assert consistency_problems(resuming, [pod(deleting=True)]) == []


def test_counting_each_concluded_attempt_once():
    # attempt 3 running: two earlier attempts concluded
    assert consistency_problems(job(attempt=3, failures=1, resumes=1), [pod(attempt=3)]) == []
    assert consistency_problems(job(attempt=3, failures=1), [pod(attempt=3)]) == [
        "counting: failures 1 + resumes 0 != attempts concluded 2 (attempt 3, Running/None)"]
    # a counted final failure concludes the current attempt too
    failed = job(phase="Failed", attempt=2, failures=2, reason="BackoffLimitExceeded")
    assert consistency_problems(failed, []) == []
    assert consistency_problems(job(attempt=2, resumes=1, restarts=0), [pod(attempt=2)]) == [
        "restarts 0 != failures + resumes 1"]


def test_no_phase():
    assert consistency_problems({"metadata": {"name": "j"}, "status": {}}, []) == ["no status.phase"]


def test_inconsistent_jobs_names_only_the_wrong_ones():
    jobs = {"a": job("a"), "b": job("b")}
    pods = {"a-1": pod("a")}
    assert inconsistent_jobs(jobs, pods) == {"b": ["Running but pod b-1 is missing"]}


# --- at rest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("phase, reason, expected", [
    ("Succeeded", None, True), ("Failed", "BackoffLimitExceeded", True), ("Running", None, True),
    ("Queued", "Unschedulable", True), ("Queued", None, False), ("Queued", "CreatingPod", False),
    ("Resuming", "WaitingForPodToStop", True), ("Starting", None, False),
])
def test_at_rest(phase, reason, expected):
    assert at_rest(job(phase=phase, reason=reason), []) is expected


def test_a_job_whose_pod_is_about_to_end_is_not_resting():
    plan = JobPlan("j", "succeed", 1, run_for=30.0)
    jobs, young = {"j": job()}, {"j-1": pod(started=time.time() - 2)}
    assert will_finish_soon(plan, jobs["j"], list(young.values()))
    assert not all_resting({"j": plan}, jobs, young)
    old = {"j-1": pod(started=time.time() - 120)}
    assert all_resting({"j": plan}, jobs, old)
    # a `run` job never ends by itself
    assert not will_finish_soon(JobPlan("j", "run", 1), jobs["j"], list(young.values()))


# --- outcomes ---------------------------------------------------------------------------------
def test_nonzero_attempts_ignore_stops_and_disruptions():
    pods = [pod(attempt=1, phase="Failed", exit_code=1),
            pod(attempt=2, phase="Failed", exit_code=143),
            pod(attempt=3, phase="Failed", exit_code=2, evicted=True),
            pod(attempt=4, phase="Failed", exit_code=3, deleting=True),
            pod(attempt=5, phase="Succeeded", exit_code=0)]
    assert nonzero_attempts(pods) == {1}


def test_fail_job_must_fail_after_backoff_limit_plus_one_failures():
    plan = JobPlan("j", "fail", 1, backoff_limit=1)
    ok = job(phase="Failed", attempt=2, failures=2, reason="BackoffLimitExceeded")
    assert outcome_problems(plan, ok, set(), {1, 2}) == []
    short = job(phase="Failed", attempt=1, failures=1, reason="BackoffLimitExceeded")
    assert outcome_problems(plan, short, set(), {1}) == [
        "expected Failed/BackoffLimitExceeded with 2 failures, got Failed/BackoffLimitExceeded with 1"]


def test_disruptions_alone_never_count_as_failures():
    plan = JobPlan("j", "succeed", 1)
    st = job(attempt=2, failures=1)
    assert outcome_problems(plan, st, set(), set()) == [
        "failures 1 > attempts that were made to fail []",
        "1 failures although only disruptions were injected"]
    # an injected exit-code fault on attempt 1 makes that failure legitimate
    assert outcome_problems(plan, st, {1}, {1}) == []


def test_an_attempt_that_exited_nonzero_must_be_counted():
    plan = JobPlan("j", "succeed", 1)
    st = job(attempt=2, resumes=1)
    assert outcome_problems(plan, st, {1}, {1}) == [
        "failures 0 < attempts whose pods exited non-zero [1]"]


def test_a_gang_that_succeeded_despite_a_peer_exiting_nonzero():
    # rank 1 of attempt 2 exited 2 (an injected fault), rank 0 completed: the job succeeded
    plan = JobPlan("j", "succeed", 1, workers=2)
    done = job(phase="Succeeded", attempt=2, resumes=1, reason="Completed", workers=2)
    assert outcome_problems(plan, done, {2}, {2}) == []
    # ... but a non-zero exit in an earlier attempt must still have been counted
    assert outcome_problems(plan, done, {1}, {1}) == ["failures 0 < attempts whose pods exited non-zero [1]"]


def test_a_gang_attempt_with_an_evicted_rank_may_count_as_a_resume():
    # rank 0 exited 1 (injected), rank 1 was evicted in the same attempt: the gang rule puts
    # the cluster-caused end first, so a resume is right
    plan = JobPlan("j", "run", 1, workers=2)
    resumed = job(attempt=2, resumes=1, workers=2)
    assert outcome_problems(plan, resumed, {1}, {1}, {1}) == []
    # without the eviction the exit must have been counted
    assert outcome_problems(plan, resumed, {1}, {1}, set()) == [
        "failures 0 < attempts whose pods exited non-zero [1]"]
    # a single-pod job gets no such leeway
    single = JobPlan("j", "run", 1)
    assert outcome_problems(single, job(attempt=2, resumes=1), {1}, {1}, {1}) == [
        "failures 0 < attempts whose pods exited non-zero [1]"]


def test_run_job_failed_without_exit_faults():
    plan = JobPlan("j", "run", 1)
    st = job(phase="Failed", attempt=1, reason="PodLost")
    assert outcome_problems(plan, st, set(), set()) == [
        "Failed/PodLost (failures 0, resumes 0); injected exit faults on attempts []"]
    assert outcome_problems(plan, job(phase="Queued", reason="Unschedulable"), set(), set()) == [
        "expected Running, got Queued/Unschedulable"]


def test_evict_job_ends_with_max_resumes_exceeded():
    plan = JobPlan("j", "evict", 1, max_resumes=1, backoff_limit=20)
    ok = job(phase="Failed", attempt=2, resumes=2, reason="MaxResumesExceeded")
    assert outcome_problems(plan, ok, set(), set()) == []
    early = job(phase="Running", attempt=2, resumes=1)
    assert outcome_problems(plan, early, set(), set()) == [
        "expected Failed/MaxResumesExceeded with 2 resumes, got Running/None with 1 resumes, 0 failures"]


def test_job_violations_lost_statusless_and_unexpected():
    plans = {n: JobPlan(n, "run", 1) for n in ("a", "b", "c", "d")}
    jobs = {"b": {"metadata": {"name": "b"}, "status": {}},
            "c": job("c"),
            "d": job("d", phase="Failed", reason="PodLost")}
    violations, unexpected = job_violations(plans, jobs, [pod("c")], {})
    assert violations == [
        "a: lost (the TrainingJob no longer exists)",
        "b: has no status",
        "d [run]: Failed/PodLost (failures 0, resumes 0); injected exit faults on attempts []",
    ]
    assert unexpected == ["d"]


def test_overlap_violations():
    assert overlap_violations([{"job": "j", "pods": ["j-1", "j-2"], "t": 3.5}]) == [
        "j: pods of two attempts live at once at t=3.5s: ['j-1', 'j-2']"]


# --- gangs ------------------------------------------------------------------------------------
def test_a_gang_is_running_only_with_every_rank_running():
    two = job(workers=2)
    assert consistency_problems(two, [pod(rank=0), pod(rank=1)]) == []
    assert consistency_problems(two, [pod(rank=0)]) == ["Running but pod j-1-1 is missing"]
    assert consistency_problems(two, [pod(rank=0), pod(rank=1, phase="Failed", exit_code=1)]) == [
        "Running but pod j-1-1 is Failed"]
    assert consistency_problems(two, [pod(rank=0, deleting=True), pod(rank=1)]) == [
        "Running but pod j-1-0 is Running (deleting)"]


def test_a_gang_waits_while_its_slowest_rank_is_pending():
    starting, queued = job(phase="Starting", workers=2), job(phase="Queued", workers=2)
    assert consistency_problems(starting, [pod(rank=0), pod(rank=1, phase="Pending")]) == []
    assert consistency_problems(queued, [pod(rank=0), pod(rank=1, phase="Pending")]) == []
    assert consistency_problems(queued, []) == []  # written before its pods are made
    assert consistency_problems(starting, [pod(rank=0), pod(rank=1)]) == [
        "Starting but pod j-1-0 is Running, pod j-1-1 is Running"]
    assert consistency_problems(queued, [pod(rank=0), pod(rank=1)]) == [
        "Queued but pod j-1-0 is Running, pod j-1-1 is Running"]


def test_a_resuming_gang_must_be_stopping_every_rank():
    resuming = job(phase="Resuming", resumes=1, workers=2)
    evicted = pod(rank=1, phase="Failed", exit_code=143, evicted=True)
    assert consistency_problems(resuming, [pod(rank=0, deleting=True), evicted]) == []
    assert consistency_problems(resuming, [pod(rank=0), evicted]) == [
        "Resuming but pod j-1-0 is Running and not being stopped"]


def test_a_running_gang_with_the_previous_attempt_still_live():
    gang = [pod(attempt=2, rank=0), pod(attempt=2, rank=1)]
    problems = consistency_problems(job(attempt=2, resumes=1, workers=2), gang + [pod(attempt=1, rank=0)])
    assert problems == ["Running with extra live pods ['j-1-0', 'j-2-0', 'j-2-1']"]


def span(name, attempt, first_seen, stopping=None, ended=None, job_name="j"):
    return PodSpan(job_name, attempt, name, first_seen, stopping, ended)


def test_a_rank_left_running_after_its_attempt_concluded():
    """History: attempt 1 of j concluded at t=10 (rank 1 evicted). Rank 0 must be asked to stop
    within the stop grace and end within the end grace."""
    concluded = {("j", 1): 10.0}
    evicted = span("j-1-1", 1, 0.0, stopping=9.0, ended=9.5)
    stopped = span("j-1-0", 1, 0.0, stopping=11.0, ended=14.0)
    assert lingering_gang_problems(concluded, [evicted, stopped], now=100.0, stop_grace=30, end_grace=60) == []
    forgotten = span("j-1-0", 1, 0.0)
    assert lingering_gang_problems(concluded, [evicted, forgotten], now=100.0, stop_grace=30, end_grace=60) == [
        "j: attempt 1 concluded but pod j-1-0 was still live 90.0s later without being stopped (bound 30s)"]
    # not yet past the bound when the observation ends: no verdict yet
    assert lingering_gang_problems(concluded, [forgotten], now=35.0, stop_grace=30, end_grace=60) == []
    late = span("j-1-0", 1, 0.0, stopping=45.0, ended=46.0)
    assert lingering_gang_problems(concluded, [late], now=100.0, stop_grace=30, end_grace=60) == [
        "j: attempt 1 concluded but pod j-1-0 was live 35.0s longer without being stopped (bound 30s)"]
    stuck = span("j-1-0", 1, 0.0, stopping=12.0)  # asked to stop, never ended
    assert lingering_gang_problems(concluded, [stuck], now=100.0, stop_grace=30, end_grace=60) == [
        "j: attempt 1 concluded but pod j-1-0 was still live 90.0s later before it ended (bound 60s)"]


def test_a_pod_that_ended_by_itself_and_was_deleted_later_is_not_lingering():
    # attempt 1 failed at t=15 (the pod's own exit); pod GC deleted the pod at t=65 with its node
    concluded = {("j", 1): 15.5}
    gone = span("j-1", 1, 10.0, stopping=65.0, ended=15.4)
    assert lingering_gang_problems(concluded, [gone], now=100.0, stop_grace=30, end_grace=60) == []


def test_pods_of_attempts_that_did_not_conclude_are_not_judged():
    running = span("j-2-0", 2, 20.0)
    other_job = span("k-1-0", 1, 0.0, job_name="k")
    assert lingering_gang_problems({("j", 1): 10.0}, [running, other_job], now=500.0) == []


def test_a_rank_recreated_after_its_attempt_concluded_is_judged_from_its_birth():
    concluded = {("j", 1): 10.0}
    reborn = span("j-1-1", 1, 50.0)
    assert lingering_gang_problems(concluded, [reborn], now=70.0, stop_grace=30, end_grace=60) == []
    assert lingering_gang_problems(concluded, [reborn], now=90.0, stop_grace=30, end_grace=60) == [
        "j: attempt 1 concluded but pod j-1-1 was still live 40.0s later without being stopped (bound 30s)"]


def test_attempt_overlaps_from_pod_histories():
    old_gang = [span("j-1-0", 1, 0.0, stopping=10.0, ended=12.0), span("j-1-1", 1, 0.0, ended=9.0)]
    assert attempt_overlaps(old_gang + [span("j-2-0", 2, 12.0), span("j-2-1", 2, 12.5)]) == []
    # rank 0 of attempt 1 still terminating when attempt 2's rank 1 appeared
    assert attempt_overlaps(old_gang + [span("j-2-0", 2, 13.0), span("j-2-1", 2, 11.0)]) == [
        {"job": "j", "pods": ["j-1-0", "j-2-1"], "t": 11.0}]
    # two ranks of one attempt, and pods of other jobs, never overlap
    assert attempt_overlaps([span("j-1-0", 1, 0.0), span("j-1-1", 1, 0.5),
                             span("k-1", 1, 0.0, job_name="k"), span("k-2", 2, 5.0, job_name="k2")]) == []
    # an attempt's pod that never ended overlaps every later attempt
    assert attempt_overlaps([span("j-1", 1, 0.0), span("j-2", 2, 30.0)]) == [
        {"job": "j", "pods": ["j-1", "j-2"], "t": 30.0}]


# --- Events -----------------------------------------------------------------------------------
def warning(name, uid="u1", count=1, kind="TrainingJob", type_="Warning"):
    return {"involvedObject": {"kind": kind, "name": name, "uid": uid}, "type": type_, "count": count}


def test_events_duplicated_and_missing():
    jobs = {"dup": job("dup", attempt=2, resumes=1),
            "lost": job("lost", phase="Failed", attempt=3, failures=3, reason="BackoffLimitExceeded"),
            "uncounted": job("uncounted", phase="Failed", reason="InvalidSpec")}
    events = [warning("dup", count=2),
              warning("lost"),
              warning("lost", uid="older-job-of-the-same-name", count=5),
              warning("lost", type_="Normal", count=5),
              warning("uncounted")]
    violations, missing = event_problems(jobs, events)
    assert violations == ["dup: 2 Warning Events for 1 counted interruptions/failures (duplicated Events)"]
    assert missing == 2  # "lost" has 1 of 3


# --- the operator's log -----------------------------------------------------------------------
LOG = """2024-05-01 10:00:00,000 INFO starting
2024-05-01 10:00:01,000 ERROR handler failed
Traceback (most recent call last):
  File "/x/finetune_operator/handlers.py", line 3, in on_event
    boom()
ValueError: boom
2024-05-01 10:00:02,000 INFO fine again
2024-05-01 10:00:03,000 WARNING library trouble
Traceback (most recent call last):
  File "/x/site-packages/aiohttp/client.py", line 9, in get
ConnectionError: reset
"""


def test_operator_tracebacks_and_own_ones():
    tracebacks = operator_tracebacks(LOG)
    assert len(tracebacks) == 2
    assert tracebacks[0].splitlines()[0] == "2024-05-01 10:00:01,000 ERROR handler failed"
    assert tracebacks[0].splitlines()[-1] == "ValueError: boom"
    assert tracebacks[1].splitlines()[-1] == "ConnectionError: reset"
    assert own_tracebacks(tracebacks) == [tracebacks[0]]
    assert operator_tracebacks("2024-05-01 10:00:00,000 INFO all quiet\n") == []


# --- shards ---------------------------------------------------------------------------------------
def test_shared_holdings_finds_overlaps_only():
    from finetune_testbed.chaos.invariants import Holding, shared_holdings

    handover = [Holding("ns/a", "a-1", 0, 10), Holding("ns/a", "a-2", 10, None),  # touching: fine
                Holding("ns/b", "b-1", 0, None), Holding("ns/c", "a-1", 0, 5), Holding("ns/c", "a-1", 4, 9)]
    assert shared_holdings(handover) == []
    overlap = [Holding("ns/a", "a-1", 0, 10.5), Holding("ns/a", "a-2", 10, None)]
    assert shared_holdings(overlap) == ["ns/a: held by a-1 from 0.000 to 10.500 and by a-2 from 10.000"]
    still_held = [Holding("ns/a", "a-1", 0, None), Holding("ns/a", "b-1", 100, 101)]
    assert len(shared_holdings(still_held)) == 1


def test_holdings_and_acts_from_operator_logs():
    from finetune_testbed.chaos.invariants import acts_from_log, holdings_from_log, unheld_acts

    log = "\n".join([
        "2026-12-01 04:00:00,000 INFO    finetune.operator: operator starting",
        "2026-12-01 04:00:01,250 DEBUG   finetune.reconcile: ns/j1: holding (shard a)",
        "2026-12-01 04:00:01,300 DEBUG   finetune.reconcile: ns/j2: holding (shard a)",
        "2026-12-01 04:00:02,000 INFO    finetune.reconcile: ns/j1: pod j1-1 created",
        "2026-12-01 04:00:05,000 DEBUG   finetune.reconcile: ns/j2: released (deleted, or moved out of this shard)",
        "2026-12-01 04:00:06,000 INFO    finetune.reconcile: ns/j2: deleting pod j2-1 (Superseded)",
    ])
    base = time.mktime(time.strptime("2026-12-01 04:00:00", "%Y-%m-%d %H:%M:%S"))
    holdings = holdings_from_log(log, "a-1", ended_at=base + 9)
    assert sorted((h.job, round(h.start - base, 3), h.end - base) for h in holdings) == [
        ("ns/j1", 1.25, 9.0), ("ns/j2", 1.3, 5.0)]
    acts = acts_from_log(log, "a-1")
    assert [(j, t - base) for j, _, t, _ in acts] == [("ns/j1", 2.0), ("ns/j2", 6.0)]
    assert unheld_acts(acts, holdings) == [
        f"a-1 acted on ns/j2 at {base + 6:.3f} (deleting pod j2-1) without holding it"]
