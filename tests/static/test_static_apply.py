"""`kubectl apply -k deploy/` against the local control plane, then RBAC checked by the API
server itself (`kubectl auth can-i --as ...`), aggregation included, and the operator pods
admitted under Pod Security "restricted"."""
from __future__ import annotations

import json
import time

import pytest
from static_support import DEPLOY, OPERATOR_NAMESPACE

pytestmark = pytest.mark.cluster

SA = f"system:serviceaccount:{OPERATOR_NAMESPACE}:finetune-operator"


def can_i(cluster, who: str, *args: str, namespace: str | None = None) -> bool:
    cmd = ["auth", "can-i", *args, f"--as={who}"]
    cmd += [f"--namespace={namespace}"] if namespace else []
    res = cluster.kubectl(*cmd, check=False)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(cmd)}: {res.stdout} {res.stderr}"
    return answer == "yes"


def eventually(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def installed(cluster):
    out = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(DEPLOY), timeout=120)
    assert "Warning" not in out.stderr, out.stderr
    yield cluster
    # Leave the CRD, namespace and RBAC (other tests may use them); stop the fake operator pods.
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "delete", "deployment", "finetune-operator",
                    "--wait=false", check=False)


def test_apply_creates_everything(installed):
    cluster = installed
    crd = cluster.get_json("crd", "trainingjobs.finetune.dev")
    eventually(lambda: any(c["type"] == "Established" and c["status"] == "True"
                           for c in cluster.get_json("crd", "trainingjobs.finetune.dev")
                           ["status"].get("conditions", [])), 30, "CRD Established")
    assert crd["spec"]["group"] == "finetune.dev"
    for kind, name in [("serviceaccount", "finetune-operator"), ("service", "finetune-operator"),
                       ("deployment", "finetune-operator"), ("pdb", "finetune-operator"),
                       ("networkpolicy", "finetune-operator"),
                       ("role", "finetune-operator-leader-election")]:
        cluster.get_json("-n", OPERATOR_NAMESPACE, kind, name)


def test_operator_pods_pass_restricted_pod_security(installed):
    cluster = installed

    def two_pods():
        pods = cluster.get_json("-n", OPERATOR_NAMESPACE, "pods", "-l",
                                "app.kubernetes.io/name=finetune-operator")["items"]
        return len(pods) == 2

    # Pod Security admission is active here: a privileged pod is refused.
    probe = cluster.kubectl("-n", OPERATOR_NAMESPACE, "run", "psa-probe", "--image=busybox", "--dry-run=server",
                            "--overrides", json.dumps({"spec": {"containers": [{
                                "name": "psa-probe", "image": "busybox",
                                "securityContext": {"privileged": True}}]}}), check=False)
    assert probe.returncode != 0 and "PodSecurity" in probe.stderr, probe.stderr
    eventually(two_pods, 60, "2 operator pods (Pod Security admission would refuse them)")
    rs = cluster.get_json("-n", OPERATOR_NAMESPACE, "replicasets", "-l",
                          "app.kubernetes.io/name=finetune-operator")["items"]
    for r in rs:
        for cond in r["status"].get("conditions", []):
            assert cond["type"] != "ReplicaFailure", json.dumps(cond)


@pytest.mark.parametrize("args, namespace, allowed", [
    (("watch", "trainingjobs.finetune.dev"), "team-x", True),
    (("patch", "trainingjobs.finetune.dev"), "team-x", True),
    (("delete", "trainingjobs.finetune.dev"), "team-x", True),
    (("create", "trainingjobs.finetune.dev"), "team-x", False),
    (("update", "trainingjobs.finetune.dev", "--subresource=status"), "team-x", True),
    (("create", "pods"), "team-x", True),
    (("delete", "pods"), "team-x", True),
    (("patch", "pods"), "team-x", False),
    (("update", "pods", "--subresource=status"), "team-x", False),
    (("create", "pods", "--subresource=exec"), "team-x", False),
    (("create", "events"), "team-x", True),
    (("create", "events.events.k8s.io"), "team-x", True),
    (("get", "secrets"), "team-x", False),
    (("list", "secrets"), "team-x", False),
    (("get", "configmaps"), "team-x", False),
    (("list", "nodes"), None, True),
    (("patch", "nodes"), None, False),
    (("list", "namespaces"), None, False),
    (("get", "customresourcedefinitions/trainingjobs.finetune.dev"), None, True),
    (("get", "customresourcedefinitions/other.example.com"), None, False),
    (("get", "leases/finetune-operator-leader"), OPERATOR_NAMESPACE, True),
    (("update", "leases/finetune-operator-leader"), OPERATOR_NAMESPACE, True),
    (("update", "leases/kube-controller-manager"), "kube-system", False),
    (("create", "leases"), OPERATOR_NAMESPACE, True),
    (("create", "leases"), "team-x", False),
    (("create", "serviceaccounts/token"), "team-x", False),
    (("create", "clusterrolebindings"), None, False),
])
def test_operator_rights_as_seen_by_the_api_server(installed, args, namespace, allowed):
    assert can_i(installed, SA, *args, namespace=namespace) is allowed


def test_user_roles_aggregate_into_view_and_edit(installed):
    cluster = installed
    ns = "finetune-rbac-users"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl("-n", ns, "create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice",
                    check=False)
    cluster.kubectl("-n", ns, "create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob",
                    check=False)
    try:
        # The controller-manager's clusterrole-aggregation controller fills edit/view.
        eventually(lambda: can_i(cluster, "alice", "create", "trainingjobs.finetune.dev", namespace=ns),
                   60, "edit to aggregate finetune-trainingjobs-edit")
        eventually(lambda: can_i(cluster, "bob", "list", "trainingjobs.finetune.dev", namespace=ns),
                   60, "view to aggregate finetune-trainingjobs-view")
        assert can_i(cluster, "alice", "delete", "trainingjobs.finetune.dev", namespace=ns)
        assert can_i(cluster, "alice", "get", "trainingjobs.finetune.dev", "--subresource=status", namespace=ns)
        # Users must not forge status.
        assert not can_i(cluster, "alice", "patch", "trainingjobs.finetune.dev", "--subresource=status", namespace=ns)
        assert not can_i(cluster, "alice", "update", "trainingjobs.finetune.dev", "--subresource=status", namespace=ns)
        assert not can_i(cluster, "bob", "create", "trainingjobs.finetune.dev", namespace=ns)
        # admin aggregates edit's rules too.
        cluster.kubectl("-n", ns, "create", "rolebinding", "carol-admin", "--clusterrole=admin",
                        "--user=carol", check=False)
        assert can_i(cluster, "carol", "create", "trainingjobs.finetune.dev", namespace=ns)
        assert not can_i(cluster, "carol", "patch", "trainingjobs.finetune.dev", "--subresource=status", namespace=ns)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
