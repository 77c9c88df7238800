"""The safety net for deletions the watches missed.

kopf re-lists after a watch gap (HTTP 410, a reconnect) but keeps index entries for objects
that vanished meanwhile, so a pod or Node deleted during the gap would stay in the index
for ever and a job would keep "seeing" a pod that no longer exists. Every timer interval
one paginated LIST per namespace with jobs (pods) and one of Nodes finds such entries:
O(namespaces) requests per interval instead of one LIST per job."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .kube import TRANSPORT_ERRORS, ApiError, KubeClient, resource_version

if TYPE_CHECKING:
    from .reconciler import Reconciler

log = logging.getLogger("finetune.watch_gaps")
PAGE_SIZE = 500
# The audit needs names, uids and resourceVersions only: the API server's metadata-only
# representation (PartialObjectMetadataList, docs/ARCHITECTURE.md "Watch gaps") leaves out
# spec and status, most of a pod; decoding whole pods was most of the idle operator's CPU
# at 1,000 jobs (bench/README.md "Idle CPU").
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"


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
    while True:
        await asyncio.sleep(interval)
        try:
            await audit_once(reconciler, client, pod_selector)
        except (ApiError, *TRANSPORT_ERRORS) as exc:
            log.warning("watch-gap audit failed (retried in %.0fs): %s", interval, exc)


async def audit_once(reconciler: Reconciler, client: KubeClient, pod_selector: str) -> None:
    if reconciler.pod_index is None:
        return  # the watches have not delivered anything yet
    namespaces = {ns for ns, _ in reconciler.jobs}
    listed: set[str] = set()
    oldest = None
    for ns in sorted(namespaces):
        items, at = await list_all(client, client.pod_path(ns), labelSelector=pod_selector)
        listed |= {p["metadata"]["uid"] for p in items}
        oldest = at if oldest is None else min(oldest, at)
    indexed = [(key, pods) for key, pods in _snapshot(reconciler.pod_index) if key[0] in namespaces]
    reconciler.pods_vanished(vanished(indexed, listed, oldest or 0))
    if reconciler.node_index is not None:
        nodes, at = await list_all(client, "/api/v1/nodes")
        names = {n["metadata"]["name"] for n in nodes}
        gone = {name for name, facts in _snapshot(reconciler.node_index)
                if name not in names and all(f.get("rv", 0) <= at for f in facts)}
        reconciler.nodes_vanished(gone)


def _snapshot(index: Mapping) -> list[tuple[Any, list]]:
    try:
        return [(key, list(index.get(key, ()))) for key in list(index)]
    except Exception:  # kopf's Store may change while iterated; next round
        return []
