"""The real node's cluster DNS (CoreDNS, docs/TESTBED.md "The real node"): a pod finds
another by `<hostname>.<subdomain>` of a headless Service, the way multi-node training ranks
find rank 0, through the search path the kubelet writes into its resolv.conf."""
from __future__ import annotations

import json

import pytest

from finetune_testbed.procs import wait_for
from finetune_testbed.realnode import LABEL as NODE_LABEL
from finetune_testbed.realnode import OPERATOR_IMAGE, TAINT_KEY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

SERVICE = "ranks"
RANK_LABELS = {"finetune.dev/dns-test": "ranks"}

# Polls getaddrinfo (the DNS record appears once the EndpointSlice lists rank-0), then prints
# what it resolved and the resolv.conf the kubelet wrote.
RESOLVE = """
import json, socket, sys, time
deadline, last = time.monotonic() + 60, None
while time.monotonic() < deadline:
    try:
        infos = socket.getaddrinfo(sys.argv[1], None, socket.AF_INET, socket.SOCK_STREAM)
        break
    except OSError as exc:
        last = str(exc)
        time.sleep(0.5)
else:
    sys.exit(f"{sys.argv[1]} did not resolve in 60 s: {last}")
print(json.dumps({"addrs": sorted({i[4][0] for i in infos}),
                  "resolv": open("/etc/resolv.conf").read()}))
"""


def pod(name: str, script: str, *args: str, labels: dict | None = None, **spec) -> dict:
    """A pod on the real node running `python -c script args...` in the operator image."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "nodeSelector": {NODE_LABEL: "true"},
                     "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}],
                     "containers": [{"name": "main", "image": OPERATOR_IMAGE,
                                     "imagePullPolicy": "Never",
                                     "command": ["python", "-c", script, *args]}],
                     **spec}}


def test_pod_resolves_rank_0_by_hostname_and_subdomain(cluster, real_node, namespace):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE},
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": RANK_LABELS, "ports": [{"name": "rdzv", "port": 29500}]}}
    rank0 = pod("rank-0", "import time; time.sleep(300)", labels=RANK_LABELS,
                hostname="rank-0", subdomain=SERVICE)
    resolver = pod("resolver", RESOLVE, f"rank-0.{SERVICE}")
    cluster.apply([service, rank0, resolver], "-n", namespace)

    def finished(name):
        phase = cluster.get_json("pod", name, "-n", namespace)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None
    phase = wait_for(lambda: finished("resolver"), 120, "pod resolver finished", interval=1)
    out = cluster.kubectl("logs", "-n", namespace, "resolver").stdout
    assert phase == "Succeeded", out
    answer = json.loads(out.strip().splitlines()[-1])

    rank0_ip = cluster.get_json("pod", "rank-0", "-n", namespace)["status"]["podIP"]
    assert answer["addrs"] == [rank0_ip], answer
    resolv = answer["resolv"].split("\n")
    assert f"nameserver {real_node.ip}" in resolv, answer["resolv"]
    assert any(line.split()[:2] == ["search", f"{namespace}.svc.cluster.local"]
               for line in resolv if line.strip()), answer["resolv"]
