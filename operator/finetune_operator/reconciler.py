"""One reconcile for one job: observe (job + its pods + node facts + progress),
decide (pure), act (status first, then pods, then Events).

Nothing here is remembered across restarts: the job and pod caches are fed by the
watches (kopf's initial LIST rebuilds them), progress samples are re-read from the
trainers, and per-job coalescing state is only about work in flight."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from . import actions, metrics
from .api import (LABEL_JOB_NAME, SpecError, TrainingJobStatus, parse_spec,
                  parse_status, status_to_dict)
from .config import OperatorConfig
from .core import (CreatePod, DeleteJob, DeletePod, Event, Observation, ProgressSample, decide,
                   observe_pod, parse_time, status_changed_materially)
from .kube import TRANSPORT_ERRORS, ApiError, KubeClient, resource_version as _rv
from .pods import build_pod
from .progress import ProgressReader
from .trainer_env import trainer_env

log = logging.getLogger("finetune.reconcile")
Key = tuple[str, str]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def without_managed_fields(job: dict) -> dict:
    """A job as we cache it (in place; the dict is ours): metadata.managedFields is never read
    and is the bulk of a TrainingJob (18 MiB of RSS at 1,000 jobs, bench/README.md)."""
    (job.get("metadata") or {}).pop("managedFields", None)
    return job


DEFAULT_STALL_SECONDS = 1800  # stalled_jobs' threshold when runPolicy sets none (CONTRACTS.md)


def fleet_row(job: Mapping, now: dt.datetime) -> dict[str, Any]:
    """One job's part of the fleet gauges, as docs/CONTRACTS.md defines them: how long it has
    been Queued (since its attempt started, else since creation) and whether it is Running
    without a step heartbeat (else since the attempt started) for longer than its stall timeout."""
    status = job.get("status") or {}
    phase = status.get("phase") or "Queued"
    row: dict[str, Any] = {"phase": phase}
    since = parse_time(status.get("attemptStartTime")) or parse_time(
        (job.get("metadata") or {}).get("creationTimestamp"))
    if phase == "Queued":
        row["queued_for"] = (now - since).total_seconds() if since else None
    if phase == "Running":
        limit = ((job.get("spec") or {}).get("runPolicy") or {}).get("stallTimeoutSeconds") \
            or DEFAULT_STALL_SECONDS
        last = parse_time((status.get("progress") or {}).get("heartbeatTime")) or \
            parse_time(status.get("attemptStartTime"))
        row["stalling"] = last is not None and (now - last).total_seconds() > limit
    return row


@dataclass
class JobState:
    """Work in flight for one job (not job state: that lives in the API server)."""
    running: bool = False
    dirty: bool = False
    pod_change_since: float | None = None   # monotonic time of the oldest unhandled pod change
    last_reconcile: float = 0.0
    last_progress_write: float = 0.0
    sample: ProgressSample | None = None   # last successful read for sample_attempt
    sample_attempt: int | None = None
    wakeup: asyncio.TimerHandle | None = None
    triggers: set = field(default_factory=set)


class Reconciler:
    def __init__(self, client: KubeClient, config: OperatorConfig,
                 progress_reader: ProgressReader | None = None):
        self.client, self.config = client, config
        self.progress = progress_reader or ProgressReader(config.progress_timeout)
        self.jobs: dict[Key, dict] = {}
        self.state: dict[Key, JobState] = {}
        self._namespaces_seen: set[str] = set()
        self.gone: dict[Key, set[str]] = {}  # pod uids the watch missed the deletion of
        self.nodes_gone: set[str] = set()       # Node names the watch missed the deletion of
        # Bound by the kopf handlers to kopf's indices (filled before handlers run).
        self.pod_index: Mapping | None = None
        self.node_index: Mapping | None = None

    # ---- inputs from watches -----------------------------------------------------
    def bind(self, pod_index, node_index) -> None:
        self.pod_index, self.node_index = pod_index, node_index

    def job_seen(self, body: dict) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key[0] not in self._namespaces_seen:
            self._namespaces_seen.add(key[0])
            metrics.STALE_CORRECTIONS.labels(key[0])  # exported at 0 so alerts see the first one
        if _rv(body) >= _rv(self.jobs.get(key)):
            self.jobs[key] = body
        return key

    def is_news(self, body: dict) -> bool:
        """False for the watch echo of our own status write (its resourceVersion is the one
        our write returned): deciding again on what we just decided changes nothing."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        cached = self.jobs.get(key)
        return cached is None or _rv(body) > _rv(cached)

    def job_gone(self, key: Key) -> None:
        self.jobs.pop(key, None)
        self.gone.pop(key, None)
        st = self.state.pop(key, None)
        if st and st.wakeup:
            st.wakeup.cancel()

    def pod_changed(self, key: Key) -> None:
        st = self.state.setdefault(key, JobState())
        if st.pod_change_since is None:
            st.pod_change_since = time.monotonic()

    def pods_of(self, key: Key) -> list[dict]:
        pods = self._indexed_pods(key)
        gone = self.gone.get(key)
        return [p for p in pods if p["metadata"].get("uid") not in gone] if gone else pods

    def pods_vanished(self, gone: dict[Key, set[str]]) -> None:
        """From the watch-gap audit: pods the API server no longer has but the index still
        holds (missed DELETED events). They are ignored from now on; their jobs re-decide."""
        for key, uids in gone.items():
            new = uids - self.gone.get(key, set())
            if new and key in self.jobs:
                log.warning("%s/%s: pods %s are gone from the API server but not from the watch "
                            "(missed DELETED events); treating them as deleted", key[0], key[1],
                            sorted(p["metadata"]["name"] for p in self._indexed_pods(key)
                                   if p["metadata"].get("uid") in new))
                asyncio.ensure_future(self.trigger(key, "timer"))
        self.gone = gone

    def nodes_vanished(self, names: set[str]) -> None:
        """From the watch-gap audit: Nodes deleted while the watch was away read as gone."""
        new = names - self.nodes_gone
        self.nodes_gone = names
        if not new:
            return
        log.warning("nodes %s are gone from the API server but not from the watch", sorted(new))
        for key in list(self.jobs):
            if any((p.get("spec") or {}).get("nodeName") in new for p in self.pods_of(key)):
                asyncio.ensure_future(self.trigger(key, "timer"))

    def _indexed_pods(self, key: Key) -> list[dict]:
        try:
            return list(self.pod_index.get(key, ())) if self.pod_index is not None else []
        except Exception:  # noqa: BLE001 - kopf's Store raises on concurrent change
            return []

    def fleet(self) -> Iterable[tuple[str, dict]]:
        """Rows for the scrape-time gauges (metrics.FleetCollector)."""
        now = utcnow()
        for (ns, _name), job in list(self.jobs.items()):
            yield ns, fleet_row(job, now)

    # ---- triggering ----------------------------------------------------------------
    async def trigger(self, key: Key, trigger: str) -> None:
        """Run reconcile for key; calls that arrive while one runs coalesce into one more run."""
        st = self.state.setdefault(key, JobState())
        st.dirty = True
        st.triggers.add(trigger)
        if st.running:
            return
        st.running = True
        try:
            while st.dirty:
                st.dirty = False
                which = "pod" if "pod" in st.triggers else sorted(st.triggers)[0]
                st.triggers.clear()
                with metrics.RECONCILE_SECONDS.labels(which).time():
                    try:
                        await self.reconcile(key, which)
                    except Exception as exc:  # noqa: BLE001 - loud, counted, retried by the timer
                        metrics.RECONCILE_ERRORS.labels(which).inc()
                        log.error("reconcile %s/%s failed: %s", key[0], key[1], exc,
                                  exc_info=not isinstance(exc, (ApiError, *TRANSPORT_ERRORS)))
                        self._schedule(key, 5.0 + random.random() * 5)
        finally:
            st.running = False

    def _schedule(self, key: Key, delay: float) -> None:
        st = self.state.setdefault(key, JobState())
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if st.wakeup and not st.wakeup.cancelled() and st.wakeup.when() <= when:
            return
        if st.wakeup:
            st.wakeup.cancel()
        st.wakeup = loop.call_at(when, lambda: asyncio.ensure_future(self.trigger(key, "wakeup")))

    # ---- timer: progress + safety net --------------------------------------------------
    async def tick(self, key: Key) -> None:
        """Called by the kopf timer every progress_interval seconds for each live job."""
        st = self.state.setdefault(key, JobState())
        job = self.jobs.get(key)
        if job is None:
            return
        status = job.get("status") or {}
        changed = False
        if status.get("attempt") != st.sample_attempt:
            st.sample, st.sample_attempt = None, status.get("attempt")
        if status.get("phase") == "Running":
            sample = await self._scrape(key, job)
            # Keep the last answer when a read fails: a trainer that answered before and
            # stopped answering (frozen, SIGSTOPped) must not reset the stall clock, while
            # one that never answered stays "unknown" (None), never a stall.
            if sample is not None:
                changed = sample != st.sample
                st.sample = sample
        due = time.monotonic() - st.last_reconcile >= self.config.timer_interval
        if changed or due:
            await self.trigger(key, "timer" if due else "progress")

    async def _scrape(self, key: Key, job: dict) -> ProgressSample | None:
        attempt = (job.get("status") or {}).get("attempt")
        pod_name = f"{key[1]}-{attempt}"
        for pod in self.pods_of(key):
            if pod["metadata"]["name"] == pod_name:
                ip = (pod.get("status") or {}).get("podIP")
                port = _metrics_port(pod)
                if ip and port:
                    sample = await self.progress.read(ip, port)
                    metrics.PROGRESS_SCRAPES.labels("ok" if sample else "unreachable").inc()
                    return sample
        return None

    # ---- the reconcile ---------------------------------------------------------------------
    def observe(self, job: dict, now: dt.datetime, sample: ProgressSample | None,
                create_error: tuple[str, str] | None = None) -> Observation:
        meta = job["metadata"]
        spec, spec_error = None, None
        try:
            spec = parse_spec(job.get("spec"))
        except SpecError as exc:
            spec_error = exc.message
        # Only pods this job controls: a deleted job's pods (same name, same labels) can
        # outlive it, and a hand-made pod with our labels is not ours to act on.
        bodies = [b for b in self.pods_of((meta["namespace"], meta["name"]))
                  if controller_uid(b) == meta.get("uid")]
        pods = tuple(p for p in (observe_pod(b) for b in bodies) if p is not None)
        return Observation(
            now=now, status=parse_status(job.get("status")), spec=spec, spec_error=spec_error,
            job_name=meta["name"], namespace=meta.get("namespace", ""), uid=meta.get("uid", ""),
            generation=meta.get("generation"), pods=pods,
            unready_nodes=self._unready_nodes(pods), node_lost_after_seconds=self.config.node_lost_seconds,
            progress=sample, allow_privileged=self.config.allow_privileged_templates,
            creation_time=parse_time(meta.get("creationTimestamp")), create_error=create_error)

    def _unready_nodes(self, pods) -> dict[str, dt.datetime | None]:
        out: dict[str, dt.datetime | None] = {}
        if self.node_index is None:
            return out
        for pod in pods:
            node = pod.node_name
            if not node or node in out:
                continue
            facts = [] if node in self.nodes_gone else list(self.node_index.get(node, ()))
            if not facts:
                out[node] = None  # the Node object is gone
            elif not facts[0]["ready"]:
                out[node] = parse_time(facts[0]["since"])
        return out

    async def reconcile(self, key: Key, trigger: str) -> None:
        st = self.state.setdefault(key, JobState())
        st.last_reconcile = time.monotonic()
        pod_change_since, st.pod_change_since = st.pod_change_since, None
        job = self.jobs.get(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        create_error: tuple[str, str] | None = None
        for _ in range(5):
            now = utcnow()
            obs = self.observe(job, now, st.sample, create_error)
            decision = decide(obs)
            old_status = obs.status
            new_dict = status_to_dict(decision.status)
            written = False
            if new_dict != (job.get("status") or {}):
                material = status_changed_materially(old_status, decision.status)
                due = time.monotonic() - st.last_progress_write >= self.config.progress_write_interval
                if material or due or not job.get("status"):
                    if trigger == "timer":
                        self._count_stale_correction(key, job, obs)
                    try:
                        job = await actions.replace_status(self.client, job, new_dict)
                    except actions.Conflict:
                        job = await self._refetch(key)
                        if job is None:
                            return
                        continue
                    self.jobs[key] = job = without_managed_fields(job)
                    st.last_progress_write = time.monotonic()
                    written = True
                    self._record_metrics(key, job, old_status, decision.status, now)
            if written and pod_change_since is not None:
                metrics.STATUS_LAG.observe(time.monotonic() - pod_change_since)
            refused = await self._act(key, job, decision, obs)
            if refused is not None and create_error is None:
                create_error = refused  # decide once more, knowing what the API server said
                continue
            if decision.requeue_after is not None:
                self._schedule(key, max(0.2, float(decision.requeue_after)))
            return
        log.warning("reconcile %s/%s: gave up after repeated conflicts; the timer retries",
                    key[0], key[1])

    async def _refetch(self, key: Key) -> dict | None:
        try:
            job = await self.client.get(self.client.job_path(*key))
        except ApiError as exc:
            if exc.status == 404:
                self.job_gone(key)
                return None
            raise
        self.jobs[key] = job = without_managed_fields(job)
        return job

    async def _act(self, key: Key, job: dict, decision, obs: Observation) -> tuple[str, str] | None:
        """Carry out the actions; returns ("rejected"|"forbidden"|"conflict", detail) when the
        API server refused the pod, so that the status can say so."""
        ns, name = key
        refused = None
        for action in decision.actions:
            if isinstance(action, CreatePod):
                if obs.spec is None:
                    continue
                pod = build_pod(name, ns, job["metadata"]["uid"], obs.spec, action.attempt,
                                trainer_env=trainer_env(obs.spec))
                pod_name = pod["metadata"]["name"]
                try:
                    outcome = await actions.create_pod(self.client, ns, pod)
                except actions.PodRejected as exc:
                    log.warning("%s/%s: the API server refused pod %s: %s", ns, name, pod_name, exc)
                    refused = (exc.kind, exc.detail)
                    continue
                if outcome == "created":
                    metrics.ATTEMPTS.labels(ns).inc()
                if outcome == "conflict":
                    log.warning("%s/%s: pod %s exists but is not controlled by this job",
                                ns, name, pod_name)
                    refused = ("conflict", "no ownerReference to this TrainingJob")
                else:
                    log.info("%s/%s: pod %s %s", ns, name, pod_name, outcome)
            elif isinstance(action, DeletePod):
                await actions.delete_pod(self.client, ns, action.name, action.uid,
                                         action.grace_seconds)
                log.info("%s/%s: deleting pod %s (%s)", ns, name, action.name, action.reason)
            elif isinstance(action, Event):
                await actions.post_event(self.client, job, action.type, action.reason,
                                         action.message)
            elif isinstance(action, DeleteJob):
                await actions.delete_job(self.client, ns, name, job["metadata"]["uid"])
                log.info("%s/%s: deleted (%s)", ns, name, action.reason)
        return refused

    # ---- metrics -------------------------------------------------------------------------
    def _record_metrics(self, key: Key, job: dict, old: TrainingJobStatus,
                        new: TrainingJobStatus, now: dt.datetime) -> None:
        ns = key[0]
        old_phase = old.phase.value if hasattr(old.phase, "value") else old.phase
        new_phase = new.phase.value if hasattr(new.phase, "value") else new.phase
        if old_phase != new_phase:
            metrics.TRANSITIONS.labels(ns, old_phase or "None", new_phase or "None",
                                       new.reason or "").inc()
            created = parse_time(job["metadata"].get("creationTimestamp"))
            if new_phase == "Running" and new.attempt == 1 and created:
                metrics.QUEUED_SECONDS.observe(max(0.0, (now - created).total_seconds()))
        reason = (new.last_interruption.reason if new.last_interruption else None) or "Unknown"
        if new.resumes > old.resumes:
            metrics.RESUMES.labels(ns, reason).inc(new.resumes - old.resumes)
            started = new.attempt_start_time or old.attempt_start_time
            gpus = ((job.get("spec") or {}).get("resources") or {}).get("gpus", 1)
            if started:
                seconds = max(0.0, (now - started).total_seconds()) * float(gpus or 0)
                metrics.INTERRUPTED_GPU_SECONDS.labels(ns, reason).inc(seconds)
        if new.failures > old.failures:
            metrics.FAILURES.labels(ns, reason).inc(new.failures - old.failures)
        old_step = (old.progress.step if old.progress else None) or 0
        new_step = (new.progress.step if new.progress else None) or 0
        created = parse_time(job["metadata"].get("creationTimestamp"))
        if old_step == 0 and new_step > 0 and new.attempt == 1 and created:
            metrics.TIME_TO_FIRST_STEP.observe(max(0.0, (now - created).total_seconds()))

    def _count_stale_correction(self, key: Key, job: dict, obs: Observation) -> None:
        """The timer is the safety net: if the pods alone (clock frozen at the last status
        change, no new progress) already imply another phase, an event was missed."""
        status = obs.status
        times = [c.last_transition_time for c in status.conditions if c.last_transition_time]
        if not times or status.phase is None:
            return
        frozen = decide(replace(obs, now=max(times), progress=None))
        if frozen.status.phase != status.phase:
            metrics.STALE_CORRECTIONS.labels(key[0]).inc()
            log.warning("%s/%s: status said %s but the pods say %s (missed event corrected)",
                        key[0], key[1], status.phase, frozen.status.phase)


def controller_uid(pod: Mapping) -> str | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def _metrics_port(pod: dict) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            if port.get("name") == "metrics":
                return port.get("containerPort")
    return None


def job_key_of_pod(namespace: str, labels: Mapping[str, str]) -> Key | None:
    name = labels.get(LABEL_JOB_NAME)
    return (namespace, name) if name else None
