"""The invariants of a chaos run, as pure functions over TrainingJob, Pod and Event dicts
(as the API server returns them); each returns the problems it found, as text."""
from __future__ import annotations

import calendar
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .common import attempt_of, disrupted_pod, exit_code_of, pod_live, pods_by_job, rank_of
from .plans import JobPlan

TERMINAL = ("Succeeded", "Failed")
# Failed with these reasons concludes the last attempt as counted (a failure or a resume);
# any other Failed reason is an uncounted failure.
COUNTED_FAILURE_REASONS = ("BackoffLimitExceeded", "MaxResumesExceeded")
class _OfJob(Protocol):
    @property
    def job(self) -> str: ...


T = TypeVar("T", bound=_OfJob)
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# --- status vs pods ---------------------------------------------------------------------------
def consistency_problems(job: dict, pods: list[dict]) -> list[str]:
    """Does the job's status tell the truth about its pods (and count correctly)?"""
    status = job.get("status") or {}
    phase, attempt = status.get("phase"), status.get("attempt") or 0
    name = job["metadata"]["name"]
    if not phase:
        return ["no status.phase"]
    out = _phase_problems(name, phase, attempt, workers_of(job), pods)
    future = [p["metadata"]["name"] for p in pods if attempt_of(p) > attempt]
    if future:
        out.append(f"pods of later attempts than status.attempt={attempt}: {future}")
    return out + _counting_problems(status)


def workers_of(job: dict) -> int:
    return int((job.get("spec") or {}).get("workers") or 1)


def gang_pod_name(name: str, attempt: int, rank: int, workers: int) -> str:
    """The operator's pod names: <job>-<attempt>, or <job>-<attempt>-<rank> in a gang."""
    return f"{name}-{attempt}" if workers == 1 else f"{name}-{attempt}-{rank}"


def _phase_problems(name: str, phase: str, attempt: int, workers: int, pods: list[dict]) -> list[str]:
    """The phase against the live pods and the current attempt's gang (one pod per rank)."""
    out = []
    live = [p for p in pods if pod_live(p)]
    gang = {rank_of(p): p for p in pods if attempt_of(p) == attempt}
    states = {r: _pod_state(gang.get(r)) for r in range(workers)}
    label = {r: gang_pod_name(name, attempt, r, workers) for r in range(workers)}
    if phase in TERMINAL and live:
        out.append(f"{phase} but pods still live: {[p['metadata']['name'] for p in live]}")
    if phase == "Running":
        bad = [f"pod {label[r]} is {s}" for r, s in states.items() if s != "Running"]
        if bad:
            out.append("Running but " + ", ".join(bad))
        elif len(live) > workers:
            out.append(f"Running with extra live pods {sorted(p['metadata']['name'] for p in live)}")
    # a gang is Starting/Queued while its slowest rank is: some rank still Pending
    pending = [r for r, s in states.items() if s in ("Pending", "missing")]
    if phase == "Starting" and not [r for r in pending if states[r] == "Pending"]:
        out.append(f"Starting but {_listing(states, label)}")
    if phase == "Queued" and gang and not pending:
        out.append(f"Queued but {_listing(states, label)}")
    if phase == "Resuming":
        running = [label[r] for r, s in states.items() if s == "Running"]
        if running:
            out.append(f"Resuming but {', '.join(f'pod {n}' for n in running)} "
                       f"{'is' if len(running) == 1 else 'are'} Running and not being stopped")
    return out


def _pod_state(pod: dict | None) -> str:
    if pod is None:
        return "missing"
    phase = (pod.get("status") or {}).get("phase") or "Unknown"
    return phase + (" (deleting)" if pod["metadata"].get("deletionTimestamp") else "")


def _listing(states: dict[int, str], label: dict[int, str]) -> str:
    return ", ".join(f"pod {label[r]} is {s}" for r, s in states.items())


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
    gang = [p for p in pods if attempt_of(p) == status.get("attempt")]
    # a gang's ranks each run for run_for from their own start: the last to start ends last
    starts = [pod_started(p) for p in gang]
    started = max((s for s in starts if s is not None), default=None)
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


def outcome_problems(plan: JobPlan, job: dict, exit_faulted: set[int], nonzero: set[int],
                     disrupted: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """nonzero: attempts whose pod is still there and exited non-zero (the operator had every
    chance to see it; a failed pod deleted before anyone looked cannot be held against it).
    disrupted: attempts in which the harness evicted, deleted or lost some pod."""
    status = job.get("status") or {}
    failures, attempt = status.get("failures") or 0, status.get("attempt") or 0
    out = []
    real_failures = exit_faulted | (set(range(1, attempt + 1)) if plan.kind == "fail" else set())
    if failures > len(real_failures):
        out.append(f"failures {failures} > attempts that were made to fail {sorted(real_failures)}")
    seen = nonzero & set(range(1, attempt + 1))
    if status.get("phase") == "Succeeded":
        # rank 0 exiting 0 is the job succeeding (docs/CONTRACTS.md "Gangs"): a peer's
        # non-zero exit in that same attempt is not a failure of the job
        seen.discard(attempt)
    if plan.workers > 1:
        # a gang's cluster-caused end outranks a peer's exit (docs/CONTRACTS.md "Gangs"): an
        # attempt that also had a rank evicted or lost may rightly be counted as a resume
        seen -= set(disrupted)
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
                   exit_faulted: dict[str, set[int]],
                   disrupted: dict[str, set[int]] | None = None) -> tuple[list[str], list[str]]:
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
        found = outcome_problems(plan, job, exit_faulted.get(name, set()), nonzero_attempts(by_job[name]),
                                 (disrupted or {}).get(name, set()))
        for p in found:
            violations.append(f"{name} [{plan.kind}]: {p}")
        if found:
            unexpected.append(name)
    return violations, unexpected


def overlap_violations(overlaps: list[dict]) -> list[str]:
    """The 'never pods of two attempts of one job live at once' breaches."""
    return [f"{o['job']}: pods of two attempts live at once at t={o['t']}s: {o['pods']}" for o in overlaps]


# --- gangs over time ------------------------------------------------------------------------------
# A concluded attempt's pods must be stopped (deletion asked, or ended) this soon after its
# job's status said so. The operator does it in its next reconcile; the bound leaves room for
# the faults that delay one (operator SIGSTOP up to 8 s, SIGKILL + restart, an API server
# outage of up to 6 s), not for a rank that is forgotten.
STOP_GRACE_SECONDS = 30.0
# ... and ended this soon: the stop grace, plus a trainer's checkpoint after SIGTERM (chaos
# plans: up to 6 s), plus the operator's force-delete of a pod on a lost node (--node-lost-seconds 10).
END_GRACE_SECONDS = 60.0
CONCLUDED_PHASES = ("Resuming", "Failed", "Succeeded", "Suspended")


@dataclass
class PodSpan:
    """One pod's life as a watch saw it (times from one monotonic clock): live from
    `first_seen`, asked to stop at `stopping` (deletionTimestamp first seen), not live any
    more at `ended` (a finished phase, or deleted)."""
    job: str
    attempt: int
    name: str
    first_seen: float
    stopping: float | None = None
    ended: float | None = None


def lingering_gang_problems(concluded: dict[tuple[str, int], float], spans: Iterable[PodSpan], now: float,
                            stop_grace: float = STOP_GRACE_SECONDS,
                            end_grace: float = END_GRACE_SECONDS) -> list[str]:
    """No attempt with a partial gang left running: once a job's status said attempt A
    concluded (at concluded[(job, A)]), every pod of A is asked to stop within stop_grace and
    has ended within end_grace (checked up to `now`, the end of the observation)."""
    out = []
    for span in spans:
        t_done = concluded.get((span.job, span.attempt))
        if t_done is None:
            continue
        since = max(t_done, span.first_seen)  # a pod made after the conclusion counts from its birth
        # a pod that ended by itself and was deleted later (pod GC, a drain) stopped when it ended
        stopped = min((x for x in (span.stopping, span.ended) if x is not None), default=None)
        if _late(stopped, since + stop_grace, now):
            out.append(f"{span.job}: attempt {span.attempt} concluded but pod {span.name} was "
                       f"{_how_long(stopped, since, now)} without being stopped (bound {stop_grace:.0f}s)")
        elif _late(span.ended, since + end_grace, now):
            out.append(f"{span.job}: attempt {span.attempt} concluded but pod {span.name} was "
                       f"{_how_long(span.ended, since, now)} before it ended (bound {end_grace:.0f}s)")
    return out


def _late(t: float | None, bound: float, now: float) -> bool:
    return (t is None and now > bound) or (t is not None and t > bound)


def _how_long(t: float | None, since: float, now: float) -> str:
    return f"still live {now - since:.1f}s later" if t is None else f"live {t - since:.1f}s longer"


def attempt_overlaps(spans: Iterable[PodSpan]) -> list[dict]:
    """Moments when pods of two attempts of one job were live at once (live: from first_seen
    until ended), one entry per pair of overlapping pods of different attempts."""
    out = []
    for job, a, b in _overlapping(spans, lambda s: s.first_seen, lambda s: s.ended, lambda s: s.attempt):
        out.append({"job": job, "pods": sorted([a.name, b.name]), "t": round(b.first_seen, 1)})
    return out


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


# --- shards (docs/SHARDING.md) ------------------------------------------------------------------
@dataclass(frozen=True)
class Holding:
    """Replica `replica` held job `job` from `start` until `end` (epoch seconds; `end` None: still
    held when observed last)."""

    job: str
    replica: str
    start: float
    end: float | None = None


def shared_holdings(holdings: Iterable[Holding]) -> list[str]:
    """No job held by two replicas at once: one line per overlapping pair. Touching intervals
    (one ends where the next starts) do not overlap."""
    return [f"{job}: held by {a.replica} from {a.start:.3f} to {float('inf') if a.end is None else a.end:.3f} "
            f"and by {b.replica} from {b.start:.3f}"
            for job, a, b in _overlapping(holdings, lambda h: h.start, lambda h: h.end, lambda h: h.replica)]


def _overlapping(items: Iterable[T], start: Callable[[T], float], end: Callable[[T], float | None],
                 owner: Callable[[T], object]) -> list[tuple[str, T, T]]:
    """(job, a, b) for each pair of one job's intervals with different owners that overlap: b
    starts before a ends (an open end is open for ever; touching intervals do not overlap),
    a starting first."""
    by_job: defaultdict[str, list[T]] = defaultdict(list)
    for item in items:
        by_job[item.job].append(item)
    out = []
    for job, group in sorted(by_job.items()):
        group.sort(key=start)
        for i, a in enumerate(group):
            a_end = end(a)
            a_end = float("inf") if a_end is None else a_end
            out += [(job, a, b) for b in group[i + 1:] if owner(b) != owner(a) and start(b) < a_end]
    return out


def _log_time(stamp: str) -> float:
    """Epoch seconds of the operator's log timestamp (logging's asctime: local time, ms)."""
    whole, ms = stamp.split(",")
    return time.mktime(time.strptime(whole, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


# The operator's DEBUG lines when it takes and drops a job (reconciler.py, reconcile_step.py).
_HOLD = re.compile(r"^(\S+ \S+) \S+\s+finetune\.\S+: (\S+)/(\S+): (holding|released|moved to shard)")


def holdings_from_log(log_text: str, replica: str, ended_at: float | None = None) -> list[Holding]:
    """Holding intervals of one replica from its log (times in the log's local time); a job still
    held when the log ends is held until `ended_at` (the process's end; None: still running)."""
    out: list[Holding] = []
    open_at: dict[str, float] = {}
    for line in log_text.splitlines():
        m = _HOLD.match(line)
        if not m:
            continue
        stamp, ns, name, what = m.groups()
        t = _log_time(stamp)
        job = f"{ns}/{name}"
        if what == "holding":
            open_at.setdefault(job, t)
        elif job in open_at:
            out.append(Holding(job, replica, open_at.pop(job), t))
    out += [Holding(job, replica, t, ended_at) for job, t in open_at.items()]
    return out


_ACT = re.compile(r"^(\S+ \S+) \S+\s+finetune\.\S+: (\S+)/(\S+): (pod \S+ (?:created|adopted)|deleting pod \S+)")


def acts_from_log(log_text: str, replica: str) -> list[tuple[str, str, float, str]]:
    """(job, replica, time, what) for every pod the replica created, adopted or deleted."""
    out = []
    for line in log_text.splitlines():
        if m := _ACT.match(line):
            stamp, ns, name, what = m.groups()
            t = _log_time(stamp)
            out.append((f"{ns}/{name}", replica, t, what))
    return out


def unheld_acts(acts: Iterable[tuple[str, str, float, str]], holdings: Iterable[Holding]) -> list[str]:
    """Acts on a job by a replica that did not hold the job at that moment."""
    held = defaultdict(list)
    for h in holdings:
        held[(h.job, h.replica)].append(h)
    return [f"{replica} acted on {job} at {t:.3f} ({what}) without holding it"
            for job, replica, t, what in acts
            if not any(h.start <= t and (h.end is None or t <= h.end) for h in held[(job, replica)])]
