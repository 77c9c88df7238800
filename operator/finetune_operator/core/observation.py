"""What the decision core is told about the world: plain, frozen facts (no API objects, no clock)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple

from ..api.models import TrainingJobSpec, TrainingJobStatus
from .run_definition import legacy_run_fingerprint, run_fingerprint

POD_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class PodCondition(NamedTuple):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class ContainerWaiting:
    reason: str | None = None  # ContainerCreating, ErrImagePull, ImagePullBackOff, ...
    message: str | None = None


@dataclass(frozen=True)
class ContainerRunning:
    started_at: datetime | None = None


@dataclass(frozen=True)
class ContainerTerminated:
    exit_code: int
    reason: str | None = None  # Completed, Error, OOMKilled, ...
    message: str | None = None
    finished_at: datetime | None = None


ContainerState = ContainerWaiting | ContainerRunning | ContainerTerminated | None


@dataclass(frozen=True)
class PodObservation:
    """One pod of the job, reduced to what the rules look at."""

    name: str
    attempt: int
    rank: int = 0  # the pod's node rank in its attempt's gang (0 for single-node jobs)
    uid: str = ""
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    deleting: bool = False  # metadata.deletionTimestamp is set
    delete_by: datetime | None = None  # metadata.deletionTimestamp: when its grace period ends
    node_name: str | None = None
    scheduled: bool = False
    unschedulable_message: str | None = None
    # Held back from scheduling by spec.schedulingGates (Kueue's admission gate until it
    # admits the pod; core/kueue.py): such a pod waits for a queue, not for a node.
    gated: bool = False
    scheduling_gates: tuple[str, ...] = ()
    queue_name: str | None = None  # label kueue.x-k8s.io/queue-name: Kueue manages the pod
    scheduled_at: datetime | None = None  # PodScheduled=True since (its lastTransitionTime)
    conditions: tuple[PodCondition, ...] = ()
    pod_reason: str | None = None  # status.reason, e.g. Evicted
    pod_message: str | None = None
    container: ContainerState = None  # the trainer container's current state
    termination_message: Mapping[str, Any] | None = None  # the trainer's JSON termination message
    creation_time: datetime | None = None

    @property
    def live(self) -> bool:
        """Not finished: it may still hold a GPU or write checkpoints (deleting pods included)."""
        return self.phase not in POD_TERMINAL_PHASES

    @property
    def ready(self) -> bool:
        """Its trainer is running and the pod is not being stopped: a ready rank of the gang."""
        return self.phase == "Running" and self.running is not None and not self.deleting

    @property
    def terminated(self) -> ContainerTerminated | None:
        return self.container if isinstance(self.container, ContainerTerminated) else None

    @property
    def waiting(self) -> ContainerWaiting | None:
        return self.container if isinstance(self.container, ContainerWaiting) else None

    @property
    def running(self) -> ContainerRunning | None:
        return self.container if isinstance(self.container, ContainerRunning) else None

    def condition_true(self, type_: str) -> PodCondition | None:
        return next((c for c in self.conditions if c.type == type_ and c.status == "True"), None)

    @property
    def true_condition_types(self) -> frozenset[str]:
        return frozenset(c.type for c in self.conditions if c.status == "True")

    @property
    def outcome(self) -> str | None:
        """The trainer's own verdict from its termination message, if it wrote one."""
        msg = self.termination_message
        value = msg.get("outcome") if msg else None
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ProgressSample:
    """Trainer metrics scraped from the running pod."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eval_loss: float | None = None  # the latest evaluation's loss (NaN until the first one)
    heartbeat_time: datetime | None = None  # advances only when a step completes
    last_checkpoint_step: int | None = None  # the trainer's latest complete checkpoint
    # The trainer serves metrics but has completed no step yet (heartbeat 0): it is
    # downloading or loading the model, so the stall clock has not started.
    loading: bool = False


def node_map(nodes: Mapping[str, datetime | None] | Iterable[str]) -> dict[str, datetime | None]:
    if isinstance(nodes, Mapping):
        return dict(nodes)
    return {name: None for name in nodes}


@dataclass(frozen=True)
class Observation:
    """Everything one decision is based on."""

    now: datetime  # UTC, aware
    status: TrainingJobStatus = field(default_factory=TrainingJobStatus)  # previous status
    spec: TrainingJobSpec | None = None
    spec_error: str | None = None  # one line; set when the spec failed validation
    job_name: str = ""
    namespace: str = ""
    uid: str = ""  # with namespace and name, locates the job's files (storage.job_directory)
    generation: int | None = None
    pods: tuple[PodObservation, ...] = ()
    # Nodes that are NotReady (value: since when) or missing (value: None), by name.
    # An iterable of names is accepted too and means "lost now".
    unready_nodes: Mapping[str, datetime | None] = field(default_factory=dict)
    # How long a node must be NotReady before its pods count as lost (missing nodes: at once).
    node_lost_after_seconds: float = 0.0
    progress: ProgressSample | None = None  # None: unknown or unreachable (never a stall)
    allow_privileged: bool = False
    # What the API server said to this reconcile's CreatePod, when it refused it:
    # ("rejected", message) for an invalid pod (a permanent spec problem), ("forbidden",
    # message) when admission refused it (quota, PriorityClass, Pod Security: may clear), or
    # ("conflict", message) when a pod by that name exists and the job does not control it,
    # ("service-conflict", message) when the gang's Service name is taken by another owner,
    # ("KueueNotInstalled", message) when spec.queueName is set and Kueue's CRDs are missing.
    create_error: tuple[str, str] | None = None
    # Kueue's own reason for not admitting the current attempt (its Workload's QuotaReserved=False
    # message), read only while Kueue's admission gate holds the attempt's pods; None: not read,
    # not written yet, or the read failed (core/kueue.py).
    queue_message: str | None = None

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            object.__setattr__(self, "now", self.now.replace(tzinfo=UTC))
        object.__setattr__(self, "unready_nodes", node_map(self.unready_nodes))
        object.__setattr__(self, "pods", tuple(self.pods))

    @cached_property
    def run_fingerprint(self) -> str | None:
        """The spec's run fingerprint, computed once per observation (decide() checks it
        on every transition it runs)."""
        return run_fingerprint(self.spec) if self.spec is not None else None

    @cached_property
    def run_fingerprints(self) -> frozenset[str]:
        """Fingerprints a status may hold for this spec: today's, or the one 0.1.0 wrote."""
        if self.spec is None:
            return frozenset()
        return frozenset({run_fingerprint(self.spec), legacy_run_fingerprint(self.spec)})

    @property
    def workers(self) -> int:
        return self.spec.workers if self.spec is not None else 1

    def pod_name(self, attempt: int, rank: int = 0) -> str:
        return pod_name(self.job_name, attempt, rank, self.workers)

    def gang_name(self, attempt: int) -> str:
        """How messages name the attempt's pods: the pod, or the gang's pods by rank."""
        if self.workers == 1:
            return f"pod {self.pod_name(attempt)}"
        return f"pods {self.pod_name(attempt, 0)}..{self.pod_name(attempt, self.workers - 1)}"


def pod_name(job_name: str, attempt: int, rank: int = 0, workers: int = 1) -> str:
    """<job>-<attempt>, or <job>-<attempt>-<rank> for the pods of a multi-node gang."""
    return f"{job_name}-{attempt}" if workers == 1 else f"{job_name}-{attempt}-{rank}"
