"""Builders for decision-core tests: specs, pods in every state, observations, a driven job."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.api import TrainingJobSpec, TrainingJobStatus, parse_spec
from finetune_operator.core import (
    ContainerRunning,
    ContainerTerminated,
    ContainerWaiting,
    Decision,
    Observation,
    PodCondition,
    PodObservation,
    ProgressSample,
    decide,
)

JOB = "ft"
T0 = datetime(2025, 1, 1, tzinfo=UTC)

BASE_SPEC: dict[str, Any] = {
    "image": "registry.example/trainer:1",
    "model": "tiny/model",
    "dataset": {"path": "/data/train.jsonl"},
    "hyperparameters": {"maxSteps": 1000},
}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_dict(**extra: Any) -> dict[str, Any]:
    return _deep_merge(BASE_SPEC, extra)


def make_spec(**extra: Any) -> TrainingJobSpec:
    return parse_spec(spec_dict(**extra))


def name(attempt: int) -> str:
    return f"{JOB}-{attempt}"


def pending_pod(attempt: int, unschedulable: str | None = None, **kw: Any) -> PodObservation:
    return PodObservation(name=name(attempt), attempt=attempt, uid=f"uid-{attempt}", phase="Pending",
                          unschedulable_message=unschedulable, creation_time=kw.pop("creation_time", T0), **kw)


def starting_pod(attempt: int, reason: str = "ContainerCreating", message: str | None = None,
                 **kw: Any) -> PodObservation:
    return PodObservation(name=name(attempt), attempt=attempt, uid=f"uid-{attempt}", phase="Pending",
                          scheduled=True, node_name=kw.pop("node_name", "node-a"),
                          container=ContainerWaiting(reason, message), creation_time=T0, **kw)


def running_pod(attempt: int, started: datetime = T0, **kw: Any) -> PodObservation:
    return PodObservation(name=name(attempt), attempt=attempt, uid=f"uid-{attempt}", phase="Running",
                          scheduled=True, node_name=kw.pop("node_name", "node-a"),
                          container=ContainerRunning(started), creation_time=T0, **kw)


def exited_pod(attempt: int, code: int, reason: str | None = None, report: dict[str, Any] | None = None,
               finished: datetime = T0, **kw: Any) -> PodObservation:
    phase = "Succeeded" if code == 0 else "Failed"
    reason = reason or ("Completed" if code == 0 else "Error")
    return PodObservation(name=name(attempt), attempt=attempt, uid=f"uid-{attempt}", phase=kw.pop("phase", phase),
                          scheduled=True, node_name=kw.pop("node_name", "node-a"),
                          container=ContainerTerminated(code, reason, None, finished),
                          termination_message=report, creation_time=T0, **kw)


def disruption(reason: str = "EvictionByEvictionAPI") -> tuple[PodCondition, ...]:
    return (PodCondition("DisruptionTarget", "True", reason, f"{reason} happened"),)


def observe(status: TrainingJobStatus | None = None, pods: tuple[PodObservation, ...] | list = (),
            now: datetime = T0, spec: TrainingJobSpec | None = None, **kw: Any) -> Observation:
    return Observation(now=now, status=status or TrainingJobStatus(), spec=spec if spec is not None else make_spec(),
                       job_name=JOB, generation=kw.pop("generation", 1), pods=tuple(pods), **kw)


def step(status: TrainingJobStatus | None, pods=(), now: datetime = T0, spec: TrainingJobSpec | None = None,
         **kw: Any) -> Decision:
    return decide(observe(status, pods, now, spec, **kw))


def running_job(spec: TrainingJobSpec | None = None, now: datetime = T0,
                sample: ProgressSample | None = None) -> TrainingJobStatus:
    """A job whose attempt 1 was created at `now` and is seen running at `now`."""
    queued = step(None, now=now, spec=spec).status
    return step(queued, [running_pod(1, started=now)], now=now, spec=spec, progress=sample).status
