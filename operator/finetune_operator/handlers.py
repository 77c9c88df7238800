"""kopf registrations: thin handlers that feed the reconciler.

- TrainingJob events (create, update, resume after restart, delete) -> reconcile.
- Pod events, filtered server-side by label, mapped to the owner by label -> reconcile
  (the fast path: a pod change reaches the job's status within a second).
- One fleet-wide timer (fleet_timer.py), each job at its own offset -> progress scrape +
  safety-net reconcile; started and stopped with kopf (startup/cleanup), so never on a standby.
No state-changing kopf handlers are used, so kopf writes no annotations on our objects."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from .api import (
    GROUP,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
)
from .api.parsing import plain
from .config import OperatorConfig
from .fleet_timer import FleetTimer
from .kube import resource_version
from .reconciler import Key, Reconciler, without_managed_fields

log = logging.getLogger("finetune.handlers")
POD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def job_key_of_pod(namespace: str | None, labels: Mapping[str, str]) -> Key | None:
    name = labels.get(LABEL_JOB_NAME)
    return (namespace, name) if name and namespace else None


def _pod_summary(body: Mapping[str, Any]) -> dict:
    """What the decision core reads of a pod; kept small (one per pod in memory)."""
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: plain(meta.get(k)) for k in ("name", "namespace", "uid", "labels",
                                                      "resourceVersion", "ownerReferences",
                                                      "deletionTimestamp", "creationTimestamp")
                     if meta.get(k) is not None},
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName"),
                 "containers": [{"name": c.get("name"), "ports": plain(c.get("ports") or [])}
                                for c in (body.get("spec") or {}).get("containers") or []]},
        "status": plain(body.get("status") or {}),
    }


def _job_body(body: Mapping[str, Any]) -> dict:
    """The job as plain dicts for the reconciler's cache, without metadata.managedFields:
    never read, and with the status conditions it is the bulk of a TrainingJob (memory,
    and the time plain() spends copying it on every event; bench/README.md, profile)."""
    out = {k: plain(v) for k, v in body.items() if k != "metadata"}
    out["metadata"] = {k: plain(v) for k, v in (body.get("metadata") or {}).items()
                       if k != "managedFields"}
    return out


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf deep-copies every event's whole body (status and managedFields included) to diff
    it against the last handled state; only on.create/update/field handlers read that diff,
    and we register none. An empty essence skips the copy: 11.5% of the operator's CPU in
    the 1,000-job profile (bench/README.md). Nothing is stored, so no annotation is written."""

    def build(self, *, body, extra_fields=None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body, patch, essence) -> None:
        return None


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, cfg: OperatorConfig) -> None:
    def bind(kwargs: Mapping[str, Any]) -> None:
        # kopf passes each index as a keyword named after its id (its handler protocols do not list them).
        reconciler.bind(kwargs["pods_by_job"], kwargs["node_readiness"])

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = NoDiffBase()
        # Server-side: a replica lists and watches only its shard's jobs and pods (docs/SHARDING.md).
        settings.watching.label_selectors["v1", "pods"] = reconciler.shard.pod_selector(POD_SELECTOR)
        if job_selector := reconciler.shard.selector():
            settings.watching.label_selectors[GROUP, PLURAL] = job_selector
        settings.watching.chunk_size = 500
        settings.watching.reconnect_backoff = 1.0
        settings.scanning.disabled = True
        settings.posting.level = logging.WARNING
        settings.networking.request_timeout = 60

    @kopf.index("v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY}, id="pods_by_job", registry=registry)
    async def pods_by_job(namespace: str | None, labels: Mapping[str, str], body: kopf.Body,
                          **_: Any) -> dict | None:
        # async on purpose (also node_readiness): kopf runs a sync handler in its thread
        # pool, one executor round trip per pod event (bench/README.md, profile).
        key = job_key_of_pod(namespace, labels)
        return {key: _pod_summary(body)} if key else None

    @kopf.index("v1", "nodes", id="node_readiness", registry=registry)
    async def node_readiness(name: str, status: kopf.Status, body: kopf.Body, **_: Any) -> dict:
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        return {name: {"ready": bool(ready and ready.get("status") == "True"),
                       "since": (ready or {}).get("lastTransitionTime"),
                       "rv": resource_version(body)}}

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
        bind(kwargs)
        # Dropped from kopf's own copy (what `event` holds), in case kopf's per-object memory
        # keeps it: with kopf timers it did, and managedFields was 53 MiB at 1,000 jobs (bench/README.md).
        without_managed_fields(cast(dict, event.get("object") or {}))  # in place: kopf's own copy
        if event.get("type") == "DELETED":
            reconciler.job_gone((body["metadata"]["namespace"], body["metadata"]["name"]))
            return
        if not reconciler.is_news(body):
            return
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if reconciler.shard.enabled and key not in reconciler.jobs:  # moved in? pods may carry the old label
            await reconciler.handoffs.first_sight(key, body, reconciler.pods_of(key))
        key = reconciler.job_seen(_job_body(body))
        await reconciler.trigger(key, "job")

    @kopf.on.event("v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY}, registry=registry)
    async def pod_event(namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
        bind(kwargs)
        key = job_key_of_pod(namespace, labels)
        if key is None or key not in reconciler.jobs:
            return  # not ours, or its job is gone (garbage collection removes it)
        reconciler.pod_changed(key)
        await reconciler.trigger(key, "pod")

    # One task ticks every job of the reconciler's cache (fleet_timer.py says why not kopf.timer).
    timer = FleetTimer(reconciler.jobs, reconciler.tick, cfg.progress_interval)

    @kopf.on.startup(registry=registry)
    async def start_timer(**_: Any) -> None:
        timer.start()

    @kopf.on.cleanup(registry=registry)
    async def stop_timer(**_: Any) -> None:
        await timer.stop()

    if registry._changing.get_all_handlers():  # NoDiffBase would starve them
        raise RuntimeError("on.create/update/field handlers need a real kopf DiffBaseStorage")

