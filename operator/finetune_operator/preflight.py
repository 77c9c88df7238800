"""Start-up checks: the CRD is installed and RBAC allows everything the operator does.
Each failure names the missing piece and how to fix it."""
from __future__ import annotations

from .config import OperatorConfig
from .core import kueue
from .kube import GROUP, PLURAL, VERSION, ApiError, Forbidden, KubeClient, NotFound

CRD_NAME = f"{PLURAL}.{GROUP}"

# (verb, group, resource, subresource): exactly what the operator does.
REQUIRED = [
    ("list", GROUP, PLURAL, ""), ("watch", GROUP, PLURAL, ""), ("delete", GROUP, PLURAL, ""),
    ("patch", GROUP, PLURAL, ""), ("update", GROUP, PLURAL, "status"),
    ("list", "", "pods", ""), ("watch", "", "pods", ""), ("create", "", "pods", ""),
    ("delete", "", "pods", ""), ("list", "", "nodes", ""), ("watch", "", "nodes", ""),
    ("create", "", "events", ""),
]
LEASES = [("get", "coordination.k8s.io", "leases", ""), ("create", "coordination.k8s.io", "leases", ""),
          ("update", "coordination.k8s.io", "leases", "")]


class PreflightError(Exception):
    pass


async def kueue_missing(client: KubeClient) -> str | None:
    """Why a pod with Kueue's queue label must not be created now, or None. Asked before each
    such create (not once at start-up), so installing Kueue later needs no restart. A pod
    created without Kueue would run at once, bypassing the queue's quota. Not being allowed
    to read the CRD (RBAC without the rule) is no answer: the pod is created."""
    try:
        await client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{kueue.LOCALQUEUE_CRD}")
    except NotFound:
        return (f"spec.queueName is set but Kueue is not installed: the CustomResourceDefinition "
                f"{kueue.LOCALQUEUE_CRD} does not exist")
    except Forbidden:
        return None
    return None


async def preflight(client: KubeClient, cfg: OperatorConfig) -> None:
    try:
        crd = await client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
    except NotFound:
        raise PreflightError(f"the CustomResourceDefinition {CRD_NAME} is not installed; "
                             "apply crds/ (make install) or deploy/ first") from None
    except Forbidden:
        pass  # reading CRDs is optional; the access review below is not
    except ApiError as exc:
        raise PreflightError(f"cannot read CRD {CRD_NAME}: {exc}") from None
    else:
        served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
        if VERSION not in served:
            raise PreflightError(f"CRD {CRD_NAME} does not serve {VERSION} (serves {served})")
    checks = REQUIRED + (LEASES if cfg.leader_elect else [])
    namespaces = cfg.namespaces or ("",)
    denied = []
    for ns in namespaces:
        for verb, group, resource, sub in checks:
            attrs = {"verb": verb, "group": group, "resource": resource}
            if sub:
                attrs["subresource"] = sub
            if resource == "leases":
                attrs["namespace"] = cfg.leader_election_namespace
                if verb != "create":  # RBAC grants get/update on the one Lease name only
                    attrs["name"] = cfg.leader_election_name
            elif ns and resource != "nodes":
                attrs["namespace"] = ns
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": attrs}}
            res = await client.create("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                      review)
            if not (res.get("status") or {}).get("allowed"):
                target = resource + (f"/{attrs['name']}" if attrs.get("name") else "") \
                    + (f"/{sub}" if sub else "")
                where = f" in namespace {attrs['namespace']}" if attrs.get("namespace") else ""
                denied.append(f"{verb} {target}{where}")
    if denied:
        raise PreflightError("RBAC denies what the operator needs: " + ", ".join(denied)
                             + " (see deploy/rbac/)")
