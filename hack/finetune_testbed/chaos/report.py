"""The report of a chaos run: what was injected, how the jobs ended, how long the statuses
took to tell the truth, and the violations; as a table and (via asdict) as JSON."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .common import attempt_of, disrupted_pod, exit_code_of

if TYPE_CHECKING:
    from .faults import Fault
    from .plans import JobPlan


@dataclass
class Report:
    jobs: int
    nodes: int
    seed: int
    fault_seconds: float
    faults: dict
    recoveries: dict
    phases: dict
    phases_by_kind: dict
    time_to_consistent: float | None
    time_to_quiet: float | None
    time_to_truth: float | None
    recovery_seconds: float
    settled: bool
    violations: list[str]
    missing_events: int
    operator_kills: int
    operator_tracebacks: int
    pods_created: int
    overlaps: list
    wall_seconds: float
    fault_log: list = field(default_factory=list)
    details: list = field(default_factory=list)
    gang_jobs: int = 0
    gang_attempts_concluded: int = 0  # attempts of gang jobs the partial-gang invariant judged

    def table(self) -> str:
        lines = [(f"chaos: {self.jobs} jobs on {self.nodes} nodes x 8 GPUs, faults for "
                  f"{self.fault_seconds:.0f}s, seed {self.seed}, {self.wall_seconds:.0f}s in all"), ""]
        lines.append(f"{'faults injected':28s} {'count':>6s}")
        for kind, n in sorted(self.faults.items()):
            lines.append(f"  {kind:26s} {n:6d}")
        lines.append(f"  {'total':26s} {sum(self.faults.values()):6d}")
        lines.append(f"{'recoveries':28s} {sum(self.recoveries.values()):6d}  "
                     + ", ".join(f"{k} {v}" for k, v in sorted(self.recoveries.items())))
        lines.append("")
        kinds = sorted({k for d in self.phases_by_kind.values() for k in d})
        lines.append(f"{'jobs by final phase':28s} {'count':>6s}  " + " ".join(f"{k:>8s}" for k in kinds))
        for phase, n in sorted(self.phases.items()):
            lines.append(f"  {phase:26s} {n:6d}  " + " ".join(
                f"{self.phases_by_kind.get(phase, {}).get(k, 0):8d}" for k in kinds))
        lines.append(f"  {'total':26s} {sum(self.phases.values()):6d}")
        lines.append(f"2-pod gangs: {self.gang_jobs} jobs, {self.gang_attempts_concluded} of their attempts "
                     "concluded (each checked for ranks left running)")
        lines.append(f"pods seen: {self.pods_created}; operator SIGKILLs: {self.operator_kills}; "
                     f"Warning Events missing (lost with a killed operator): {self.missing_events}")
        lines.append("")
        fmt = _seconds
        lines.append(f"time to truth after the last fault: {fmt(self.time_to_truth)} "
                     f"(statuses last disagreed with the pods {fmt(self.time_to_consistent)} after it, "
                     f"last status change {fmt(self.time_to_quiet)} after it, natural completions "
                     f"included; recoveries (uncordon, node re-creation, SIGCONT) took "
                     f"{fmt(self.recovery_seconds)}; settled: {self.settled})")
        lines.append(f"invariant violations: {len(self.violations)}")
        for v in self.violations[:50]:
            lines.append(f"  - {v}")
        if len(self.violations) > 50:
            lines.append(f"  ... {len(self.violations) - 50} more")
        if self.details:
            lines.append("")
            lines.append("jobs with unexpected outcomes (status, pods, faults that touched them):")
            lines.extend(self.details[:20])
        return "\n".join(lines)


def _seconds(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}s"


def describe(name: str, job: dict, pods: list[dict], faults: list[Fault]) -> str:
    """A job with an unexpected outcome: its status, its pods, the faults that touched them."""
    st = job.get("status") or {}
    li = st.get("lastInterruption") or {}
    lines = [(f"  {name}: {st.get('phase')}/{st.get('reason')} attempt {st.get('attempt')} "
              f"failures {st.get('failures')} resumes {st.get('resumes')}: {st.get('message')}"),
             f"    lastInterruption: {li.get('reason')} pod {li.get('pod')} at {li.get('time')}"]
    for p in sorted(pods, key=attempt_of):
        meta, status = p["metadata"], p.get("status") or {}
        lines.append(f"    pod {meta['name']}: {status.get('phase')} on {p['spec'].get('nodeName')} "
                     f"deleting={bool(meta.get('deletionTimestamp'))} exit={exit_code_of(p)} "
                     f"disrupted={disrupted_pod(p)}")
    touched = [f"t={f.t} {f.kind} {f.target}" for f in faults
               if any(pn.startswith(name + "-") for pn in f.pods)]
    lines.append(f"    faults: {touched}")
    return "\n".join(lines)


def phase_counts(jobs: dict[str, dict], plans: dict[str, JobPlan]) -> tuple[dict, dict]:
    """Jobs by final phase, and by final phase and planned kind."""
    phases = dict(Counter(_phase(j) for j in jobs.values()))
    by_kind = {ph: dict(Counter(plans[n].kind for n, j in jobs.items() if n in plans and _phase(j) == ph))
               for ph in {_phase(j) for j in jobs.values()}}
    return phases, by_kind


def _phase(job: dict) -> str:
    return (job.get("status") or {}).get("phase") or "None"
