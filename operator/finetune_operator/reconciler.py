"""The per-job side of the operator: the job and pod caches fed by the watches, coalescing of
reconcile requests, wake-ups, and the timer (progress scrape + safety net). One reconcile is
reconcile_step.py: this module only gathers its inputs and remembers what it wrote.

Nothing here is remembered across restarts: the job and pod caches are fed by the
watches (kopf's initial LIST rebuilds them), progress samples are re-read from the
trainers, and per-job coalescing state is only about work in flight."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .api import TERMINAL_PHASES, TrainingJobStatus, parse_status
from .config import OperatorConfig
from .core import PodObservation, ProgressSample, UnreadyNodes, counts_for, kueue, parse_time, pod_name
from .job_metrics import fleet_row, job_stall_seconds
from .kube import TRANSPORT_ERRORS, ApiError, KubeClient
from .kube import resource_version as _rv
from .kueue_workloads import queue_message
from .progress import ProgressReader, scrape_due
from .reconcile_step import Inputs, KubeWriter, ReconcileStep, Writer, utcnow
from .sharding import Handoffs, Shard
from .slots import ROUTINE, URGENT, PrioritySlots

log = logging.getLogger("finetune.reconcile")
Key = tuple[str, str]
# A job whose inputs did not change is still re-decided by the timer this often (in timer
# intervals: 5 min in production), whatever the caches say.
SETTLED_FULL_EVERY = 10


def without_managed_fields(job: dict) -> dict:
    """A job as we cache it (in place; the dict is ours): metadata.managedFields is never read
    and is the bulk of a TrainingJob (18 MiB of RSS at 1,000 jobs, bench/README.md)."""
    (job.get("metadata") or {}).pop("managedFields", None)
    return job


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
    unanswered: int = 0  # failed reads in a row of a trainer that has not answered in this attempt
    skipped: int = 0     # ticks since its last read (progress.scrape_due)
    wakeup: asyncio.TimerHandle | None = None
    triggers: set[str] = field(default_factory=set)
    parsed_status: TrainingJobStatus | None = None  # of the job at parsed_rv
    parsed_rv: int = -1
    stall_seconds: int | None = None  # of the job at parsed_rv (job_metrics.job_stall_seconds)
    # The inputs of the last reconcile (with the job as its status write left it, if it wrote),
    # and until when (monotonic) its decision stands without new inputs (its wake-up time):
    # the timer skips re-deciding those.
    settled: tuple | None = None
    settled_until: float = 0.0
    # monotonic; last timer reconcile that re-decided regardless (counted from the job's first sight)
    last_full: float = field(default_factory=time.monotonic)

    def status_of(self, job: Mapping[str, Any]) -> TrainingJobStatus:
        """The job's status, parsed once per resourceVersion: the timer reads it every tick of every job."""
        rv = _rv(job)
        if self.parsed_status is None or rv != self.parsed_rv:
            self.parsed_status, self.parsed_rv = parse_status(job.get("status")), rv
            self.stall_seconds = None
        return self.parsed_status

    def stall_seconds_of(self, job: Mapping[str, Any]) -> int:
        """The stalled_jobs threshold of its spec, parsed once per resourceVersion (every scrape reads it)."""
        self.status_of(job)
        if self.stall_seconds is None:
            self.stall_seconds = job_stall_seconds(job)
        return self.stall_seconds


class Reconciler:
    def __init__(self, client: KubeClient, config: OperatorConfig,
                 progress_reader: ProgressReader | None = None, writer: Writer | None = None):
        self.config = config
        self.client = client
        self.progress = progress_reader or ProgressReader(config.progress_timeout)
        self.step = ReconcileStep(writer or KubeWriter(client), config)
        self.jobs: dict[Key, dict] = {}
        self.state: dict[Key, JobState] = {}
        self._namespaces_seen: set[str] = set()
        self.gone: dict[Key, set[str]] = {}  # pod uids the watch missed the deletion of
        self.nodes_gone: set[str] = set()       # Node names the watch missed the deletion of
        # Bound by the kopf handlers to kopf's indices (filled before handlers run).
        self.pod_index: Mapping | None = None
        self.node_index: Mapping | None = None
        self.shard = Shard.of(config)
        self.handoffs = Handoffs(client, self.shard)  # pods of jobs moved in, unseen by our pod watch
        self.slots = PrioritySlots(config.concurrent_reconciles)

    # ---- inputs from watches -----------------------------------------------------
    def bind(self, pod_index: Mapping | None, node_index: Mapping | None) -> None:
        self.pod_index, self.node_index = pod_index, node_index

    def job_seen(self, body: dict) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key not in self.jobs and self.shard.enabled:
            log.debug("%s/%s: holding (%s)", key[0], key[1], self.shard.describe())
        if key[0] not in self._namespaces_seen:
            self._namespaces_seen.add(key[0])
            metrics.STALE_CORRECTIONS.labels(key[0])  # exported at 0 so alerts see the first one
        if _rv(body) >= _rv(self.jobs.get(key)):
            self.jobs[key] = body
        return key

    def is_news(self, body: Mapping[str, Any]) -> bool:
        """False for the watch echo of our own status write (its resourceVersion is the one
        our write returned): deciding again on what we just decided changes nothing."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        cached = self.jobs.get(key)
        return cached is None or _rv(body) > _rv(cached)

    def job_gone(self, key: Key) -> None:
        if self.jobs.pop(key, None) is not None and self.shard.enabled:
            log.debug("%s/%s: released (deleted, or moved out of this shard)", key[0], key[1])
        self.handoffs.forget(key)
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
        if extra := self.handoffs.extra(key):
            pods = pods + extra
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
        except Exception:  # kopf's Store raises on concurrent change
            return []

    def _unready_nodes(self, pods: Iterable[PodObservation]) -> UnreadyNodes:
        """NotReady (since when) or gone (None), for the nodes of the given pods."""
        out: dict[str, Any] = {}
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

    def fleet(self) -> Iterable[tuple[str, dict]]:
        """Rows for the scrape-time gauges (metrics.FleetCollector). A finished job's row is
        its phase (job_metrics.fleet_row), read without parsing its status: kept parsed, the
        status of each of thousands of finished jobs would cost 14 KiB (bench/README.md)."""
        now = utcnow()
        for key, job in list(self.jobs.items()):
            phase = (job.get("status") or {}).get("phase")
            if phase in TERMINAL_PHASES:
                if (done := self.state.get(key)) is not None:
                    done.parsed_status, done.parsed_rv = None, -1
                yield key[0], {"phase": phase}
                continue
            st = self.state.setdefault(key, JobState())
            status = st.status_of(job)
            yield key[0], fleet_row(job, now, status, st.stall_seconds_of(job) if status.phase == "Running" else None)

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
                # Jobs already started first: a new job's first reconcile waits (slots.py).
                priority = ROUTINE if st.triggers == {"job"} else URGENT
                async with self.slots.held(priority):  # triggers arriving while it waits join this run
                    st.dirty = False
                    which = "pod" if "pod" in st.triggers else sorted(st.triggers)[0]
                    st.triggers.clear()
                    with metrics.RECONCILE_SECONDS.labels(which).time():
                        try:
                            await self.reconcile(key, which)
                        except Exception as exc:  # loud, counted, retried by the wake-up
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
        """Called by the fleet timer (fleet_timer.py) every progress_interval seconds for each live job."""
        st = self.state.setdefault(key, JobState())
        job = self.jobs.get(key)
        if job is None:
            return
        status = st.status_of(job)
        changed = False
        if status.attempt != st.sample_attempt:
            st.sample, st.sample_attempt, st.unanswered, st.skipped = None, status.attempt, 0, 0
        if status.phase == "Running" and not scrape_due(st.unanswered, st.skipped):
            st.skipped += 1
        elif status.phase == "Running":
            st.skipped = 0
            uid = job["metadata"].get("uid") or ""
            pods = [p for p in self.pods_of(key) if counts_for(p, uid)]
            workers = (job.get("spec") or {}).get("workers", 1)
            workers = workers if isinstance(workers, int) else 1
            # Global rank 0 (metrics, checkpoints) runs in the pod of rank 0.
            sample = await self.progress.scrape(pods, pod_name(key[1], status.attempt, 0, workers))
            # Keep the last answer when a read fails: a trainer that answered before and
            # stopped answering (frozen, SIGSTOPped) must not reset the stall clock, while
            # one that never answered stays "unknown" (None), never a stall.
            if sample is not None:
                changed = sample != st.sample
                st.sample, st.unanswered = sample, 0
            elif st.sample is None:
                st.unanswered += 1
        now = time.monotonic()
        due = now - st.last_reconcile >= self.config.timer_interval
        if due and not changed and self._settled(key, job, st, status.phase, now):
            st.last_reconcile = now  # re-checked: every input is what the last decision saw
            return
        if changed or due:
            await self.trigger(key, "timer" if due else "progress")

    def _settled(self, key: Key, job: Mapping[str, Any], st: JobState, phase: str | None,
                 now: float) -> bool:
        """Whether a safety-net reconcile would only repeat the last one: same job
        resourceVersion (the one the last decision read, or wrote), same pods (uid,
        resourceVersion), same facts of their nodes, same progress sample, before the last
        decision's own wake-up time. A missed or mishandled event leaves the caches newer
        than that decision, so it is still re-decided; every
        SETTLED_FULL_EVERY timer intervals a job is re-decided anyway (a time rule missing
        from decide's wake-up times is caught there). Running and finished jobs only: a
        queued job's Kueue reason is read from the API server, not from the watches."""
        if phase != "Running" and phase not in TERMINAL_PHASES:
            return False
        if now - st.last_full >= SETTLED_FULL_EVERY * self.config.timer_interval:
            st.last_full = now
            return False
        return st.settled is not None and now < st.settled_until and st.settled == self._inputs(key, job, st)

    def _inputs(self, key: Key, job: Mapping[str, Any], st: JobState) -> tuple | None:
        """What a reconcile of the job reads from the caches, as a comparable value (None:
        something is read outside the caches, never settled)."""
        if self.handoffs.active(key):
            return None
        pods = self.pods_of(key)
        nodes = {(p.get("spec") or {}).get("nodeName") for p in pods} - {None}
        node_facts = tuple(sorted(
            (n, n in self.nodes_gone,
             tuple((f["ready"], f["since"], f["rv"]) for f in self.node_index.get(n, ()))
             if self.node_index is not None else ()) for n in nodes))
        return (_rv(job), tuple(sorted((p["metadata"].get("uid"), p["metadata"].get("resourceVersion"))
                                       for p in pods)),
                node_facts, st.sample)

    # ---- one reconcile -------------------------------------------------------------------
    async def reconcile(self, key: Key, trigger: str) -> None:
        st = self.state.setdefault(key, JobState())
        st.last_reconcile = time.monotonic()
        pod_change_since, st.pod_change_since = st.pod_change_since, None
        job = self.jobs.get(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        if self.handoffs.active(key):
            await self.handoffs.refresh(key, job)
            if self.handoffs.extra(key):  # no watch event will announce their changes: look again soon
                self._schedule(key, self.config.progress_interval)
        inputs = Inputs(pods=lambda: self.pods_of(key), unready_nodes=self._unready_nodes, sample=st.sample,
                        last_status_write=st.last_progress_write, pod_change_since=pod_change_since,
                        queue_message=self._queue_message)
        seen, st.settled = self._inputs(key, job, st), None
        out = await self.step.run(job, inputs, trigger=trigger, remember=lambda body: self._remember(key, body))
        if out.status_written_at is not None:
            st.last_progress_write = out.status_written_at
            # Deciding again on the job as written, with the same pods, decides the same (the
            # decision is a fixed point of decide; is_news drops the echo for the same reason).
            seen = None if seen is None or out.written_rv is None else (out.written_rv, *seen[1:])
        if seen is not None:  # these inputs decide nothing new until the wake-up
            st.settled = seen
            st.settled_until = time.monotonic() + (out.requeue_after if out.requeue_after is not None
                                                   else float("inf"))
        if out.requeue_after is not None:
            self._schedule(key, max(0.2, float(out.requeue_after)))

    async def _queue_message(self, namespace: str, ref: kueue.WorkloadRef) -> str | None:
        return await queue_message(self.client, namespace, ref) if self.client is not None else None

    def _remember(self, key: Key, job: dict | None) -> None:
        if job is None:
            self.job_gone(key)
        elif key in self.jobs:  # else dropped meanwhile (deleted, or moved to another shard)
            self.jobs[key] = without_managed_fields(job)
