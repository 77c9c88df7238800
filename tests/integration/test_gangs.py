"""Multi-node jobs (spec.workers > 1) on the real control plane with kwok GPU nodes: one gang
of pods per attempt, judged and replaced all-or-nothing (docs/CONTRACTS.md, issue 15).

How a test makes one rank misbehave, since the sim.finetune.dev/* annotations come from the
template and so are the same on every rank: the Eviction API on that rank's pod (what a drain
or the taint manager does), an annotation patch on that one running pod (kwok re-evaluates its
stages on the pod's MODIFIED event: a one-off fault of that attempt only), or
`sim.finetune.dev/outcome-rank` in the template (that rank meets the outcome on every attempt;
the other ranks keep running)."""
from __future__ import annotations

import threading
import time

import pytest

from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.kuberaw import MERGE, Kube
from finetune_testbed.procs import wait_for
from finetune_testbed.reliability import ApiJobs, evict

pytestmark = pytest.mark.cluster
POD_DONE = ("Succeeded", "Failed")


class GangPodLog(threading.Thread):
    """Every pod event of a namespace from one watch, checking on each one that no two
    attempts of a job have live pods at once (a snapshot taken later would miss it)."""

    def __init__(self, cluster, namespace):
        super().__init__(daemon=True)
        self.kube = Kube(cluster.kubeconfig)
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.pods: dict[str, dict] = {}
        self.overlaps: list[list[str]] = []
        self.stopping = threading.Event()
        self.started_watch = threading.Event()

    def run(self) -> None:
        rv = self.kube.get(self.path)["metadata"]["resourceVersion"]
        self.started_watch.set()
        while not self.stopping.is_set():
            for ev in self.kube.watch(self.path, {"resourceVersion": rv, "timeoutSeconds": 5,
                                                  "allowWatchBookmarks": "true"}, timeout=10):
                obj = ev.get("object") or {}
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if ev.get("type") == "BOOKMARK":
                    continue
                if ev.get("type") == "DELETED":
                    self.pods.pop(obj["metadata"]["name"], None)
                else:
                    self.pods[obj["metadata"]["name"]] = obj
                self._check()
                if self.stopping.is_set():
                    return

    def _check(self) -> None:
        live = [p for p in self.pods.values() if (p.get("status") or {}).get("phase") not in POD_DONE]
        attempts = {p["metadata"]["labels"]["finetune.dev/attempt"] for p in live}
        if len(attempts) > 1:
            self.overlaps.append(sorted(p["metadata"]["name"] for p in live))

    def __enter__(self) -> GangPodLog:
        self.start()
        self.started_watch.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # the daemon thread ends with its stream; the test need not wait


@pytest.fixture
def gangs(cluster, namespace, live_operator):
    """Jobs read straight from the API; every job deleted and its pods gone afterwards, so a
    later test finds the kwok nodes' GPUs free."""
    jobs = ApiJobs(cluster, namespace)
    yield jobs
    # The jobs first (no finalizers: gone at once, so the operator makes no new pods), then
    # their pods: the garbage collector notices a fresh CRD's owners only at its next
    # discovery resync, tens of seconds away.
    cluster.kubectl("delete", "tj", "--all", "-n", namespace)
    cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false")
    kube = jobs.kube
    wait_for(lambda: not kube.get(f"/api/v1/namespaces/{namespace}/pods")["items"], 90,
             f"pods of {namespace} gone")
    jobs.close()


def gang_job(name: str, workers: int = 2, gpus: int = 1, **spec) -> dict:
    spec.setdefault("template", sim(outcome="run"))
    return job_manifest(name, workers=workers, resources={"gpus": gpus}, **spec)


def by_rank(pods: list[dict], attempt: int) -> dict[int, dict]:
    return {int(p["metadata"]["labels"]["finetune.dev/rank"]): p for p in pods
            if p["metadata"]["labels"]["finetune.dev/attempt"] == str(attempt)}


def gang_running(attempt: int, workers: int = 2):
    def check(s: dict) -> bool:
        ranks = s.get("ranks") or {}
        return s.get("phase") == "Running" and s.get("attempt") == attempt and \
            ranks.get("ready") == workers and ranks.get("total") == workers
    return check


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def printed_columns(cluster, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get tj` as the user sees it: header -> value (empty values print <none>)."""
    header, row = cluster.kubectl("get", "tj", name, "-n", namespace).stdout.splitlines()[:2]
    return dict(zip(header.split(), row.split(), strict=False))


def kwok_capacity(cluster) -> tuple[int, int]:
    """(kwok GPU nodes, GPUs per node) of the session cluster."""
    return cluster.config.gpu_nodes, cluster.config.gpus_per_node


def test_two_worker_gang_runs_with_service_and_rendezvous_env(gangs, cluster, namespace, core):
    gangs.apply(gang_job("pair"))
    status = gangs.wait("pair", gang_running(1), 60, "pair Running with 2/2 ranks")
    assert status["ranks"]["display"] == "2/2"
    assert status["failures"] == 0 and status["resumes"] == 0
    columns = printed_columns(cluster, namespace, "pair")
    assert columns["PHASE"] == "Running" and columns["READY"] == "2/2", columns

    ranks = by_rank(gangs.pods("pair"), 1)
    assert sorted(p["metadata"]["name"] for p in ranks.values()) == ["pair-1-0", "pair-1-1"]
    for rank, pod in ranks.items():
        assert pod["status"]["phase"] == "Running"
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["finetune.dev/pod-group"] == "pair-1"
        assert annotations["finetune.dev/gang-size"] == "2"
        assert pod["spec"]["hostname"] == f"rank-{rank}" and pod["spec"]["subdomain"] == "pair"
        env = env_of(pod)
        assert env["PET_NNODES"] == "2" and env["PET_NODE_RANK"] == str(rank)
        assert env["PET_MASTER_ADDR"] == "rank-0.pair"
        shm = [v for v in pod["spec"]["volumes"] if (v.get("emptyDir") or {}).get("medium") == "Memory"]
        assert shm, pod["spec"]["volumes"]

    svc = core.read_namespaced_service("pair", namespace)
    assert svc.spec.cluster_ip == "None"
    assert svc.spec.selector["finetune.dev/job-name"] == "pair"
    assert svc.metadata.owner_references[0].kind == "TrainingJob"


def test_one_rank_evicted_replaces_the_whole_gang_as_one_resume(gangs, cluster, namespace):
    with GangPodLog(cluster, namespace) as log:
        gangs.apply(gang_job("evicted"))
        gangs.wait("evicted", gang_running(1), 60, "attempt 1 Running 2/2")
        evict(cluster, namespace, "evicted-1-1")
        status = gangs.wait("evicted", gang_running(2), 60, "attempt 2 Running 2/2")
    assert status["resumes"] == 1 and status["failures"] == 0 and status["restarts"] == 1
    assert status["lastInterruption"]["pod"] == "evicted-1-1"
    assert status["lastInterruption"]["attempt"] == 1
    pods = gangs.pods("evicted")
    assert all(p["status"]["phase"] in POD_DONE for p in by_rank(pods, 1).values())
    assert sorted(by_rank(pods, 2)) == [0, 1]
    assert all(p["status"]["phase"] == "Running" for p in by_rank(pods, 2).values())
    assert log.overlaps == [], f"two attempts live at once: {log.overlaps[:3]}"
    assert len(log.pods) >= 2 and not [n for n in log.pods if n.startswith("evicted-3")]


def test_one_rank_exit_1_counts_one_failure_for_the_gang(gangs, cluster, namespace):
    with GangPodLog(cluster, namespace) as log:
        gangs.apply(gang_job("crash"))
        gangs.wait("crash", gang_running(1), 60, "attempt 1 Running 2/2")
        # This one pod's trainer exits 1 (kwok acts on the pod's MODIFIED event).
        gangs.kube.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/crash-1-1", content_type=MERGE,
                           body={"metadata": {"annotations": {"sim.finetune.dev/outcome": "fail",
                                                              "sim.finetune.dev/run-for": "100ms",
                                                              "sim.finetune.dev/exit-code": "1"}}})
        status = gangs.wait("crash", gang_running(2), 60, "attempt 2 Running 2/2")
        # Rank 0 of attempt 1 was stopped by the operator (exit 143) after rank 1 failed: that
        # end belongs to the same attempt and must not be counted again.
        old = by_rank(gangs.pods("crash"), 1)
        assert all(p["status"]["phase"] in POD_DONE for p in old.values()), old
        status = gangs.status("crash")
    assert status["failures"] == 1 and status["resumes"] == 0 and status["restarts"] == 1
    last = status["lastInterruption"]
    assert last["pod"] == "crash-1-1" and last["exitCode"] == 1 and last["attempt"] == 1
    assert log.overlaps == [], f"two attempts live at once: {log.overlaps[:3]}"
    # The job's own Warnings: the Service shares its name, and the endpoints controller warns
    # about kwok's loopback pod IPs.
    warnings = [e for e in gangs.events("crash")
                if e["type"] == "Warning" and e["involvedObject"]["kind"] == "TrainingJob"]
    assert sum(e.get("count") or 1 for e in warnings) == 1, [e["message"] for e in warnings]


def test_a_rank_failing_on_every_attempt_counts_once_per_attempt(gangs):
    gangs.apply(gang_job("flaky", runPolicy={"backoffLimit": 1},
                         template=sim(outcome="fail", outcome_rank=1, run_for="300ms", exit_code=3)))
    status = gangs.wait_phase("flaky", "Failed", 60)
    assert status["reason"] == "BackoffLimitExceeded"
    assert status["attempt"] == 2 and status["failures"] == 2 and status["resumes"] == 0
    assert status["lastInterruption"]["pod"] == "flaky-2-1"
    assert status["lastInterruption"]["exitCode"] == 3
    wait_for(lambda: not gangs.live_pods("flaky"), 30, "flaky's pods stopped")
    pods = gangs.pods("flaky")
    # Rank 0 never failed by itself: the operator stopped it (SIGTERM) each time.
    for attempt in (1, 2):
        rank0 = by_rank(pods, attempt).get(0)
        if rank0 is not None:  # a pod that ended may already be gone
            code = rank0["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
            assert code == 143, rank0["status"]


def test_gang_larger_than_the_cluster_stays_queued_with_the_schedulers_reason(gangs, cluster, namespace):
    nodes, per_node = kwok_capacity(cluster)
    gangs.apply(gang_job("huge", workers=nodes + 1, gpus=per_node))
    status = gangs.wait("huge", lambda s: s.get("phase") == "Queued" and "nvidia.com/gpu" in (s.get("message") or ""),
                        60, "Queued with the scheduler's message")
    assert status["reason"] == "Unschedulable"
    assert status["attempt"] == 1 and status["failures"] == 0 and status["resumes"] == 0
    assert not status.get("lastInterruption")
    pods = by_rank(gangs.pods("huge"), 1)
    assert sorted(pods) == list(range(nodes + 1))
    running = sum(1 for p in pods.values() if p["status"].get("phase") == "Running")
    # READY tells the truth: placed ranks run, the gang as a whole does not.
    status = gangs.wait("huge", lambda s: (s.get("ranks") or {}).get("ready") == running, 30,
                        f"ranks.ready == {running}")
    assert status["phase"] == "Queued"
    assert status["ranks"]["display"] == f"{running}/{nodes + 1}"
    assert printed_columns(cluster, namespace, "huge")["READY"] == f"{running}/{nodes + 1}"


def test_partly_placed_gang_is_released_past_start_timeout_and_retried(gangs, cluster, namespace):
    nodes, per_node = kwok_capacity(cluster)
    with GangPodLog(cluster, namespace) as log:
        t0 = time.monotonic()
        gangs.apply(gang_job("partial", workers=nodes + 1, gpus=per_node,
                             runPolicy={"startTimeoutSeconds": 2, "maxResumes": 100}))
        status = gangs.wait("partial", lambda s: s.get("attempt", 0) >= 2, 60, "a second attempt")
        elapsed = time.monotonic() - t0
        # the retry's pods exist (the released ones are gone or ending)
        wait_for(lambda: by_rank(gangs.pods("partial"), status["attempt"]), 30, "the retry's pods")
    last = status["lastInterruption"]
    assert last["reason"] == "GangNotScheduled" and last["attempt"] == 1, last
    assert "startTimeoutSeconds" in last["message"] and f"of {nodes + 1} pods were placed" in last["message"]
    assert status["failures"] == 0 and status["resumes"] >= 1
    assert elapsed >= 2, "released before runPolicy.startTimeoutSeconds"
    assert log.overlaps == [], f"two attempts live at once: {log.overlaps[:3]}"
