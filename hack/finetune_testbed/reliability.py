"""Building blocks for the reliability tests and the chaos run (tests/reliability/,
`python -m finetune_testbed.chaos`): a private control plane with the CRD, namespaces,
the Eviction API, an operator that is restarted once after an injected crash, raw etcd
access for corrupting objects past validation, and a job's settled state.

Nothing here knows the operator's internals: it drives the API and reads the API."""
from __future__ import annotations

import base64
import json
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from .cluster import REPO, ClusterConfig, LocalCluster
from .jobs import Jobs
from .kuberaw import Kube
from .operator_proc import FAST_ARGS, OperatorProcess
from .procs import wait_for

CRD = REPO / "crds" / "finetune.dev_trainingjobs.yaml"
POD_DONE = ("Succeeded", "Failed")


def apply_crd(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.wait_established("trainingjobs.finetune.dev")


@contextmanager
def private_cluster(gpu_nodes: int = 2, **config):
    """A control plane of our own (separate etcd, API server, ports and workdir).

    Reliability tests kill, pause and restart operators and the control plane; on a
    cluster of their own no other operator (the integration suite's session operator,
    which watches all namespaces) can act on their objects, and their faults cannot leak
    into other tests."""
    cluster = LocalCluster(config=ClusterConfig(gpu_nodes=gpu_nodes, **config))
    cluster.start()
    try:
        apply_crd(cluster)
        yield cluster
    finally:
        cluster.cleanup()


def create_namespace(cluster: LocalCluster, name: str, timeout: float = 60) -> str:
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager made the default ServiceAccount. Right
    # after an API server restart its informers may still be in back-off: then make it here
    # (these tests are about the operator, not the controller-manager's reconnect delay).
    def has_sa():
        return cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0
    try:
        wait_for(has_sa, min(timeout, 15), f"default ServiceAccount in {name}")
    except TimeoutError:
        cluster.kubectl("create", "serviceaccount", "default", "-n", name, check=False)
        wait_for(has_sa, timeout, f"default ServiceAccount in {name}")
    return name


def evict(cluster: LocalCluster, namespace: str, pod: str, check: bool = True):
    """Evict a pod through the Eviction API (what `kubectl drain` does per pod)."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace}}
    return cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction",
                           "-f", "-", input=json.dumps(body), check=check)


class ApiJobs(Jobs):
    """finetune_testbed.jobs.Jobs with reads straight from the API (no kubectl process per
    poll: tight wait loops stay cheap on a small machine)."""

    def __init__(self, cluster: LocalCluster, namespace: str):
        super().__init__(cluster, namespace)
        self.kube = Kube(cluster.kubeconfig)

    def get(self, name: str) -> dict | None:
        return self.kube.get_or_none(f"/apis/finetune.dev/v1alpha1/namespaces/{self.ns}/trainingjobs/{name}")

    def pods(self, name: str) -> list[dict]:
        return self.kube.get(f"/api/v1/namespaces/{self.ns}/pods",
                             query={"labelSelector": f"finetune.dev/job-name={name}"})["items"]

    def events(self, name: str) -> list[dict]:
        return self.kube.get(f"/api/v1/namespaces/{self.ns}/events",
                             query={"fieldSelector": f"involvedObject.name={name}"})["items"]

    def close(self) -> None:
        self.kube.close()


def read_write_log(path: Path) -> list[dict]:
    """The JSON lines FINETUNE_WRITE_LOG made the operator write (one per mutating call)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def write_kind(entry: dict) -> str:
    """'PUT trainingjobs/status', 'POST pods', 'DELETE pods', 'POST events' ..."""
    parts = [p for p in entry["path"].split("?")[0].split("/") if p]
    rest = parts[parts.index("namespaces") + 2:] if "namespaces" in parts else parts[-1:]
    resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
    return f"{entry['method']} {resource}"


class CrashingOperator:
    """An operator that may be told to SIGKILL itself after its n-th write
    (FINETUNE_CRASH_AFTER_WRITES) and is then restarted once, without the crash setting,
    the way kubelet restarts a crashed container. Every process logs its writes to its
    own file. `check()` is called from wait loops: it restarts a crashed operator and
    raises if an operator died any other way (or a second time)."""

    def __init__(self, cluster: LocalCluster, log_dir: Path, tag: str, *,
                 crash_after: int | None = None, namespaces: tuple[str, ...] = (),
                 extra_args: list[str] | None = None):
        self.cluster, self.log_dir, self.tag = cluster, Path(log_dir), tag
        self.crash_after = crash_after
        self.args = list(FAST_ARGS) + [a for ns in namespaces for a in ("--namespace", ns)] \
            + list(extra_args or [])
        self.procs: list[OperatorProcess] = []
        self.crash_rc: int | None = None

    def write_log(self, index: int) -> Path:
        return self.log_dir / f"{self.tag}-writes-{index}.jsonl"

    def _spawn(self, crash: bool) -> None:
        index = len(self.procs) + 1
        env = {"FINETUNE_WRITE_LOG": str(self.write_log(index))}
        if crash and self.crash_after is not None:
            env["FINETUNE_CRASH_AFTER_WRITES"] = str(self.crash_after)
        op = OperatorProcess(self.cluster.kubeconfig, self.log_dir, args=self.args,
                             name=f"{self.tag}-op{index}", env=env)
        op.start(wait_ready=False)  # it may crash before it is ready
        self.procs.append(op)

    def start(self) -> CrashingOperator:
        self._spawn(crash=True)
        return self

    @property
    def current(self) -> OperatorProcess:
        return self.procs[-1]

    @property
    def crashed(self) -> bool:
        return self.crash_rc is not None

    def check(self) -> None:
        op = self.current
        if op.running():
            return
        rc = op.proc.popen.returncode if op.proc.popen is not None else None
        if self.crash_after is not None and len(self.procs) == 1 and rc == -9:
            self.crash_rc = rc
            self._spawn(crash=False)
            return
        raise AssertionError(f"operator {op.proc.name} exited with {rc} (not an injected crash); "
                             f"log tail:\n{op.log_tail(40)}")

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.25):
        """wait_for that also restarts the operator after its injected crash."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self.check()
            try:
                value = predicate()
                if value:
                    return value
            except AssertionError:
                raise
            except Exception as exc:
                last_error = exc
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                             + (f" (last error: {last_error})" if last_error else "")
                             + f"; operator log tail:\n{self.current.log_tail(30)}")

    def writes(self) -> list[list[dict]]:
        return [read_write_log(self.write_log(i + 1)) for i in range(len(self.procs))]

    def stop(self) -> None:
        for op in self.procs:
            op.stop()


def settled_job_state(job: dict | None, pods: list[dict]) -> dict:
    """What a finished scenario is compared on."""
    status = (job or {}).get("status") or {}
    return {
        "phase": status.get("phase"), "reason": status.get("reason"),
        "attempt": status.get("attempt"), "failures": status.get("failures"),
        "resumes": status.get("resumes"), "restarts": status.get("restarts"),
        "pods": sorted(p["metadata"]["name"] for p in pods),
    }


def pods_settled(pods: list[dict]) -> bool:
    """No pod still running or being deleted."""
    return all(p["status"].get("phase") in POD_DONE and not p["metadata"].get("deletionTimestamp")
               for p in pods)


class EtcdRaw:
    """Reads and writes objects in etcd directly (its JSON gRPC gateway), bypassing the API
    server's validation: the way to store what the schema would refuse (an unknown phase
    written by a newer operator version, a bit flip, a bad restore)."""

    def __init__(self, cluster: LocalCluster):
        self.url = f"http://127.0.0.1:{cluster.ports['etcd']}"

    @staticmethod
    def _b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    @staticmethod
    def job_key(namespace: str, name: str) -> str:
        return f"/registry/finetune.dev/trainingjobs/{namespace}/{name}"

    def get(self, key: str) -> dict | None:
        r = requests.post(f"{self.url}/v3/kv/range", json={"key": self._b64(key.encode())},
                          timeout=5)
        r.raise_for_status()
        kvs = r.json().get("kvs")
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def put(self, key: str, obj: dict) -> None:
        r = requests.post(f"{self.url}/v3/kv/put",
                          json={"key": self._b64(key.encode()),
                                "value": self._b64(json.dumps(obj).encode())}, timeout=5)
        r.raise_for_status()

    def mutate_job(self, namespace: str, name: str, fn) -> dict:
        key = self.job_key(namespace, name)
        obj = self.get(key)
        if obj is None:
            raise KeyError(key)
        fn(obj)
        self.put(key, obj)
        return obj


def hard_control_plane_outage(cluster: LocalCluster, down_seconds: float) -> None:
    """SIGKILL the API server and etcd (a crash, not a graceful shutdown), stay down, start both."""
    cluster.procs["kube-apiserver"].kill()
    cluster.procs["etcd"].kill()
    time.sleep(down_seconds)
    cluster.start_etcd()
    cluster.start_apiserver()
