"""The local node agent (finetune_testbed.localnode) behaves like a kubelet for the pods
bound to its node: real processes, real status, SIGTERM on eviction, PVC directories that
outlive a pod, and no process outliving the agent. Every test asserts observed state."""
from __future__ import annotations

import json
import textwrap
import time

import psutil
import pytest
import requests

from finetune_testbed.localnode import LocalNode
from finetune_testbed.procs import wait_for

pytestmark = pytest.mark.cluster

NODE = "local-0"
GPUS = 2


@pytest.fixture(scope="module")
def local_node(cluster, tmp_path_factory):
    node = LocalNode(cluster.kubeconfig, node_name=NODE, gpus=GPUS,
                     workdir=tmp_path_factory.mktemp("localnode"), shutdown_grace=10)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        node.delete_node()   # the Node, its Lease and the PVs are cluster-scoped


@pytest.fixture
def agent(local_node):
    """The module's agent, started again if an earlier test stopped it."""
    if not local_node.running():
        local_node.start()
    return local_node


def pod(name: str, code: str, *, claim: str | None = None, mount: str = "/checkpoints",
        env: dict | None = None, grace: int | None = None, policy: str | None = None,
        labels: dict | None = None) -> dict:
    container = {"name": "trainer", "image": "example.invalid/trainer:dev",
                 "command": ["python", "-c", textwrap.dedent(code)],
                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    spec = {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": NODE},
            "containers": [container]}
    if claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": mount}]
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if policy:
        container["terminationMessagePolicy"] = policy
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def get_pod(agent: LocalNode, ns: str, name: str) -> dict | None:
    return agent.kube.get_or_none(f"/api/v1/namespaces/{ns}/pods/{name}")


def wait_phase(agent, ns, name, phases, timeout=60) -> dict:
    def reached():
        p = get_pod(agent, ns, name)
        return p if p and p.get("status", {}).get("phase") in phases else None
    return wait_for(reached, timeout, f"pod {name} phase in {phases}")


def terminated(p: dict) -> dict:
    return p["status"]["containerStatuses"][0]["state"]["terminated"]


def conditions(p: dict) -> dict:
    return {c["type"]: c for c in p.get("status", {}).get("conditions") or []}


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def events_until_deleted(agent, ns: str, name: str, rv: str, timeout: int = 60) -> list[dict]:
    """Every watch event of one pod from resourceVersion `rv` until it is deleted."""
    events = []
    for ev in agent.kube.watch(f"/api/v1/namespaces/{ns}/pods",
                               {"fieldSelector": f"metadata.name={name}",
                                "resourceVersion": rv, "timeoutSeconds": timeout},
                               timeout=timeout + 10):
        events.append(ev)
        if ev["type"] == "DELETED":
            break
    assert events and events[-1]["type"] == "DELETED", [e["type"] for e in events]
    return events


# A long-running trainer stand-in: checkpoints (a marker file) on SIGTERM and exits 143.
TRAINER = """
    import os, signal, subprocess, sys, time
    ckpt = os.environ["CKPT"]
    child = subprocess.Popen(["sleep", "300"])       # a grandchild of the agent
    def on_term(*_):
        with open(os.path.join(ckpt, "marker"), "w") as f:
            f.write("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    with open(os.path.join(ckpt, "pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    while True:
        time.sleep(0.5)
"""


def start_trainer(agent, cluster, ns, name, claim) -> tuple[dict, list[int]]:
    pvc = agent.create_pvc(ns, claim)
    cluster.apply(pod(name, TRAINER, claim=claim, env={"CKPT": "/checkpoints"}, grace=20),
                  "-n", ns)
    running = wait_phase(agent, ns, name, {"Running"})
    pids = wait_for(lambda: (pvc / "pids").read_text().split(), 30, f"{name} writes its pids")
    return running, [int(p) for p in pids]


# ---------------------------------------------------------------------------------------
def test_node_is_ready_with_gpus_and_heartbeat(cluster, agent):
    node = cluster.get_json("node", NODE)
    assert conditions(node)["Ready"]["status"] == "True"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(GPUS)
    labels = node["metadata"]["labels"]
    assert labels["finetune.dev/local-node"] == "true"
    assert labels["kubernetes.io/hostname"] == NODE
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})

    lease = cluster.get_json("lease", NODE, "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == NODE
    first = lease["spec"]["renewTime"]
    wait_for(lambda: cluster.get_json("lease", NODE, "-n", "kube-node-lease")
             ["spec"]["renewTime"] != first, 25, "the node Lease to be renewed")


def test_pod_runs_to_success_with_termination_message(cluster, agent, namespace):
    code = """
        import json, os
        print("hello from the local node", flush=True)
        with open(os.environ["FT_TERMINATION_LOG"], "w") as f:
            json.dump({"ip": os.environ["FT_METRICS_ADDR"], "pod": os.environ["POD_NAME"],
                       "ns": os.environ["POD_NAMESPACE"], "out": os.environ["FT_OUTPUT_DIR"],
                       "ckpt": os.environ["CKPT"]}, f)
    """
    manifest = pod("hello", code, env={"CKPT": "/checkpoints/run"})
    c = manifest["spec"]["containers"][0]
    c["env"] += [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "POD_NAMESPACE",
                  "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    c["volumeMounts"] = [{"name": "scratch", "mountPath": "/checkpoints"}]
    manifest["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    cluster.apply(manifest, "-n", namespace)

    p = wait_phase(agent, namespace, "hello", {"Succeeded", "Failed"})
    assert p["status"]["phase"] == "Succeeded"
    term = terminated(p)
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["startedAt"] and term["finishedAt"]
    msg = json.loads(term["message"])
    assert msg["pod"] == "hello" and msg["ns"] == namespace
    assert msg["ip"] == p["status"]["podIP"] and msg["ip"].startswith("127.1.")
    assert p["status"]["hostIP"] == "127.0.0.1"
    # mountPath prefixes are rewritten to the emptyDir's local directory
    assert not msg["ckpt"].startswith("/checkpoints") and msg["ckpt"].endswith("/run")
    assert msg["out"] == msg["ckpt"][:-len("/run")] + "/output"
    assert conditions(p)["Ready"]["status"] == "False"
    assert p["status"]["startTime"]
    assert "hello from the local node" in agent.log_path_for(namespace, "hello").read_text()


def test_nonzero_exit_fails_with_exit_code_and_log_tail(cluster, agent, namespace):
    code = """
        import sys
        print("boom: the dataset is missing", flush=True)
        sys.exit(3)
    """
    cluster.apply(pod("boom", code, policy="FallbackToLogsOnError"), "-n", namespace)
    p = wait_phase(agent, namespace, "boom", {"Succeeded", "Failed"})
    assert p["status"]["phase"] == "Failed"
    term = terminated(p)
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert "boom: the dataset is missing" in term["message"]


def test_pod_it_cannot_run_waits_with_config_error(cluster, agent, namespace):
    manifest = pod("no-command", "pass")
    del manifest["spec"]["containers"][0]["command"]   # would need the image's entrypoint
    cluster.apply(manifest, "-n", namespace)

    def waiting():
        p = get_pod(agent, namespace, "no-command")
        statuses = p.get("status", {}).get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("waiting")
    state = wait_for(waiting, 30, "the container to be reported Waiting")
    assert state["reason"] == "CreateContainerConfigError"
    assert "no command" in state["message"]
    assert get_pod(agent, namespace, "no-command")["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", "no-command", "-n", namespace, "--wait=false")
    wait_for(lambda: get_pod(agent, namespace, "no-command") is None, 30,
             "the pending pod to be deleted")


def test_pods_get_distinct_ips_and_serve_on_the_same_port(cluster, agent, namespace):
    code = """
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = os.environ["HOSTNAME"].encode()
                self.send_response(200); self.end_headers(); self.wfile.write(body)
        http.server.HTTPServer((os.environ["FT_METRICS_ADDR"], 9400), H).serve_forever()
    """
    for name in ("metrics-a", "metrics-b"):
        cluster.apply(pod(name, code), "-n", namespace)
    ips = {}
    for name in ("metrics-a", "metrics-b"):
        ip = wait_phase(agent, namespace, name, {"Running"})["status"]["podIP"]
        ips[name] = ip
        body = wait_for(lambda: requests.get(f"http://{ip}:9400/metrics", timeout=2).text,
                        30, f"{name} serving on {ip}:9400")
        assert body == name
    assert len(set(ips.values())) == 2
    # A plain delete: SIGTERM (the default handler ends the process: 128+15), then gone.
    cluster.kubectl("delete", "pod", "metrics-a", "metrics-b", "-n", namespace, "--wait=false")
    wait_for(lambda: all(get_pod(agent, namespace, n) is None for n in ips), 60,
             "deleted pods to disappear")


def test_eviction_sends_sigterm_then_pod_disappears(cluster, agent, namespace, core):
    from kubernetes import client
    running, pids = start_trainer(agent, cluster, namespace, "evictee", "ckpt")
    rv = running["metadata"]["resourceVersion"]

    core.create_namespaced_pod_eviction("evictee", namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name="evictee", namespace=namespace)))

    events = events_until_deleted(agent, namespace, "evictee", rv)
    disrupted = [e for e in events
                 if conditions(e["object"]).get("DisruptionTarget", {}).get("status") == "True"]
    assert disrupted, "the pod never carried DisruptionTarget"
    assert conditions(disrupted[0]["object"])["DisruptionTarget"]["reason"] == \
        "EvictionByEvictionAPI"
    final = events[-1]["object"]
    assert final["status"]["phase"] == "Failed"
    assert terminated(final)["exitCode"] == 143
    assert (agent.pvc_dir(namespace, "ckpt") / "marker").read_text() == "SIGTERM"
    wait_for(lambda: all(process_gone(p) for p in pids), 10, "the pod's processes to end")
    assert get_pod(agent, namespace, "evictee") is None


def test_sigkill_after_the_grace_period(cluster, agent, namespace):
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        while True:
            time.sleep(0.5)
    """
    cluster.apply(pod("stubborn", code, grace=2), "-n", namespace)
    running = wait_phase(agent, namespace, "stubborn", {"Running"})
    wait_for(lambda: "ignoring SIGTERM" in
             agent.log_path_for(namespace, "stubborn").read_text(), 30, "the handler installed")
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    events = events_until_deleted(agent, namespace, "stubborn",
                                  running["metadata"]["resourceVersion"])
    assert time.monotonic() - t0 >= 1.5          # it was given its grace period ...
    final = events[-1]["object"]
    assert final["status"]["phase"] == "Failed"
    assert terminated(final)["exitCode"] == 137  # ... then SIGKILL (128 + 9)


def test_pvc_files_survive_the_pod_for_the_next_one(cluster, agent, namespace):
    local = agent.create_pvc(namespace, "shared")
    writer = """
        import os
        with open(os.environ["DATA"] + "/hello.txt", "w") as f:
            f.write("written by " + os.environ["HOSTNAME"])
    """
    cluster.apply(pod("writer", writer, claim="shared", mount="/data",
                      env={"DATA": "/data"}), "-n", namespace)
    assert wait_phase(agent, namespace, "writer", {"Succeeded", "Failed"})["status"]["phase"] \
        == "Succeeded"
    cluster.kubectl("delete", "pod", "writer", "-n", namespace)

    reader = """
        import os, shutil
        shutil.copy(os.environ["DATA"] + "/hello.txt", os.environ["FT_TERMINATION_LOG"])
    """
    cluster.apply(pod("reader", reader, claim="shared", mount="/data",
                      env={"DATA": "/data"}), "-n", namespace)
    p = wait_phase(agent, namespace, "reader", {"Succeeded", "Failed"})
    assert p["status"]["phase"] == "Succeeded"
    assert terminated(p)["message"] == "written by writer"
    assert (local / "hello.txt").read_text() == "written by writer"


def test_agent_stop_is_a_graceful_node_shutdown(cluster, agent, namespace):
    _, pids = start_trainer(agent, cluster, namespace, "shutdown", "ckpt")
    agent.stop()
    assert all(process_gone(p) for p in pids)
    p = get_pod(agent, namespace, "shutdown")
    assert p["status"]["phase"] == "Failed"
    assert p["status"]["reason"] == "Terminated"
    assert terminated(p)["exitCode"] == 143
    assert conditions(p)["DisruptionTarget"]["reason"] == "TerminationByKubelet"
    assert (agent.pvc_dir(namespace, "ckpt") / "marker").read_text() == "SIGTERM"


def test_agent_crash_kills_processes_and_restart_marks_pod_lost(cluster, agent, namespace):
    _, pids = start_trainer(agent, cluster, namespace, "orphan", "ckpt")
    agent.kill()   # SIGKILL: no chance to clean up; the children must die anyway
    wait_for(lambda: all(process_gone(p) for p in pids), 10,
             "the pod's process and its child to die with the agent")
    assert get_pod(agent, namespace, "orphan")["status"]["phase"] == "Running"

    agent.start()
    p = wait_phase(agent, namespace, "orphan", {"Failed"}, timeout=30)
    term = terminated(p)
    assert term["exitCode"] == 137 and term["reason"] == "ContainerStatusUnknown"
    assert term["message"] == "the local node agent restarted"
    assert "DisruptionTarget" not in conditions(p)
