"""The pure decision core: observations in, (status, actions, wake-up) out. No I/O, no clock."""

from .actions import Action, CreatePod, CreateService, Decision, DeleteJob, DeletePod, Event
from .decide import decide
from .job_facts import NodeFacts, UnreadyNodes, observe_job
from .observation import (
    ContainerRunning,
    ContainerTerminated,
    ContainerWaiting,
    Observation,
    PodCondition,
    PodObservation,
    ProgressSample,
    pod_name,
)
from .pod_facts import counts_for, observe_pod, observe_pods, parse_time
from .privileged import privileged_settings
from .progress import status_changed_materially
from .timing import backoff_seconds
from .trainer_metrics import parse_trainer_metrics

__all__ = [
    "Action",
    "ContainerRunning",
    "ContainerTerminated",
    "ContainerWaiting",
    "CreatePod",
    "CreateService",
    "Decision",
    "DeleteJob",
    "DeletePod",
    "Event",
    "NodeFacts",
    "Observation",
    "PodCondition",
    "PodObservation",
    "ProgressSample",
    "UnreadyNodes",
    "backoff_seconds",
    "counts_for",
    "decide",
    "observe_job",
    "observe_pod",
    "observe_pods",
    "parse_time",
    "pod_name",
    "parse_trainer_metrics",
    "privileged_settings",
    "status_changed_materially",
]
