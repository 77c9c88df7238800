"""The watch-gap audit against the local API server (finetune_operator/watch_gaps.py): its
live-only LIST (field selector on status.phase) must not take a pod that finished behind the
index for a deleted one, and must find a pod deleted behind the index, as the full LIST does.

The index is built by hand as a lagging watch would have left it (every pod last seen
Running); the pods' real states are written the way a kubelet writes them (the status
subresource) and a deletion the way a user does."""
from __future__ import annotations

import asyncio

import kopf
import pytest

from finetune_operator.api import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import POD_SELECTOR, _pod_summary
from finetune_operator.kube import KubeClient
from finetune_operator.reconciler import Reconciler
from finetune_operator.watch_gaps import audit_once

JOB = "audited"


def _pod(core, namespace: str, name: str) -> dict:
    body = {"metadata": {"name": name, "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: JOB}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "nowhere"}}
    core.create_namespaced_pod(namespace, body)
    running = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    return core.api_client.sanitize_for_serialization(
        core.patch_namespaced_pod_status(name, namespace, running))


@pytest.mark.parametrize("live_only", [True, False])
def test_finished_behind_the_index_is_kept_and_deleted_behind_it_is_gone(cluster, core, namespace, live_only,
                                                                         monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    seen = {name: _pod(core, namespace, name) for name in ("stays", "finishes", "deleted")}
    core.patch_namespaced_pod_status("finishes", namespace, {"status": {"phase": "Succeeded"}})
    core.delete_namespaced_pod("deleted", namespace, grace_period_seconds=0)
    key = (namespace, JOB)
    reconciler = Reconciler(client=None, config=OperatorConfig())
    reconciler.bind({key: [_pod_summary(p) for p in seen.values()]}, None)
    # A job of the namespace makes the audit list it; not this key's, so that hiding a pod
    # does not start a reconcile (there is no writer here).
    reconciler.jobs[(namespace, "another")] = {"metadata": {"namespace": namespace, "name": "another"}}

    async def audit() -> None:
        login = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        assert login is not None
        client = KubeClient(login)
        try:
            await audit_once(reconciler, client, POD_SELECTOR, live_only=live_only)
        finally:
            await client.close()

    asyncio.run(audit())
    assert reconciler.gone == {key: {seen["deleted"]["metadata"]["uid"]}}
    assert sorted(p["metadata"]["name"] for p in reconciler.pods_of(key)) == ["finishes", "stays"]
