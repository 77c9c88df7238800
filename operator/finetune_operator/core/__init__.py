"""The pure decision core: observations in, (status, actions, wake-up) out. No I/O, no clock."""

from .actions import Action, CreatePod, Decision, DeleteJob, DeletePod, Event
from .classify import START_ERRORS, match_failure_policy
from .conditions import CONDITION_TYPES
from .decide import decide
from .observation import (
    ContainerRunning,
    ContainerTerminated,
    ContainerWaiting,
    Observation,
    PodCondition,
    PodObservation,
    ProgressSample,
)
from .job_facts import observe_job
from .patch import merge_patch
from .pod_facts import observe_pod, observe_pods, parse_time
from .privileged import privileged_settings
from .progress import status_changed_materially
from .timing import backoff_seconds
from .trainer_metrics import parse_trainer_metrics

__all__ = [
    "Action",
    "CONDITION_TYPES",
    "ContainerRunning",
    "ContainerTerminated",
    "ContainerWaiting",
    "CreatePod",
    "Decision",
    "DeleteJob",
    "DeletePod",
    "Event",
    "Observation",
    "PodCondition",
    "PodObservation",
    "ProgressSample",
    "START_ERRORS",
    "backoff_seconds",
    "decide",
    "match_failure_policy",
    "merge_patch",
    "observe_job",
    "observe_pod",
    "observe_pods",
    "parse_time",
    "parse_trainer_metrics",
    "privileged_settings",
    "status_changed_materially",
]
