"""When things are due: backoff, deadlines, timeouts. Pure arithmetic on status times."""

from __future__ import annotations

from datetime import datetime, timedelta

from ..api.models import RunPolicy, TrainingJobSpec, TrainingJobStatus


def backoff_seconds(policy: RunPolicy, restarts: int) -> int:
    """min(backoffSeconds * 2^(restarts-1), maxBackoffSeconds); restarts < 1 means no wait."""
    if restarts < 1 or policy.backoff_seconds == 0:
        return 0
    cap = policy.max_backoff_seconds
    # Stop doubling once past the cap so huge restart counts stay cheap.
    delay = policy.backoff_seconds
    for _ in range(restarts - 1):
        if delay >= cap:
            break
        delay *= 2
    return min(delay, cap)


def resume_at(spec: TrainingJobSpec, status: TrainingJobStatus) -> datetime | None:
    """Earliest time the next attempt may start after an interruption or failure."""
    interruption = status.last_interruption
    if interruption is None or interruption.time is None:
        return None
    return interruption.time + timedelta(seconds=backoff_seconds(spec.run_policy, status.restarts))


def deadline_at(spec: TrainingJobSpec, status: TrainingJobStatus) -> datetime | None:
    limit = spec.run_policy.active_deadline_seconds
    if limit is None or status.start_time is None:
        return None
    return status.start_time + timedelta(seconds=limit)


def start_timeout_at(
    spec: TrainingJobSpec, status: TrainingJobStatus, admitted_at: datetime | None = None
) -> datetime | None:
    """startTimeoutSeconds after the attempt started, or after Kueue admitted it when that is
    later (core.kueue.admitted_at: the time a pod waits in a queue is not start-up time)."""
    if status.attempt_start_time is None:
        return None
    start = max(status.attempt_start_time, admitted_at) if admitted_at else status.attempt_start_time
    return start + timedelta(seconds=spec.run_policy.start_timeout_seconds)


def ttl_at(spec: TrainingJobSpec | None, status: TrainingJobStatus) -> datetime | None:
    if spec is None or spec.run_policy.ttl_seconds_after_finished is None or status.completion_time is None:
        return None
    return status.completion_time + timedelta(seconds=spec.run_policy.ttl_seconds_after_finished)


def seconds_until(moment: datetime, now: datetime) -> float:
    return (moment - now).total_seconds()
