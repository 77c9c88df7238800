"""The operator running with the deployed ServiceAccount's identity, as the Deployment runs it.

`kubectl apply --server-side -k deploy/` (server-side dry run first, then for real; both are
idempotent, so this works whether or not tests/static/test_static_apply.py applied it
earlier in the session), a bound token for `finetune-system/finetune-operator`, a kubeconfig
with that token, and the operator with the Deployment's flags. It must pass its preflight
RBAC check and drive the happy path; the session operator (admin identity) is frozen
meanwhile, so whatever happens is the ServiceAccount's doing.

RBAC as seen by the API server: tests/static/test_static_apply.py already asks
`kubectl auth can-i --as=system:serviceaccount:finetune-system:finetune-operator` about the
operator's rights and denials (secrets, pods/exec, pod patch, namespaces, RBAC objects,
tokens) and about users bound to view/edit/admin. Added here: every check the operator's own
preflight makes (finetune_operator.preflight REQUIRED + LEASES, so the code and the deployed
roles cannot drift apart), a few denials it does not ask (deployments, cluster-wide secrets,
pod eviction), and a real status write by a user bound to `edit`, refused with Forbidden."""
from __future__ import annotations

import json
import time

import pytest

from finetune_operator.preflight import LEASES, REQUIRED
from finetune_testbed.cluster import REPO
from finetune_testbed.identities import (
    can_i,
    lease,
    lease_holder,
    metric_samples,
    metric_value,
    service_account_kubeconfig,
)
from finetune_testbed.jobs import Jobs, job_manifest, sim
from finetune_testbed.operator_proc import FAST_ARGS, OperatorProcess
from finetune_testbed.procs import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEPLOY = REPO / "deploy"
OP_NS = "finetune-system"
SA_NAME = "finetune-operator"
SA = f"system:serviceaccount:{OP_NS}:{SA_NAME}"
LEASE = "finetune-operator-leader"
# As deploy/manager/deployment.yaml passes them (ports and fast test timings aside).
DEPLOYMENT_ARGS = ["--leader-elect", f"--leader-election-namespace={OP_NS}",
                   f"--leader-election-id={LEASE}"]


@pytest.fixture(scope="module")
def deployed(cluster):
    fresh = cluster.kubectl("get", "namespace", OP_NS, check=False).returncode != 0
    dry = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server",
                          "-k", str(DEPLOY), timeout=120, check=False)
    errors = [line for line in dry.stderr.splitlines() if line.strip()
              # The session's `crd` fixture applies the CRD client-side; kubectl migrates its
              # last-applied annotation on the first real server-side apply, a dry run only
              # warns that it did not (non-fatal; the dry run after the real apply is clean).
              and not line.startswith("Warning: failed to migrate kubectl.kubernetes.io/"
                                      "last-applied-configuration")]
    # On a fresh cluster the namespace is only dry-run created, so the objects inside it are
    # refused with NotFound; anything else is a real error.
    assert all(fresh and f'namespaces "{OP_NS}" not found' in line for line in errors), dry.stderr
    real = cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(DEPLOY),
                           timeout=120)
    assert "Warning" not in real.stderr, real.stderr
    cluster.wait_established("trainingjobs.finetune.dev")
    again = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server",
                            "-k", str(DEPLOY), timeout=120)
    assert "Warning" not in again.stderr, again.stderr
    yield cluster
    # As tests/static/test_static_apply.py does: the Deployment's pods are only simulated
    # here (the test runs the real process itself); keep the CRD, namespace and RBAC.
    cluster.kubectl("-n", OP_NS, "delete", "deployment", "finetune-operator", "--wait=false",
                    "--ignore-not-found", check=False)



@pytest.fixture
def sa_operator(deployed, cluster, tmp_path, session_operator_paused):
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "sa.kubeconfig", SA_NAME, OP_NS)
    identity = f"finetune-operator-sa-{int(time.time())}"
    op = OperatorProcess(kubeconfig, cluster.log_dir, name="operator-sa",
                         args=[*FAST_ARGS, *DEPLOYMENT_ARGS, f"--identity={identity}"])
    op.identity = identity
    # A Lease still held by an earlier test's operator would make this one a standby for up
    # to 15 s; wait_ready does not depend on leadership, becoming leader is awaited below.
    op.start(wait_ready=False)
    try:
        op.wait_ready(60)
        yield op
    finally:
        op.stop()


def _operator_rows():
    """(verb, resource for kubectl, subresource, namespace or None=cluster-wide) for every
    access check the operator's preflight makes, asked the way it asks them (cluster-wide;
    the Lease in its namespace, get/update by name: RBAC grants those on the one name)."""
    rows = []
    for verb, group, resource, sub in REQUIRED:
        res = f"{resource}.{group}" if group else resource
        rows.append((verb, res, sub or None, None))
    for verb, group, resource, sub in LEASES:
        name = "" if verb == "create" else f"/{LEASE}"
        rows.append((verb, f"{resource}.{group}{name}", sub or None, OP_NS))
    return rows


# Denials test_static_apply.py does not ask about.
EXTRA_DENIED = [
    ("create", "deployments.apps", None, "team-x"),
    ("create", "deployments.apps", None, OP_NS),
    ("list", "secrets", None, None),
    ("get", "secrets", None, OP_NS),
    ("create", "pods", "eviction", "team-x"),
    ("update", "trainingjobs.finetune.dev", None, "team-x"),
    ("get", "leases.coordination.k8s.io/some-other-lease", None, OP_NS),
    ("get", "leases.coordination.k8s.io", None, OP_NS),      # any name: no
    ("update", "leases.coordination.k8s.io", None, OP_NS),   # any name: no
]


def test_service_account_rights_match_what_the_operator_checks(deployed):
    cluster = deployed
    table, wrong = [], []
    for verb, resource, sub, ns in _operator_rows():
        got = can_i(cluster, SA, verb, resource, namespace=ns, subresource=sub)
        table.append((verb, resource + (f" --subresource={sub}" if sub else ""), ns or "*",
                      "yes", "yes" if got else "no"))
        if not got:
            wrong.append(table[-1])
    for verb, resource, sub, ns in EXTRA_DENIED:
        got = can_i(cluster, SA, verb, resource, namespace=ns, subresource=sub)
        table.append((verb, resource + (f" --subresource={sub}" if sub else ""), ns or "*",
                      "no", "yes" if got else "no"))
        if got:
            wrong.append(table[-1])
    print(f"\nkubectl auth can-i --as={SA}")
    print(f"  {'verb':<7} {'resource':<48} {'namespace':<16} {'want':<5} got")
    for verb, resource, ns, want, got in table:
        print(f"  {verb:<7} {resource:<48} {ns:<16} {want:<5} {got}")
    assert not wrong, f"RBAC differs from what the operator needs: {wrong}"


def test_operator_as_service_account_passes_preflight_and_runs_a_job(sa_operator, cluster,
                                                                      namespace):
    op = sa_operator
    wait_for(lambda: metric_value(op.metrics_text(), "finetune_operator_leader") == 1, 40,
             "the ServiceAccount operator to become leader", procs=[op.proc])
    assert lease_holder(cluster, OP_NS, LEASE) == op.identity

    jobs = Jobs(cluster, namespace)
    jobs.apply(job_manifest("as-sa", template=sim(outcome="succeed", run_for="2s")))
    try:
        status = jobs.wait_phase("as-sa", "Succeeded", 60)
    except AssertionError:
        raise AssertionError(f"operator log:\n{op.log_tail(60)}") from None
    assert status["attempt"] == 1 and status["failures"] == 0
    pods = jobs.pods("as-sa")
    assert [p["metadata"]["name"] for p in pods] == ["as-sa-1"]
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    events = jobs.events("as-sa")
    assert events, "no Events posted"
    assert {e.get("reportingComponent") for e in events} == {"finetune-operator"}

    text = op.metrics_text()
    unauthenticated = [(lbls, v) for lbls, v in
                       metric_samples(text, "finetune_operator_api_requests_total")
                       if lbls.get("code") == "401"]
    assert not unauthenticated, unauthenticated
    # No RBAC denial. (A 403 "unable to create new content in namespace X because it is being
    # terminated" is not one: earlier tests' namespaces may still be terminating, and this
    # fresh operator reconciles their jobs too.)
    denials = [line for line in op.proc.log_path.read_text(errors="replace").splitlines()
               if "HTTP 403" in line and "because it is being terminated" not in line]
    assert not denials, "API calls refused for the ServiceAccount:\n" + "\n".join(denials)
    assert metric_value(text, "finetune_operator_attempts_total", namespace=namespace) == 1

    # SIGTERM: kopf stops, the Lease is released for the standby (none here), exit 0.
    op.stop()
    assert op.proc.popen.returncode == 0, op.log_tail(30)
    spec = (lease(cluster, OP_NS, LEASE) or {}).get("spec") or {}
    assert not spec.get("holderIdentity"), f"Lease not released on SIGTERM: {spec}"


def test_user_bound_to_edit_cannot_write_status(deployed, cluster, namespace):
    user = "dana"
    cluster.kubectl("-n", namespace, "create", "rolebinding", "dana-edit", "--clusterrole=edit",
                    f"--user={user}")
    # The status subresource needs a job; nobody reconciles it here, that is fine.
    Jobs(cluster, namespace).apply(job_manifest("forge-me", suspend=True))
    wait_for(lambda: can_i(cluster, user, "create", "trainingjobs.finetune.dev",
                           namespace=namespace),
             60, "edit to aggregate finetune-trainingjobs-edit")
    rows = [("patch", "trainingjobs.finetune.dev", None, True),
            ("patch", "trainingjobs.finetune.dev", "status", False),
            ("update", "trainingjobs.finetune.dev", "status", False)]
    print(f"\nkubectl auth can-i --as={user} (RoleBinding to edit in {namespace})")
    for verb, resource, sub, want in rows:
        got = can_i(cluster, user, verb, resource, namespace=namespace, subresource=sub)
        print(f"  {verb:<7} {resource + (f' --subresource={sub}' if sub else ''):<48} "
              f"want {'yes' if want else 'no':<4} got {'yes' if got else 'no'}")
        assert got is want, (verb, resource, sub)

    forged = json.dumps({"status": {"phase": "Succeeded", "reason": "Forged"}})
    res = cluster.kubectl("patch", "tj", "forge-me", "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", forged, f"--as={user}", check=False)
    print(f"  kubectl patch tj --subresource=status --as={user}: rc={res.returncode} "
          f"{res.stderr.strip()}")
    assert res.returncode != 0 and "forbidden" in res.stderr.lower(), res.stderr
    # The same user may edit the object itself (so Forbidden is about status alone).
    ok = cluster.kubectl("patch", "tj", "forge-me", "-n", namespace, "--type=merge",
                         "-p", '{"metadata":{"labels":{"edited-by":"dana"}}}', f"--as={user}",
                         check=False)
    assert ok.returncode == 0, ok.stderr
    status = cluster.get_json("tj", "forge-me", "-n", namespace).get("status") or {}
    assert status.get("reason") != "Forged", status
