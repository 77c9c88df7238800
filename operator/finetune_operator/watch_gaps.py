"""The safety net for deletions the watches missed.

kopf re-lists after a watch gap (HTTP 410, a reconnect) but keeps index entries for objects
that vanished meanwhile, so a pod or Node deleted during the gap would stay in the index
for ever and a job would keep "seeing" a pod that no longer exists. Every timer interval
one paginated LIST per namespace with jobs (pods) and one of Nodes finds such entries:
O(namespaces) requests per interval instead of one LIST per job.

The pod LIST asks for live pods only (a field selector on status.phase): with thousands of
finished jobs kept until their TTL, listing their finished pods every round was the idle
operator's growing cost (bench/README.md, "Cost curve"). An indexed live pod missing from that
LIST may have finished since the index saw it, so it counts as vanished only when a GET of it
answers 404 (or another pod by that name). Every FULL_EVERY rounds the LIST takes finished pods
too, so their index entries are checked as well."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .kube import TRANSPORT_ERRORS, ApiError, KubeClient, NotFound, resource_version

if TYPE_CHECKING:
    from .reconciler import Reconciler

log = logging.getLogger("finetune.watch_gaps")
PAGE_SIZE = 500
# The audit needs names, uids and resourceVersions only: the API server's metadata-only
# representation (PartialObjectMetadataList, docs/ARCHITECTURE.md "Watch gaps") leaves out
# spec and status, most of a pod; decoding whole pods was most of the idle operator's CPU
# at 1,000 jobs (bench/README.md "Idle CPU").
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"
FINISHED = ("Succeeded", "Failed")
LIVE_PODS = ",".join(f"status.phase!={phase}" for phase in FINISHED)
FULL_EVERY = 10


def vanished(indexed: Iterable[tuple[Any, Iterable[Mapping]]], listed_uids: set[str],
             listed_at: int) -> dict[Any, set[str]]:
    """{key: uids} of indexed objects that a LIST taken at resourceVersion `listed_at` does
    not contain although they are older than it (an object created since is simply not
    in the LIST yet)."""
    out: dict[Any, set[str]] = {}
    for key, objs in indexed:
        gone = {o["metadata"].get("uid") for o in objs
                if o["metadata"].get("uid") not in listed_uids
                and resource_version(o) <= listed_at}
        if gone:
            out[key] = gone
    return out


async def list_all(client: KubeClient, path: str, **params) -> tuple[list[dict], int]:
    """Every item's metadata of a LIST (paginated; all pages are one snapshot) and its resourceVersion."""
    items: list[dict] = []
    listed_at, token = 0, None
    while True:
        page = await client.get(path, accept=METADATA_ONLY, limit=str(PAGE_SIZE), **params,
                                **({"continue": token} if token else {}))
        listed_at = listed_at or resource_version(page)
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items, listed_at


async def keep_auditing(reconciler: Reconciler, client: KubeClient, interval: float,
                        pod_selector: str) -> None:
    """Runs until cancelled; one failed round is logged in one line and retried next time."""
    for round_ in itertools.count(1):
        await asyncio.sleep(interval)
        try:
            await audit_once(reconciler, client, pod_selector, live_only=round_ % FULL_EVERY != 0)
        except (ApiError, *TRANSPORT_ERRORS) as exc:
            log.warning("watch-gap audit failed (retried in %.0fs): %s", interval, exc)


def _finished(pod: Mapping) -> bool:
    return (pod.get("status") or {}).get("phase") in FINISHED


async def audit_once(reconciler: Reconciler, client: KubeClient, pod_selector: str,
                     live_only: bool = False) -> None:
    if reconciler.pod_index is None:
        return  # the watches have not delivered anything yet
    namespaces = {ns for ns, _ in reconciler.jobs}
    listed: set[str] = set()
    oldest = None
    params = {"labelSelector": pod_selector, **({"fieldSelector": LIVE_PODS} if live_only else {})}
    for ns in sorted(namespaces):
        items, at = await list_all(client, client.pod_path(ns), **params)
        listed |= {p["metadata"]["uid"] for p in items}
        oldest = at if oldest is None else min(oldest, at)
    indexed = [(key, [p for p in pods if not (live_only and _finished(p))])
               for key, pods in _snapshot(reconciler.pod_index) if key[0] in namespaces]
    gone = vanished(indexed, listed, oldest or 0)
    if live_only:
        gone = await _confirmed(client, gone, dict(indexed))
    reconciler.pods_vanished(gone)
    if reconciler.node_index is not None:
        nodes, at = await list_all(client, "/api/v1/nodes")
        names = {n["metadata"]["name"] for n in nodes}
        gone_nodes = {name for name, facts in _snapshot(reconciler.node_index)
                      if name not in names and all(f.get("rv", 0) <= at for f in facts)}
        reconciler.nodes_vanished(gone_nodes)


async def _confirmed(client: KubeClient, suspects: dict[Any, set[str]],
                     indexed: Mapping[Any, list[Mapping]]) -> dict[Any, set[str]]:
    """The suspects a GET finds gone: absent, or a different pod (uid) by the same name."""
    out: dict[Any, set[str]] = {}
    for key, uids in suspects.items():
        for pod in indexed.get(key, ()):
            meta = pod["metadata"]
            if meta.get("uid") not in uids:
                continue
            try:
                now = await client.get(client.pod_path(meta["namespace"], meta["name"]))
            except NotFound:
                now = None
            if now is None or (now.get("metadata") or {}).get("uid") != meta.get("uid"):
                out.setdefault(key, set()).add(meta["uid"])
    return out


def _snapshot(index: Mapping) -> list[tuple[Any, list]]:
    try:
        return [(key, list(index.get(key, ()))) for key in list(index)]
    except Exception:  # kopf's Store may change while iterated; next round
        return []
