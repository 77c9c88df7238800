"""One reconcile of one job: observe (core.observe_job), decide (pure), then write: status first,
then pods, then Events (actions.py says why that order is crash-safe).

Every write goes through a Writer: KubeWriter is the API server, and
tests/unit/test_reconcile_step.py runs the same step against a fake one."""
from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import actions, metrics
from .api import status_to_dict
from .config import OperatorConfig
from .core import (
    CreatePod,
    CreateService,
    Decision,
    DeleteJob,
    DeletePod,
    Event,
    Observation,
    PodObservation,
    ProgressSample,
    UnreadyNodes,
    decide,
    kueue,
    observe_job,
    parse_time,
    status_changed_materially,
)
from .core.gang import STUCK_TERMINATING, STUCK_TERMINATING_SECONDS
from .job_metrics import record_status_change
from .kube import Conflict, KubeClient, NotFound, resource_version
from .pods import build_pod, build_service
from .sharding import Shard, shard_of
from .trainer_env import trainer_env

log = logging.getLogger("finetune.reconcile")
# A status conflict re-reads the job and decides again; past this the timer retries.
MAX_PASSES = 5


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Writer(Protocol):
    """Everything the step changes in the cluster (and the one read a conflict needs)."""

    async def write_status(self, job: dict, status: dict) -> dict:
        """The job as written. Raises kube.Conflict when the job changed since it was read."""

    async def read_job(self, namespace: str, name: str) -> dict | None:
        """The job as the API server has it now; None when it is gone."""

    async def create_pod(self, namespace: str, pod: dict) -> str:
        """'created', 'adopted', 'conflict' or 'namespace-terminating' (actions.create_pod).
        Raises actions.PodRejected when the API server refuses the pod."""

    async def create_service(self, namespace: str, service: dict) -> str:
        """'created', 'exists' or 'conflict' (actions.create_service)."""

    async def delete_pod(self, namespace: str, name: str, uid: str | None, grace_seconds: int | None) -> None: ...

    async def delete_job(self, namespace: str, name: str, uid: str) -> None: ...

    async def record_event(self, job: dict, type_: str, reason: str, message: str) -> None: ...


class KubeWriter:
    """The Writer of a real API server: actions.py over kube.py."""

    def __init__(self, client: KubeClient):
        self.client = client

    async def write_status(self, job: dict, status: dict) -> dict:
        return await actions.replace_status(self.client, job, status)

    async def read_job(self, namespace: str, name: str) -> dict | None:
        try:
            return await self.client.get(self.client.job_path(namespace, name))
        except NotFound:
            return None

    async def create_pod(self, namespace: str, pod: dict) -> str:
        return await actions.create_pod(self.client, namespace, pod)

    async def create_service(self, namespace: str, service: dict) -> str:
        return await actions.create_service(self.client, namespace, service)

    async def delete_pod(self, namespace: str, name: str, uid: str | None, grace_seconds: int | None) -> None:
        await actions.delete_pod(self.client, namespace, name, uid, grace_seconds)

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        await actions.delete_job(self.client, namespace, name, uid)

    async def record_event(self, job: dict, type_: str, reason: str, message: str) -> None:
        await actions.post_event(self.client, job, type_, reason, message)


def _no_nodes(_pods: tuple[PodObservation, ...]) -> UnreadyNodes:
    return {}


@dataclass
class Inputs:
    """What the I/O side gathered for one job besides the job. pods is called on every pass:
    a conflict's re-read gives the watches time to deliver newer pods."""

    pods: Callable[[], Iterable[Mapping[str, Any]]]
    unready_nodes: Callable[[tuple[PodObservation, ...]], UnreadyNodes] = field(default=_no_nodes)
    sample: ProgressSample | None = None
    last_status_write: float = 0.0  # monotonic; progress-only writes are rate-limited from it
    pod_change_since: float | None = None  # monotonic; the oldest pod change this reconcile answers
    # Reads Kueue's reason for a gated attempt (kueue_workloads.py); None: never asked.
    queue_message: Callable[[str, kueue.WorkloadRef], Awaitable[str | None]] | None = None


@dataclass
class Outcome:
    requeue_after: float | None = None  # seconds until the decision may change without an event
    status_written_at: float | None = None  # monotonic, when a status was written
    written_rv: int | None = None  # resourceVersion of the job as the last status write left it


def _ignore(_job: dict | None) -> None:
    return None


class _QueueMessage:
    """Kueue's reason for the current attempt, read at most once per reconcile and only while
    Kueue's admission gate holds the attempt's pods (docs/CONTRACTS.md, "Queueing with Kueue")."""

    def __init__(self, read: Callable[[str, kueue.WorkloadRef], Awaitable[str | None]] | None):
        self.read, self.asked = read, False
        self.message: str | None = None

    async def add_to(self, obs: Observation) -> Observation:
        if not self.asked and self.read is not None:
            ref = kueue.queued_workload(obs)
            if ref is None:
                return obs
            self.asked, self.message = True, await self.read(obs.namespace, ref)
        return replace(obs, queue_message=self.message) if self.message else obs


class ReconcileStep:
    def __init__(self, writer: Writer, config: OperatorConfig, clock: Callable[[], dt.datetime] = utcnow):
        self.writer, self.config, self.clock = writer, config, clock
        self.shard = Shard.of(config)

    def observe(self, job: Mapping[str, Any], inputs: Inputs,
                create_error: tuple[str, str] | None = None) -> Observation:
        return observe_job(job, inputs.pods(), now=self.clock(), progress=inputs.sample,
                           unready_nodes=inputs.unready_nodes,
                           node_lost_after_seconds=self.config.node_lost_seconds,
                           allow_privileged=self.config.allow_privileged_templates, create_error=create_error)

    async def run(self, job: dict, inputs: Inputs, *, trigger: str = "job",
                  remember: Callable[[dict | None], None] = _ignore) -> Outcome:
        """Decide and act until the status write goes through. remember() gets every newer body
        of the job as soon as it is known (None: the job is gone), so the caller's cache can tell
        the watch echo of our own write from news."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        created = parse_time(job["metadata"].get("creationTimestamp"))
        out = Outcome()
        last_write = inputs.last_status_write
        create_error: tuple[str, str] | None = None
        queue = _QueueMessage(inputs.queue_message)
        for _ in range(MAX_PASSES):
            obs = await queue.add_to(self.observe(job, inputs, create_error))
            decision = decide(obs)
            new_status = status_to_dict(decision.status)
            if new_status != (job.get("status") or {}) and self._write_due(job, obs, decision, last_write):
                if trigger == "timer":
                    _count_stale_correction(obs)
                try:
                    written = await self.writer.write_status(job, new_status)
                except Conflict:
                    fresh = await self.writer.read_job(ns, name)
                    if fresh is not None and not self.shard.owns(fresh):
                        # Relabelled into another shard: its replica owns it now (docs/SHARDING.md).
                        log.info("%s/%s: moved to shard %r; dropped here", ns, name, shard_of(fresh))
                        fresh = None
                    remember(fresh)
                    if fresh is None:
                        return out
                    job = fresh
                    continue
                remember(written)
                job = written
                last_write = out.status_written_at = time.monotonic()
                out.written_rv = resource_version(written)
                record_status_change(ns, obs.spec, created, obs.status, decision.status, obs.now)
                if inputs.pod_change_since is not None:
                    metrics.STATUS_LAG.observe(time.monotonic() - inputs.pod_change_since)
            refused = await self._act(job, decision, obs)
            if refused is not None and create_error is None:
                create_error = refused  # decide once more, knowing what the API server said
                continue
            out.requeue_after = decision.requeue_after
            return out
        log.warning("reconcile %s/%s: gave up after repeated conflicts; the timer retries", ns, name)
        return out

    def _write_due(self, job: Mapping[str, Any], obs: Observation, decision: Decision, last_write: float) -> bool:
        """Progress-only changes are written at most every progress_write_interval."""
        if not job.get("status") or status_changed_materially(obs.status, decision.status):
            return True
        return time.monotonic() - last_write >= self.config.progress_write_interval

    async def _act(self, job: dict, decision: Decision, obs: Observation) -> tuple[str, str] | None:
        """Carry out the actions; returns ("rejected"|"forbidden"|"conflict", detail) when the
        API server refused the pod, so that the status can say so."""
        ns, name = obs.namespace, obs.job_name
        refused = None
        for action in decision.actions:
            if isinstance(action, CreatePod):
                if obs.spec is None:
                    continue
                pod = build_pod(name, ns, obs.uid, obs.spec, action.attempt, trainer_env=trainer_env(obs.spec),
                                rank=action.rank, shard=shard_of(job))
                pod_name = pod["metadata"]["name"]
                try:
                    outcome = await self.writer.create_pod(ns, pod)
                except actions.PodRejected as exc:
                    log.warning("%s/%s: the API server refused pod %s: %s", ns, name, pod_name, exc)
                    refused = (exc.kind, exc.detail)
                    continue
                if outcome == "created":
                    metrics.ATTEMPTS.labels(ns).inc()
                if outcome == "conflict":
                    log.warning("%s/%s: pod %s exists but is not controlled by this job", ns, name, pod_name)
                    refused = ("conflict", f"{pod_name} has no ownerReference to this TrainingJob")
                else:
                    log.info("%s/%s: pod %s %s", ns, name, pod_name, outcome)
            elif isinstance(action, CreateService):
                outcome = await self.writer.create_service(ns, build_service(name, ns, obs.uid))
                if outcome == "conflict":
                    log.warning("%s/%s: Service %s exists but is not controlled by this job", ns, name, name)
                    refused = ("service-conflict", f"Service {name}")
            elif isinstance(action, DeletePod):
                await self.writer.delete_pod(ns, action.name, action.uid, action.grace_seconds)
                log.info("%s/%s: deleting pod %s (%s)", ns, name, action.name, action.reason)
                if action.reason == STUCK_TERMINATING:
                    await self.writer.record_event(job, "Warning", STUCK_TERMINATING, (
                        f"pod {action.name} was still terminating {STUCK_TERMINATING_SECONDS}s after its grace "
                        "period ended; force-deleted it so the next attempt can start"))
            elif isinstance(action, Event):
                await self.writer.record_event(job, action.type, action.reason, action.message)
            elif isinstance(action, DeleteJob):
                await self.writer.delete_job(ns, name, obs.uid)
                log.info("%s/%s: deleted (%s)", ns, name, action.reason)
        return refused


def _count_stale_correction(obs: Observation) -> None:
    """The timer is the safety net: if the pods alone (clock frozen at the last status
    change, no new progress) already imply another phase, an event was missed."""
    status = obs.status
    times = [c.last_transition_time for c in status.conditions if c.last_transition_time]
    if not times or status.phase is None:
        return
    frozen = decide(replace(obs, now=max(times), progress=None))
    if frozen.status.phase != status.phase:
        metrics.STALE_CORRECTIONS.labels(obs.namespace).inc()
        log.warning("%s/%s: status said %s but the pods say %s (missed event corrected)",
                    obs.namespace, obs.job_name, status.phase, frozen.status.phase)
