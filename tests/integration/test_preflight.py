"""Start-up fails loudly: an operator that cannot work exits non-zero within seconds with one
line naming what is missing, instead of running and silently doing nothing.

- an identity without RBAC (a fresh ServiceAccount's token): every denied right is named;
- an identity with some RBAC: exactly the missing rights are named;
- no CRD: checked on a SEPARATE small control plane (deleting the CRD from the shared one
  would delete every TrainingJob of the session); the message names the CRD and
  `make install`, and once the CRD is applied the operator starts and is Ready."""
from __future__ import annotations

import re
import subprocess
import uuid

import pytest
import requests

from finetune_testbed.cluster import REPO, ClusterConfig, LocalCluster
from finetune_testbed.identities import service_account_kubeconfig
from finetune_testbed.operator_proc import FAST_ARGS, OperatorProcess
from finetune_testbed.procs import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXIT_DEADLINE = 30.0  # seconds from start to exit, Python and kopf imports included
FAILED_LINE = re.compile(r"CRITICAL finetune\.operator: start-up check failed: (.+)")


def run_to_exit(op: OperatorProcess) -> tuple[int, str]:
    """Start the operator, expect it to exit by itself; (exit code, the failure line)."""
    op.start(wait_ready=False)
    try:
        code = op.proc.popen.wait(EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        op.kill()
        pytest.fail(f"the operator did not exit within {EXIT_DEADLINE:.0f}s; log:\n"
                    f"{op.log_tail(30)}")
    log = op.proc.log_path.read_text(errors="replace")
    lines = FAILED_LINE.findall(log)
    assert lines, f"no 'start-up check failed' line in the log:\n{op.log_tail(30)}"
    print(f"\n{op.proc.name}: exit {code}: {lines[-1]}")
    return code, lines[-1]


def test_identity_without_rbac_exits_naming_every_denied_right(cluster, crd, namespace, tmp_path):
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    kubeconfig = service_account_kubeconfig(cluster, tmp_path / "nobody.kubeconfig", "nobody",
                                            namespace)
    op = OperatorProcess(kubeconfig, cluster.log_dir, name="operator-no-rbac",
                         args=[*FAST_ARGS, "--leader-elect",
                               "--leader-election-namespace=finetune-system",
                               "--leader-election-id=finetune-operator-leader"])
    code, line = run_to_exit(op)
    assert code == 2
    assert line.startswith("RBAC denies what the operator needs: ") and "deploy/rbac" in line
    denied = set(line.split(": ", 1)[1].split(" (see")[0].split(", "))
    for right in ("list trainingjobs", "watch trainingjobs", "patch trainingjobs",
                  "update trainingjobs/status", "list pods", "create pods", "delete pods",
                  "watch nodes", "create events",
                  "get leases/finetune-operator-leader in namespace finetune-system",
                  "create leases in namespace finetune-system"):
        assert right in denied, (right, sorted(denied))


def test_partial_rbac_names_exactly_what_is_missing(cluster, crd, namespace, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    role, binding = f"finetune-preflight-partial-{suffix}", f"finetune-preflight-partial-{suffix}"
    # The operator's namespaced rights, nothing on nodes.
    cluster.kubectl("create", "clusterrole", role,
                    "--verb=get,list,watch,patch,delete", "--resource=trainingjobs.finetune.dev")
    cluster.kubectl("create", "clusterrole", f"{role}-status", "--verb=get,patch,update",
                    "--resource=trainingjobs.finetune.dev/status")
    cluster.kubectl("create", "clusterrole", f"{role}-pods", "--verb=get,list,watch,create,delete",
                    "--resource=pods")
    cluster.kubectl("create", "clusterrole", f"{role}-events", "--verb=create,patch",
                    "--resource=events")
    cluster.kubectl("create", "serviceaccount", "half", "-n", namespace)
    try:
        for r in (role, f"{role}-status", f"{role}-pods", f"{role}-events"):
            cluster.kubectl("create", "clusterrolebinding", r.replace(role, binding),
                            f"--clusterrole={r}", f"--serviceaccount={namespace}:half")
        kubeconfig = service_account_kubeconfig(cluster, tmp_path / "half.kubeconfig", "half",
                                                namespace)
        op = OperatorProcess(kubeconfig, cluster.log_dir, name="operator-partial-rbac")
        code, line = run_to_exit(op)
        assert code == 2
        assert line == "RBAC denies what the operator needs: list nodes, watch nodes (see deploy/rbac/)"
    finally:
        for r in (role, f"{role}-status", f"{role}-pods", f"{role}-events"):
            cluster.kubectl("delete", "clusterrolebinding", r.replace(role, binding),
                            "--ignore-not-found", check=False)
            cluster.kubectl("delete", "clusterrole", r, "--ignore-not-found", check=False)


def test_missing_crd_exits_naming_it_then_starts_once_installed(tmp_path):
    with LocalCluster(config=ClusterConfig(gpu_nodes=0)) as bare:
        op = OperatorProcess(bare.kubeconfig, bare.log_dir, name="operator-no-crd")
        code, line = run_to_exit(op)
        assert code == 2
        assert "CustomResourceDefinition trainingjobs.finetune.dev is not installed" in line
        assert "make install" in line
        assert not op.ready(), "the failed operator still answers /readyz"

        bare.kubectl("apply", "-f", str(REPO / "crds"))
        bare.wait_established("trainingjobs.finetune.dev")
        op = OperatorProcess(bare.kubeconfig, bare.log_dir, name="operator-with-crd")
        try:
            op.start(wait_ready=True)  # /readyz 200: the API server answered
            health = f"http://127.0.0.1:{op.health_port}"
            assert requests.get(f"{health}/readyz", timeout=5).text == "ok"
            assert requests.get(f"{health}/healthz", timeout=5).status_code == 200
            wait_for(lambda: "finetune_operator_api_ready 1.0" in op.metrics_text(), 30,
                     "finetune_operator_api_ready 1")
        finally:
            op.stop()
        assert op.proc.popen.returncode == 0, op.log_tail(20)
