"""Two operator replicas with Lease leader election against the same control plane, as the
Deployment runs them (deploy/README.md, "Failover"): only the Lease holder acts, the standby
takes over when the leader is SIGKILLed (the Lease expires: <= 15 s + 2 s retry) or
SIGTERMed (the Lease is released: about one 2 s retry), and no attempt's pod is ever created
twice. The Lease lives in the test's namespace, so nothing else in the session competes for
it; the session operator (admin identity, no election) is frozen meanwhile."""
from __future__ import annotations

import re
import signal
import time

import pytest
import requests

from finetune_testbed.identities import lease, lease_holder, metric_samples, metric_value
from finetune_testbed.jobs import Jobs, job_manifest, sim
from finetune_testbed.operator_proc import OperatorProcess, election_replica, leader_gauge
from finetune_testbed.procs import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LEASE = "finetune-operator-leader"
LEASE_DURATION, RETRY = 15.0, 2.0  # config.py / leader.py defaults, the Deployment's timings
# CPU headroom on a shared 2-core machine: start-up LIST, kopf's watches, the job's pod.
SLACK = 8.0



def replica(cluster, namespace: str, identity: str) -> OperatorProcess:
    return election_replica(cluster, namespace, identity, LEASE)


def wait_standby(op: OperatorProcess, timeout: float = 30) -> None:
    """Until the replica has tried for the Lease and found it held (its log says so)."""
    def standing_by():
        return re.search(r"standby: lease \S+ is held by another replica",
                         op.proc.log_path.read_text(errors="replace"))
    wait_for(standing_by, timeout, f"{op.identity} standing by", procs=[op.proc])
    assert leader_gauge(op) == 0


def assert_standby_did_nothing(op: OperatorProcess) -> None:
    text = op.metrics_text()
    assert metric_value(text, "finetune_operator_leader") == 0
    assert op.ready(), "a standby must be Ready (readiness does not depend on leadership)"
    # State gauges are the leader's only; a standby made no pods, status or Events.
    assert metric_samples(text, "finetune_operator_jobs") == []
    writes = [(lbls, v) for lbls, v in metric_samples(text, "finetune_operator_api_requests_total")
              if lbls["verb"] in ("post", "put", "patch", "delete")
              and lbls["resource"] not in ("leases", "selfsubjectaccessreviews")]
    assert writes == [], f"the standby {op.identity} wrote: {writes}"


def assert_one_pod_per_attempt(jobs: Jobs, name: str) -> dict:
    status = jobs.status(name)
    pods = jobs.pods(name)
    names = sorted(p["metadata"]["name"] for p in pods)
    attempts = sorted(int(p["metadata"]["labels"]["finetune.dev/attempt"]) for p in pods)
    assert names == sorted(f"{name}-{i}" for i in range(1, status["attempt"] + 1)), (names, status)
    assert attempts == list(range(1, status["attempt"] + 1)), attempts
    return status


def test_standby_takes_over_after_sigkill_and_sigterm(cluster, namespace, session_operator_paused):
    jobs = Jobs(cluster, namespace)
    a, b = replica(cluster, namespace, "op-a"), replica(cluster, namespace, "op-b")
    a2 = None
    scraper = requests.Session()
    try:
        a.start()
        wait_for(lambda: leader_gauge(a) == 1, 30, "op-a leader", procs=[a.proc])
        b.start()
        wait_standby(b)
        assert lease_holder(cluster, namespace, LEASE) == "op-a"

        jobs.apply(job_manifest("before", template=sim(outcome="run")))
        jobs.wait_phase("before", "Running", 60)
        assert_standby_did_nothing(b)

        # ---- SIGKILL: nobody releases the Lease; the standby waits for it to expire --------
        renewed = lease(cluster, namespace, LEASE)["spec"]["renewTime"]
        t0 = time.monotonic()
        a.kill()
        jobs.apply(job_manifest("after-kill", template=sim(outcome="succeed", run_for="2s")))
        wait_for(lambda: leader_gauge(b) == 1, LEASE_DURATION + RETRY + SLACK,
                 "op-b to take the expired Lease", interval=0.1, procs=[b.proc])
        kill_leader_s = time.monotonic() - t0
        jobs.wait_phase("after-kill", "Running", 30)
        kill_running_s = time.monotonic() - t0
        assert lease_holder(cluster, namespace, LEASE) == "op-b"
        # Never before the Lease expired (renewed at most one retry before the kill).
        assert kill_leader_s >= LEASE_DURATION - RETRY - 1.0, \
            f"op-b took the Lease {kill_leader_s:.1f}s after the kill (last renewal {renewed})"
        assert kill_leader_s <= LEASE_DURATION + RETRY + SLACK

        # ---- SIGTERM: the leader releases the Lease; the standby takes it on its next try --
        a2 = replica(cluster, namespace, "op-a2").start()
        wait_standby(a2)
        jobs.wait_phase("after-kill", "Succeeded", 60)
        assert_standby_did_nothing(a2)
        transitions = lease(cluster, namespace, LEASE)["spec"].get("leaseTransitions", 0)
        # As in a cluster, Prometheus holds a kept-alive connection to the leader's metrics.
        scraper.get(b.metrics_url, timeout=5)
        t0 = time.monotonic()
        b.proc.signal(signal.SIGTERM)
        jobs.apply(job_manifest("after-term", template=sim(outcome="succeed", run_for="2s")))
        seen: dict[str, float] = {}

        def handed_over():
            if "exit" not in seen and not b.running():
                seen["exit"] = time.monotonic() - t0
            if "leader" not in seen and leader_gauge(a2) == 1:
                seen["leader"] = time.monotonic() - t0
            return len(seen) == 2
        wait_for(handed_over, LEASE_DURATION + RETRY + SLACK,
                 "op-b to exit and op-a2 to take the released Lease", interval=0.05,
                 procs=[a2.proc])
        term_exit_s, term_leader_s = seen["exit"], seen["leader"]
        jobs.wait_phase("after-term", "Running", 30)
        term_running_s = time.monotonic() - t0
        assert b.proc.popen.returncode == 0, b.log_tail(20)
        spec = lease(cluster, namespace, LEASE)["spec"]
        assert spec["holderIdentity"] == "op-a2" and spec["leaseTransitions"] == transitions + 1
        # Stopping kopf takes a fraction of a second (kopf waits 5 s for any task left over,
        # e.g. a kept-alive HTTP connection, if there is one).
        assert term_exit_s < 3.0, f"op-b took {term_exit_s:.1f}s to exit after SIGTERM"
        assert term_leader_s <= term_exit_s + RETRY + 1.5, \
            f"SIGTERM handover took {term_leader_s:.1f}s: was the Lease released?"
        assert term_leader_s < kill_leader_s
        jobs.wait_phase("after-term", "Succeeded", 60)

        print(f"\nfailover after SIGKILL: new leader in {kill_leader_s:.1f}s, job created after "
              f"the kill Running in {kill_running_s:.1f}s (lease {LEASE_DURATION:.0f}s + retry "
              f"{RETRY:.0f}s)\nfailover after SIGTERM: old leader exited in {term_exit_s:.1f}s, "
              f"new leader in {term_leader_s:.1f}s, job created after the signal Running in "
              f"{term_running_s:.1f}s")

        # No attempt's pod twice, none lost; the job that ran through both failovers was
        # adopted, not restarted.
        for name in ("before", "after-kill", "after-term"):
            assert_one_pod_per_attempt(jobs, name)
        status = jobs.status("before")
        assert status["phase"] == "Running" and status["attempt"] == 1, status
        assert status["resumes"] == 0 and status["failures"] == 0, status
    finally:
        scraper.close()
        for op in (a, b, a2):
            if op is not None:
                op.stop()
