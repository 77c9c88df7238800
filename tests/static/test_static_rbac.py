"""RBAC is least privilege: exactly the rights the operator uses, no wildcards, no secrets,
users never write trainingjobs/status, and deploy/README.md's table says the same."""
from __future__ import annotations

import re

import pytest
from static_support import DEPLOY, OPERATOR_NAMESPACE, find, one

SA = {"kind": "ServiceAccount", "name": "finetune-operator", "namespace": OPERATOR_NAMESPACE}
OPERATOR_ROLES = {("ClusterRole", "finetune-operator"), ("ClusterRole", "finetune-operator-cluster"),
                  ("Role", "finetune-operator-leader-election")}
LEASE_NAME = "finetune-operator-leader"
CRD_NAME = "trainingjobs.finetune.dev"

# (role, apiGroup, resource, verb, resourceName or "") -- the complete grant of the operator.
EXPECTED_OPERATOR_GRANTS = {
    *(
        ("finetune-operator", "finetune.dev", "trainingjobs", v, "")
        for v in ("get", "list", "watch", "patch", "delete")
    ),
    *(("finetune-operator", "finetune.dev", "trainingjobs/status", v, "") for v in ("get", "patch", "update")),
    *(("finetune-operator", "", "pods", v, "") for v in ("get", "list", "watch", "create", "delete")),
    *(("finetune-operator", "", "services", v, "") for v in ("get", "create")),
    *(("finetune-operator", "", "events", v, "") for v in ("create", "patch")),
    *(("finetune-operator", "events.k8s.io", "events", v, "") for v in ("create", "patch")),
    *(("finetune-operator", "kueue.x-k8s.io", "workloads", v, "") for v in ("get", "list")),
    *(("finetune-operator-cluster", "", "nodes", v, "") for v in ("get", "list", "watch")),
    *(
        ("finetune-operator-cluster", "apiextensions.k8s.io", "customresourcedefinitions", v, CRD_NAME)
        for v in ("get", "list", "watch")
    ),
    ("finetune-operator-cluster", "apiextensions.k8s.io", "customresourcedefinitions", "get",
     "localqueues.kueue.x-k8s.io"),
    *(("finetune-operator-leader-election", "coordination.k8s.io", "leases", v, LEASE_NAME) for v in ("get", "update")),
    ("finetune-operator-leader-election", "coordination.k8s.io", "leases", "create", ""),
}
DANGEROUS_VERBS = {"escalate", "bind", "impersonate", "*"}
DANGEROUS_RESOURCES = {
    "secrets",
    "pods/exec",
    "pods/attach",
    "pods/portforward",
    "pods/ephemeralcontainers",
    "serviceaccounts/token",
    "serviceaccounts",
    "nodes/proxy",
    "configmaps",
    "roles",
    "clusterroles",
    "rolebindings",
    "clusterrolebindings",
}


def grants(role: dict) -> set[tuple[str, str, str, str, str]]:
    out = set()
    for rule in role.get("rules", []):
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    for name in rule.get("resourceNames") or [""]:
                        out.add((role["metadata"]["name"], group, resource, verb, name))
    return out


def roles(objects):
    return find(objects, "ClusterRole") + find(objects, "Role")


def test_no_wildcards_anywhere(base_objects):
    for role in roles(base_objects):
        for rule in role.get("rules", []):
            assert "nonResourceURLs" not in rule, role["metadata"]["name"]
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                for value in rule.get(key, []) or []:
                    assert "*" not in value, f"{role['metadata']['name']}: wildcard in {key}: {rule}"


def test_no_secrets_and_no_dangerous_rights(base_objects):
    for role in roles(base_objects):
        for _, _group, resource, verb, _ in grants(role):
            assert resource not in DANGEROUS_RESOURCES, f"{role['metadata']['name']} grants {verb} {resource}"
            assert verb not in DANGEROUS_VERBS, f"{role['metadata']['name']} grants {verb} on {resource}"


def test_operator_grants_are_exactly_what_it_uses(base_objects):
    got = set()
    for kind, name in OPERATOR_ROLES:
        got |= grants(one(base_objects, kind, name))
    assert got == EXPECTED_OPERATOR_GRANTS, (
        f"unexpected: {sorted(got - EXPECTED_OPERATOR_GRANTS)}\nmissing: {sorted(EXPECTED_OPERATOR_GRANTS - got)}"
    )


def test_operator_cannot_modify_pods_in_place(base_objects):
    pod_verbs = {g[3] for g in grants(one(base_objects, "ClusterRole", "finetune-operator")) if g[2] == "pods"}
    assert not pod_verbs & {"update", "patch", "deletecollection"}


def test_leases_only_in_the_operator_namespace(base_objects):
    for role in find(base_objects, "ClusterRole"):
        assert not any(g[2] == "leases" for g in grants(role)), role["metadata"]["name"]
    role = one(base_objects, "Role", "finetune-operator-leader-election")
    assert role["metadata"]["namespace"] == OPERATOR_NAMESPACE
    deployment = one(base_objects, "Deployment", "finetune-operator")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--leader-election-id={LEASE_NAME}" in args


def test_bindings_grant_operator_roles_to_the_operator_only(base_objects):
    bindings = find(base_objects, "ClusterRoleBinding") + find(base_objects, "RoleBinding")
    bound = set()
    for binding in bindings:
        assert binding["subjects"] == [SA], binding["metadata"]["name"]
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        one(base_objects, ref["kind"], ref["name"])  # the role is shipped
        if binding["kind"] == "RoleBinding":
            assert binding["metadata"]["namespace"] == OPERATOR_NAMESPACE
        bound.add((ref["kind"], ref["name"]))
    assert bound == OPERATOR_ROLES


def test_serviceaccount_does_not_automount_by_default(base_objects):
    sa = one(base_objects, "ServiceAccount", "finetune-operator")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    "name, labels, verbs",
    [
        ("finetune-trainingjobs-view", {"rbac.authorization.k8s.io/aggregate-to-view"}, {"get", "list", "watch"}),
        (
            "finetune-trainingjobs-edit",
            {"rbac.authorization.k8s.io/aggregate-to-edit", "rbac.authorization.k8s.io/aggregate-to-admin"},
            {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
        ),
    ],
)
def test_user_roles_aggregate_and_never_write_status(base_objects, name, labels, verbs):
    role = one(base_objects, "ClusterRole", name)
    for label in labels:
        assert role["metadata"]["labels"][label] == "true"
    got = grants(role)
    assert {g[3] for g in got if g[2] == "trainingjobs"} == verbs
    for _, group, resource, verb, _ in got:
        assert group == "finetune.dev"
        if resource != "trainingjobs":
            assert resource == "trainingjobs/status" and verb in {"get", "list", "watch"}, (resource, verb)


def test_no_user_role_can_forge_status(base_objects):
    for role in find(base_objects, "ClusterRole"):
        if role["metadata"]["name"] in {"finetune-operator"}:
            continue
        for _, _, resource, verb, _ in grants(role):
            assert not (resource == "trainingjobs/status" and verb in {"create", "update", "patch"}), role["metadata"][
                "name"
            ]


def _readme_table() -> set[tuple[str, str, str, str, str]]:
    text = (DEPLOY / "README.md").read_text()
    block = re.search(r"<!-- rbac-table:begin -->(.*?)<!-- rbac-table:end -->", text, re.S)
    assert block, "deploy/README.md lacks the <!-- rbac-table:begin/end --> block"
    rows = set()
    for line in block.group(1).strip().splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        role, group, resource, verbs, names = cells[:5]
        group = "" if group == "core" else group
        for verb in (v.strip() for v in verbs.split(",")):
            for name in [n.strip() for n in names.split(",")] if names not in ("", "-", "any") else [""]:
                rows.add((role, group, resource, verb, name))
    return rows


def test_readme_rbac_table_matches_the_roles():
    table = _readme_table()
    assert table == EXPECTED_OPERATOR_GRANTS, (
        f"README only: {sorted(table - EXPECTED_OPERATOR_GRANTS)}\n"
        f"roles only: {sorted(EXPECTED_OPERATOR_GRANTS - table)}"
    )
