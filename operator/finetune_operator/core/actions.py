"""What the decision core asks the caller to do, and the decision itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..api.models import TrainingJobStatus


@dataclass(frozen=True)
class CreatePod:
    """Create the pod of `rank` in attempt `attempt` (after writing the status). AlreadyExists
    means adopt it."""

    attempt: int
    rank: int = 0


@dataclass(frozen=True)
class CreateService:
    """Create the job's headless Service (multi-node gangs find rank 0 through it); before the
    pods. AlreadyExists means it is there."""


@dataclass(frozen=True)
class DeletePod:
    """Delete a pod. grace_seconds None: the pod's own grace period; 0: force (node lost)."""

    name: str
    reason: str
    grace_seconds: int | None = None
    uid: str | None = None  # use as a precondition so a recreated pod of the same name survives


@dataclass(frozen=True)
class Event:
    """Post a Kubernetes Event on the TrainingJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the TrainingJob itself (ttlSecondsAfterFinished has passed)."""

    reason: str = "TTLExpired"


Action = CreatePod | CreateService | DeletePod | Event | DeleteJob


@dataclass(frozen=True)
class Decision:
    """The new status, what to do (in order), and when to be woken at the latest."""

    status: TrainingJobStatus
    actions: tuple[Action, ...] = ()
    requeue_after: float | None = None  # seconds; None: no timed wake-up needed

    @property
    def creates(self) -> tuple[CreatePod, ...]:
        return tuple(a for a in self.actions if isinstance(a, CreatePod))

    @property
    def deletes(self) -> tuple[DeletePod, ...]:
        return tuple(a for a in self.actions if isinstance(a, DeletePod))

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(a for a in self.actions if isinstance(a, Event))

    @property
    def delete_job(self) -> bool:
        return any(isinstance(a, DeleteJob) for a in self.actions)
