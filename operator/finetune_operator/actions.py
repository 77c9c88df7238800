"""Carrying out a decision against the API: status first, then pods, then Events.

Crash-safety comes from the order: the status naming attempt N is written (with a
resourceVersion precondition) before pod <job>-<N> is created, and AlreadyExists
means the pod is ours already (adopt)."""
from __future__ import annotations

import datetime as dt
import logging
import uuid

from .core import kueue
from .kube import (
    GROUP,
    VERSION,
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    KubeClient,
    NotFound,
)
from .preflight import kueue_missing

log = logging.getLogger("finetune.actions")


class PodRejected(Exception):
    """The API server refused the pod: "rejected" (invalid, a spec problem no retry will
    fix) or "forbidden" (admission: quota, PriorityClass, Pod Security; may clear later); or
    "KueueNotInstalled": not sent, its queue's Kueue is missing (preflight.kueue_missing)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


async def replace_status(client: KubeClient, job: dict, status: dict) -> dict:
    """The job as written; kube.Conflict when it changed since it was read (re-read, decide again)."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
            "metadata": {"name": job["metadata"]["name"],
                         "namespace": job["metadata"]["namespace"],
                         "resourceVersion": job["metadata"]["resourceVersion"]},
            "spec": job.get("spec") or {}, "status": status}
    path = client.job_path(job["metadata"]["namespace"], job["metadata"]["name"]) + "/status"
    return await client.request("PUT", path, body=body)


async def create_pod(client: KubeClient, namespace: str, pod: dict) -> str:
    """Returns 'created', 'adopted' (ours already: a retry after a crash or a slow watch),
    'conflict' (a pod by that name that this job does not control) or
    'namespace-terminating'."""
    if kueue.LABEL_QUEUE_NAME in (pod["metadata"].get("labels") or {}):
        missing = await kueue_missing(client)
        if missing is not None:
            raise PodRejected(kueue.NOT_INSTALLED, missing)
    try:
        await client.create(client.pod_path(namespace), pod)
        return "created"
    except AlreadyExists:
        existing = await client.get(client.pod_path(namespace, pod["metadata"]["name"]))
        ours = pod["metadata"]["ownerReferences"][0]["uid"]
        refs = (existing.get("metadata") or {}).get("ownerReferences") or []
        if any(r.get("controller") and r.get("uid") == ours for r in refs):
            return "adopted"
        return "conflict"
    except Forbidden as exc:
        if exc.namespace_terminating:
            return "namespace-terminating"  # the job goes with its namespace: not an error
        raise PodRejected("forbidden", exc.message) from None
    except (BadRequest, Invalid) as exc:
        raise PodRejected("rejected", exc.message) from None


async def create_service(client: KubeClient, namespace: str, service: dict) -> str:
    """'created', 'exists' (ours already) or 'conflict' (someone else's Service by that name)."""
    path = f"/api/v1/namespaces/{namespace}/services"
    try:
        await client.create(path, service)
        return "created"
    except AlreadyExists:
        existing = await client.get(f"{path}/{service['metadata']['name']}")
        ours = service["metadata"]["ownerReferences"][0]["uid"]
        refs = (existing.get("metadata") or {}).get("ownerReferences") or []
        return "exists" if any(r.get("controller") and r.get("uid") == ours for r in refs) else "conflict"


async def delete_pod(client: KubeClient, namespace: str, name: str, uid: str | None = None,
                     grace_seconds: int | None = None) -> bool:
    body: dict = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
    if grace_seconds is not None:
        body["gracePeriodSeconds"] = grace_seconds
    if uid:
        body["preconditions"] = {"uid": uid}
    try:
        await client.delete(client.pod_path(namespace, name), body)
        return True
    except (NotFound, Conflict):  # gone already, or a different pod by that name now
        return False


async def delete_job(client: KubeClient, namespace: str, name: str, uid: str) -> None:
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
            "preconditions": {"uid": uid}}
    try:
        await client.delete(client.job_path(namespace, name), body)
    except (NotFound, Conflict):
        pass  # gone already, or a different job by that name now


async def post_event(client: KubeClient, job: dict, type_: str, reason: str, message: str,
                     component: str = "finetune-operator") -> None:
    meta = job["metadata"]
    now = dt.datetime.now(dt.UTC)
    ts = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                     "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
                           "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        "type": type_, "reason": reason, "message": message[:1024],
        "source": {"component": component}, "reportingComponent": component,
        "reportingInstance": component, "action": reason,
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    try:
        await client.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
    except ApiError as exc:  # an Event is worth a log line, never a failed reconcile
        log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"],
                    meta["name"], exc)
