"""What a job's state and status changes mean for the operator metrics (names and rules in
docs/CONTRACTS.md). Reads the parsed models only, never raw spec/status dicts."""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from . import metrics
from .api import SpecError, TrainingJobSpec, TrainingJobStatus, parse_spec, parse_status
from .core import parse_time

# stalled_jobs' threshold for a Running job whose spec sets no stallTimeoutSeconds (the model's
# default: no stall restarts): docs/CONTRACTS.md fixes it so the alert still catches such a job.
UNSET_STALL_ALERT_SECONDS = 1800


def stall_alert_seconds(spec: TrainingJobSpec | None) -> int:
    timeout = spec.run_policy.stall_timeout_seconds if spec is not None else None
    return timeout if timeout is not None else UNSET_STALL_ALERT_SECONDS


def fleet_row(job: Mapping[str, Any], now: dt.datetime, status: TrainingJobStatus | None = None,
              stall_seconds: int | None = None) -> dict[str, Any]:
    """One job's part of the fleet gauges, as docs/CONTRACTS.md defines them: how long it has
    been Queued (since its attempt started, else since creation) and whether it is Running
    without a step heartbeat (else since the attempt started) for longer than its stall timeout.
    `status` and `stall_seconds` (job_stall_seconds) may come parsed already: the reconciler
    keeps them per resourceVersion, so a scrape of 1,000 jobs does not run pydantic 2,000 times."""
    status = parse_status(job.get("status")) if status is None else status
    phase = status.phase or "Queued"
    row: dict[str, Any] = {"phase": phase}
    if phase == "Queued":
        since = status.attempt_start_time or parse_time((job.get("metadata") or {}).get("creationTimestamp"))
        row["queued_for"] = (now - since).total_seconds() if since else None
    if phase == "Running":
        threshold = job_stall_seconds(job) if stall_seconds is None else stall_seconds
        last = (status.progress.heartbeat_time if status.progress else None) or status.attempt_start_time
        row["stalling"] = last is not None and (now - last).total_seconds() > threshold
    return row


def job_stall_seconds(job: Mapping[str, Any]) -> int:
    """The stalled_jobs threshold of this job's spec."""
    try:
        spec: TrainingJobSpec | None = parse_spec(job.get("spec"))
    except SpecError:
        spec = None  # decide() fails such a job; until then the contract's threshold applies
    return stall_alert_seconds(spec)


def record_status_change(namespace: str, spec: TrainingJobSpec | None, created: dt.datetime | None,
                         old: TrainingJobStatus, new: TrainingJobStatus, now: dt.datetime) -> None:
    """Counters and histograms for one written status change (old -> new)."""
    if old.phase != new.phase:
        metrics.TRANSITIONS.labels(namespace, old.phase or "None", new.phase or "None", new.reason or "").inc()
        if new.phase == "Running" and new.attempt == 1 and created:
            metrics.QUEUED_SECONDS.observe(max(0.0, (now - created).total_seconds()))
    reason = (new.last_interruption.reason if new.last_interruption else None) or "Unknown"
    if new.resumes > old.resumes:
        metrics.RESUMES.labels(namespace, reason).inc(new.resumes - old.resumes)
        started = new.attempt_start_time or old.attempt_start_time
        # A spec that fails validation fails the job before any resume: spec is set here.
        gpus = spec.resources.gpus if spec is not None else 0
        if started:
            seconds = max(0.0, (now - started).total_seconds()) * float(gpus)
            metrics.INTERRUPTED_GPU_SECONDS.labels(namespace, reason).inc(seconds)
    if new.failures > old.failures:
        metrics.FAILURES.labels(namespace, reason).inc(new.failures - old.failures)
    old_step = (old.progress.step if old.progress else None) or 0
    new_step = (new.progress.step if new.progress else None) or 0
    if old_step == 0 and new_step > 0 and new.attempt == 1 and created:
        metrics.TIME_TO_FIRST_STEP.observe(max(0.0, (now - created).total_seconds()))
