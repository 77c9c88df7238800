"""The invariants of a chaos run, as pure functions over TrainingJob, Pod and Event dicts
(as the API server returns them); each returns the problems it found, as text."""
from __future__ import annotations

import calendar
import re
import time
from collections import Counter
from collections.abc import Iterable

from .common import attempt_of, disrupted_pod, exit_code_of, pod_live, pods_by_job
from .plans import JobPlan

TERMINAL = ("Succeeded", "Failed")
# Failed with these reasons concludes the last attempt as counted (a failure or a resume);
# any other Failed reason is an uncounted failure.
COUNTED_FAILURE_REASONS = ("BackoffLimitExceeded", "MaxResumesExceeded")
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# --- status vs pods ---------------------------------------------------------------------------
def consistency_problems(job: dict, pods: list[dict]) -> list[str]:
    """Does the job's status tell the truth about its pods (and count correctly)?"""
    status = job.get("status") or {}
    phase, attempt = status.get("phase"), status.get("attempt") or 0
    name = job["metadata"]["name"]
    if not phase:
        return ["no status.phase"]
    out = _phase_problems(name, phase, attempt, pods)
    future = [p["metadata"]["name"] for p in pods if attempt_of(p) > attempt]
    if future:
        out.append(f"pods of later attempts than status.attempt={attempt}: {future}")
    return out + _counting_problems(status)


def _phase_problems(name: str, phase: str, attempt: int, pods: list[dict]) -> list[str]:
    """The phase against the live pods and the current attempt's pod."""
    out = []
    live = [p for p in pods if pod_live(p)]
    current = next((p for p in pods if p["metadata"]["name"] == f"{name}-{attempt}"), None)
    cur_phase = (current or {}).get("status", {}).get("phase")
    deleting = current is not None and current["metadata"].get("deletionTimestamp")
    if phase in TERMINAL and live:
        out.append(f"{phase} but pods still live: {[p['metadata']['name'] for p in live]}")
    if phase == "Running":
        if current is None or cur_phase != "Running" or deleting:
            state = "missing" if current is None else cur_phase + (" (deleting)" if deleting else "")
            out.append(f"Running but pod {name}-{attempt} is {state}")
        elif len(live) > 1:
            out.append(f"Running with extra live pods {[p['metadata']['name'] for p in live]}")
    if phase == "Starting" and (current is None or cur_phase != "Pending"):
        out.append(f"Starting but pod {name}-{attempt} is {cur_phase or 'missing'}")
    if phase == "Queued" and current is not None and cur_phase != "Pending":
        out.append(f"Queued but pod {name}-{attempt} is {cur_phase}")
    if phase == "Resuming" and cur_phase == "Running" and not deleting:
        out.append(f"Resuming but pod {name}-{attempt} is Running and not being stopped")
    return out


def _counting_problems(status: dict) -> list[str]:
    """Each ended attempt counted once: failures + resumes == attempts concluded, and
    restarts == failures + resumes."""
    out = []
    phase, attempt = status.get("phase"), status.get("attempt") or 0
    failures, resumes = status.get("failures") or 0, status.get("resumes") or 0
    concluded = phase == "Resuming" or (phase == "Failed" and status.get("reason") in COUNTED_FAILURE_REASONS)
    if failures + resumes != attempt - 1 + int(concluded):
        out.append(f"counting: failures {failures} + resumes {resumes} != attempts concluded "
                   f"{attempt - 1 + int(concluded)} (attempt {attempt}, {phase}/{status.get('reason')})")
    if (status.get("restarts") or 0) != failures + resumes:
        out.append(f"restarts {status.get('restarts')} != failures + resumes {failures + resumes}")
    return out


def inconsistent_jobs(jobs: dict[str, dict], pods: dict[str, dict]) -> dict[str, list[str]]:
    """Jobs (by name) whose status does not match their pods, with the problems."""
    by_job = pods_by_job(pods.values())
    problems = {n: consistency_problems(j, by_job[n]) for n, j in jobs.items()}
    return {n: v for n, v in problems.items() if v}


# --- at rest ------------------------------------------------------------------------------------
def at_rest(job: dict, pods: list[dict]) -> bool:
    """Finished, Running, or waiting (Queued/Resuming) with a reason it is waiting for."""
    status = job.get("status") or {}
    phase = status.get("phase")
    if phase in TERMINAL or phase == "Running":
        return True
    return phase in ("Queued", "Resuming") and bool(status.get("reason")) and \
        status.get("reason") not in ("CreatingPod",)


def pod_started(pod: dict | None) -> float | None:
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if started:
            return calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
    return None


def will_finish_soon(plan: JobPlan, job: dict, pods: list[dict], slack: float = 5.0) -> bool:
    """A job whose current pod is going to end by itself (its simulated run-for is not over)."""
    status = job.get("status") or {}
    if plan.kind not in ("succeed", "fail", "evict") or status.get("phase") != "Running":
        return False
    current = next((p for p in pods if p["metadata"]["name"] == f"{plan.name}-{status.get('attempt')}"), None)
    started = pod_started(current)
    return started is not None and time.time() - started < (plan.run_for or 0) + slack


def all_resting(plans: dict[str, JobPlan], jobs: dict[str, dict], pods: dict[str, dict]) -> bool:
    """Every job at rest and none about to change by itself: the end state is reached."""
    by_job = pods_by_job(pods.values())
    return all(at_rest(j, by_job[n]) and not (
        n in plans and will_finish_soon(plans[n], j, by_job[n]))
        for n, j in jobs.items())


# --- outcomes -----------------------------------------------------------------------------------
def nonzero_attempts(pods: list[dict]) -> set[int]:
    """Attempts whose pod (still there) really exited non-zero: not disrupted, not SIGTERMed."""
    return {attempt_of(p) for p in pods
            if (p.get("status") or {}).get("phase") == "Failed" and not disrupted_pod(p)
            and not p["metadata"].get("deletionTimestamp") and exit_code_of(p) not in (None, 0, 143)}


def outcome_problems(plan: JobPlan, job: dict, exit_faulted: set[int], nonzero: set[int]) -> list[str]:
    """nonzero: attempts whose pod is still there and exited non-zero (the operator had every
    chance to see it; a failed pod deleted before anyone looked cannot be held against it)."""
    status = job.get("status") or {}
    failures, attempt = status.get("failures") or 0, status.get("attempt") or 0
    out = []
    real_failures = exit_faulted | (set(range(1, attempt + 1)) if plan.kind == "fail" else set())
    if failures > len(real_failures):
        out.append(f"failures {failures} > attempts that were made to fail {sorted(real_failures)}")
    seen = nonzero & set(range(1, attempt + 1))
    if failures < len(seen) and not (status.get("phase") == "Failed" and failures > plan.backoff_limit):
        out.append(f"failures {failures} < attempts whose pods exited non-zero {sorted(seen)}")
    if plan.kind in ("succeed", "run", "evict") and not exit_faulted and failures:
        out.append(f"{failures} failures although only disruptions were injected")
    return out + _end_state_problems(plan, status, exit_faulted)


def _end_state_problems(plan: JobPlan, status: dict, exit_faulted: set[int]) -> list[str]:
    """The final phase and reason each kind of job may end in, given the injected faults."""
    phase, reason = status.get("phase"), status.get("reason")
    failures, resumes = status.get("failures") or 0, status.get("resumes") or 0
    out = []
    if plan.kind in ("succeed", "run") and phase == "Failed" and not (
            reason == "BackoffLimitExceeded" and failures == plan.backoff_limit + 1 and exit_faulted):
        out.append(f"Failed/{reason} (failures {failures}, resumes {resumes}); injected exit faults "
                   f"on attempts {sorted(exit_faulted)}")
    if plan.kind == "fail" and (
            phase != "Failed" or reason != "BackoffLimitExceeded" or failures != plan.backoff_limit + 1):
        out.append(f"expected Failed/BackoffLimitExceeded with {plan.backoff_limit + 1} failures, "
                   f"got {phase}/{reason} with {failures}")
    if plan.kind == "evict":
        ok_evicted = phase == "Failed" and reason == "MaxResumesExceeded" and resumes == plan.max_resumes + 1
        ok_failed = phase == "Failed" and reason == "BackoffLimitExceeded" and exit_faulted
        if not (ok_evicted or ok_failed):
            out.append(f"expected Failed/MaxResumesExceeded with {plan.max_resumes + 1} resumes, "
                       f"got {phase}/{reason} with {resumes} resumes, {failures} failures")
    if plan.kind == "succeed" and phase not in ("Succeeded", "Failed", "Running"):
        out.append(f"expected Succeeded, got {phase}/{reason}")
    if plan.kind == "run" and phase not in ("Running", "Failed"):
        out.append(f"expected Running, got {phase}/{reason}")
    return out


def job_violations(plans: dict[str, JobPlan], jobs: dict[str, dict], pods: Iterable[dict],
                   exit_faulted: dict[str, set[int]]) -> tuple[list[str], list[str]]:
    """Every planned job: not lost, has a status that matches its pods, at rest, with an
    outcome that fits what was injected. Returns the violations and the names of the jobs
    with unexpected outcomes (worth describing in the report)."""
    violations: list[str] = []
    unexpected: list[str] = []
    by_job = pods_by_job(pods)
    for name, plan in sorted(plans.items()):
        job = jobs.get(name)
        if job is None:
            violations.append(f"{name}: lost (the TrainingJob no longer exists)")
            continue
        if not (job.get("status") or {}).get("phase"):
            violations.append(f"{name}: has no status")
            continue
        for p in consistency_problems(job, by_job[name]):
            violations.append(f"{name} [{plan.kind}]: {p}")
        if not at_rest(job, by_job[name]):
            st = job["status"]
            violations.append(f"{name} [{plan.kind}]: not at rest: {st.get('phase')}/{st.get('reason')}: "
                              f"{st.get('message')}")
        found = outcome_problems(plan, job, exit_faulted.get(name, set()), nonzero_attempts(by_job[name]))
        for p in found:
            violations.append(f"{name} [{plan.kind}]: {p}")
        if found:
            unexpected.append(name)
    return violations, unexpected


def overlap_violations(overlaps: list[dict]) -> list[str]:
    """The 'never two live pods of one job' breaches the pod watch saw."""
    return [f"{o['job']}: two live pods at once at t={o['t']}s: {o['pods']}" for o in overlaps]


# --- Events -------------------------------------------------------------------------------------
def event_problems(jobs: dict[str, dict], events: list[dict]) -> tuple[list[str], int]:
    """Warning Events against the counters: more Warnings than counted interruptions and
    failures (+1 for an uncounted failure) are duplicates, a violation; fewer are Events lost
    with a killed operator, only counted. Returns the violations and the missing count."""
    warnings: Counter = Counter()
    for e in events:
        inv = e.get("involvedObject") or {}
        if inv.get("kind") == "TrainingJob" and e.get("type") == "Warning":
            job = jobs.get(inv.get("name") or "")
            if job is not None and inv.get("uid") == job["metadata"].get("uid"):
                warnings[inv["name"]] += e.get("count") or 1
    violations, missing = [], 0
    for name, job in jobs.items():
        st = job.get("status") or {}
        expected = (st.get("failures") or 0) + (st.get("resumes") or 0)
        if st.get("phase") == "Failed" and st.get("reason") not in COUNTED_FAILURE_REASONS:
            expected += 1
        if warnings[name] > expected:
            violations.append(f"{name}: {warnings[name]} Warning Events for {expected} counted "
                              f"interruptions/failures (duplicated Events)")
        missing += max(0, expected - warnings[name])
    return violations, missing


# --- the operator's log -------------------------------------------------------------------------
def operator_tracebacks(log_text: str) -> list[str]:
    """Each traceback in the operator's log with the log record that introduced it."""
    out, current = [], None
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            current = [lines[i - 1]] if i else []
            current.append(line)
        elif current is not None:
            if LOG_RECORD.match(line) or line.startswith("--- start"):
                out.append("\n".join(current))
                current = None
            else:
                current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def own_tracebacks(tracebacks: list[str], limit: int = 5) -> list[str]:
    """Tracebacks through the operator's own code (a library's alone is not our bug)."""
    return [tb for tb in tracebacks if "finetune_operator" in tb][:limit]
