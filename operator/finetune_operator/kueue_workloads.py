"""The one read of Kueue's objects: a gated attempt's Workload, for Kueue's own reason in the
job's status (docs/CONTRACTS.md, "Queueing with Kueue"; the rules are core/kueue.py).

A failed read (no RBAC, no Workload yet, the API server away) only leaves the reason out: the
job is Queued either way, so it never fails a reconcile."""
from __future__ import annotations

import logging

from .core import kueue
from .kube import TRANSPORT_ERRORS, ApiError, KubeClient

log = logging.getLogger("finetune.reconcile")


async def queue_message(client: KubeClient, namespace: str, ref: kueue.WorkloadRef) -> str | None:
    """Kueue's reason for not admitting the Workload `ref` of `namespace`; None when unknown."""
    path = f"{kueue.WORKLOAD_API}/namespaces/{namespace}/workloads"
    try:
        if ref.name:
            found = [await client.get(f"{path}/{ref.name}")]
        else:
            listed = await client.get(path, labelSelector=f"{kueue.LABEL_JOB_UID}={ref.job_uid}")
            found = listed.get("items") or [] if isinstance(listed, dict) else []
    except (ApiError, *TRANSPORT_ERRORS) as exc:
        log.info("%s: Kueue's Workload %s unreadable, its reason left out: %s",
                 namespace, ref.name or f"of pod uid {ref.job_uid}", exc)
        return None
    messages = (kueue.workload_message(wl) for wl in found if isinstance(wl, dict))
    return next((m for m in messages if m), None)
