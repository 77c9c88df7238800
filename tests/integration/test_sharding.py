"""Horizontal sharding (docs/SHARDING.md) on the local control plane: three shards (`a`, `b` and
the default shard of unlabelled jobs), one leader each and a standby for `a`, every replica
limited to the test's namespace and holding its shard's Lease there. Shard `a`'s leader is
SIGKILLed: after its Lease expires the standby takes over and a pod change made after the kill
reaches the job's status; the other shards keep reconciling meanwhile; no job is held by two
replicas at once (their DEBUG log lines "holding"/"released", bounded by the kill) and every pod
a replica created or deleted belonged to a job it held. Then a running job is moved from shard
`b` to the default shard: the new owner keeps the running attempt (no resume) and still sees a
change of the old-labelled pod. The session operator (no shard, all jobs) is frozen meanwhile."""
from __future__ import annotations

import re
import time

import pytest
import yaml

from finetune_testbed.chaos.invariants import acts_from_log, holdings_from_log, shared_holdings, unheld_acts
from finetune_testbed.cluster import REPO
from finetune_testbed.identities import lease_holder, metric_samples
from finetune_testbed.jobs import Jobs, job_manifest, sim
from finetune_testbed.operator_proc import OperatorProcess, election_replica, leader_gauge
from finetune_testbed.procs import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SHARD = "finetune.dev/shard"
BASE = "finetune-sharded"
LEASE_DURATION, RETRY = 15.0, 2.0  # config.py / leader.py defaults
SLACK = 8.0  # CPU headroom on a shared 2-core machine (five operators, the control plane)



def replica(cluster, namespace: str, identity: str, shard: str | None) -> OperatorProcess:
    flag = f"--shard={shard}" if shard else "--shard-default"
    op = election_replica(cluster, namespace, identity, BASE, flag, f"--namespace={namespace}", "--log-level=DEBUG")
    op.shard = shard
    return op


def log_of(op: OperatorProcess) -> str:
    return op.proc.log_path.read_text(errors="replace")


def held_jobs(op: OperatorProcess) -> float:
    """Jobs in the replica's cache (its fleet gauges): what its shard's watch delivered."""
    return sum(v for _, v in metric_samples(op.metrics_text(), "finetune_operator_jobs"))


def sharded(name: str, shard: str | None, outcome: str = "run") -> dict:
    m = job_manifest(name, template=sim(outcome=outcome))
    if shard:
        m["metadata"]["labels"] = {SHARD: shard}
    return m


def test_three_shards_failover_and_relabel(cluster, namespace, session_operator_paused):
    jobs = Jobs(cluster, namespace)
    a1 = replica(cluster, namespace, "a-1", "a")
    a2 = replica(cluster, namespace, "a-2", "a")
    b1 = replica(cluster, namespace, "b-1", "b")
    d1 = replica(cluster, namespace, "d-1", None)
    ops = [a1, a2, b1, d1]
    shard_jobs = {"a": ["a-x", "a-y"], "b": ["b-x", "b-y", "move-me"], None: ["d-x", "d-y"]}
    t_start = time.monotonic()
    try:
        a1.start()
        wait_for(lambda: leader_gauge(a1) == 1, 30, "a-1 leads shard a", procs=[a1.proc])
        for op in (a2, b1, d1):
            op.start()
        wait_for(lambda: leader_gauge(b1) == 1 and leader_gauge(d1) == 1, 30, "b-1 and d-1 lead",
                 procs=[b1.proc, d1.proc])
        wait_for(lambda: re.search(r"standby: lease \S+ is held", log_of(a2)), 30, "a-2 standing by",
                 procs=[a2.proc])
        assert leader_gauge(a2) == 0
        for shard, names in shard_jobs.items():
            for name in names:
                jobs.apply(sharded(name, shard))
        for names in shard_jobs.values():
            for name in names:
                jobs.wait_phase(name, "Running", 90)
        spread_s = time.monotonic() - t_start

        # One Lease per shard; each replica holds only its shard's jobs; pods carry the label.
        assert {s: lease_holder(cluster, namespace, f"{BASE}-{s}") for s in ("a", "b", "default")} == \
            {"a": "a-1", "b": "b-1", "default": "d-1"}
        assert lease_holder(cluster, namespace, BASE) is None, "no unsharded Lease"
        assert (held_jobs(a1), held_jobs(b1), held_jobs(d1), held_jobs(a2)) == (2, 3, 2, 0)
        for shard, names in shard_jobs.items():
            for name in names:
                assert [(p["metadata"]["labels"].get(SHARD)) for p in jobs.pods(name)] == [shard], name

        # ---- SIGKILL shard a's leader; change pods at once, in shard a and in shard b ----------
        a1.kill()
        t_kill_wall, t0 = time.time(), time.monotonic()
        cluster.kubectl("delete", "pod", "a-x-1", "-n", namespace, "--wait=false")
        cluster.kubectl("delete", "pod", "b-x-1", "-n", namespace, "--wait=false")
        jobs.apply(sharded("a-new", "a", outcome="succeed"))
        # Shard b is not affected: its pod change reaches the status while shard a has no leader.
        jobs.wait("b-x", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running",
                  LEASE_DURATION, "b-x resumed by b-1 while shard a is leaderless")
        other_shard_s = time.monotonic() - t0
        assert leader_gauge(a2) == 0 and jobs.status("a-x").get("attempt") == 1, \
            "shard a acted before its Lease expired"
        wait_for(lambda: leader_gauge(a2) == 1, LEASE_DURATION + RETRY + SLACK, "a-2 takes shard a's Lease",
                 interval=0.1, procs=[a2.proc])
        failover_s = time.monotonic() - t0
        jobs.wait("a-x", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 30,
                  "a-x's deleted pod reaches its status through a-2")
        reconciled_s = time.monotonic() - t0
        jobs.wait_phase("a-new", "Succeeded", 60)
        assert lease_holder(cluster, namespace, f"{BASE}-a") == "a-2"
        assert LEASE_DURATION - RETRY - 1.0 <= failover_s <= LEASE_DURATION + RETRY + SLACK, failover_s
        for name in ("a-x", "b-x"):
            status = jobs.status(name)
            assert status["resumes"] == 1 and status["lastInterruption"]["reason"] == "PodDeleted", status
        for name in ("a-y", "b-y", "d-x", "d-y"):
            status = jobs.status(name)
            assert (status["phase"], status["attempt"], status["resumes"]) == ("Running", 1, 0), (name, status)

        # ---- move a running job from shard b to the default shard ------------------------------
        t_move_wall = time.time()
        cluster.kubectl("label", "tj", "move-me", f"{SHARD}-", "-n", namespace)
        handoff = re.compile(rf"{namespace}/move-me: pods outside this shard's pod watch: \['move-me-1'\]")
        # Twice: the second look starts a later reconcile, so the first one has decided. A new
        # owner blind to the old-labelled pod would instead resume the job (a second live pod).
        wait_for(lambda: len(handoff.findall(log_of(d1))) >= 2 or jobs.status("move-me").get("attempt") != 1,
                 30, "d-1 to reconcile move-me twice, seeing its pod labelled for shard b", procs=[d1.proc])
        wait_for(lambda: "move-me: released" in log_of(b1), 10, "b-1 to drop move-me", procs=[b1.proc])
        status = jobs.status("move-me")
        assert (status["phase"], status["attempt"], status["resumes"]) == ("Running", 1, 0), status
        cluster.kubectl("delete", "pod", "move-me-1", "-n", namespace, "--wait=false")
        jobs.wait("move-me", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 30,
                  "move-me's deleted pod (shard b's label) reaches its status through d-1")
        assert [SHARD in p["metadata"]["labels"] for p in jobs.live_pods("move-me")] == [False]
        t_end_wall = time.time()

        # ---- no job held by two replicas at once; nobody acted on a job it did not hold --------
        logs = {op.identity: log_of(op) for op in ops}
        ends = {"a-1": t_kill_wall}
        holdings = [h for op in ops for h in holdings_from_log(logs[op.identity], op.identity,
                                                              ends.get(op.identity, t_end_wall))
                    if h.job.startswith(f"{namespace}/")]
        moved = f"{namespace}/move-me"
        # A relabel reaches the two replicas' watches independently: both may hold the job for the
        # milliseconds in between; writes are fenced by resourceVersion (docs/SHARDING.md).
        assert shared_holdings([h for h in holdings if h.job != moved]) == []
        assert all(h.end is not None and h.end <= t_move_wall + 10 for h in holdings
                   if h.job == moved and h.replica == "b-1")
        acts = [a for op in ops for a in acts_from_log(logs[op.identity], op.identity)
                if a[0].startswith(f"{namespace}/")]
        assert unheld_acts(acts, holdings) == []
        owner = {f"{namespace}/{n}": s for s, names in shard_jobs.items() for n in names} | \
            {f"{namespace}/a-new": "a"}
        replica_shard = {op.identity: op.shard for op in ops}
        wrong = [h for h in holdings if h.job != moved and replica_shard[h.replica] != owner[h.job]]
        assert wrong == [], wrong
        assert all(h.start >= t_kill_wall for h in holdings if h.replica == "a-2"), "the standby held jobs"
        print(f"\nsharding: 7 jobs over 3 shards Running in {spread_s:.1f}s; after SIGKILL of shard a's "
              f"leader: shard b reconciled a pod change in {other_shard_s:.1f}s, standby leads shard a in "
              f"{failover_s:.1f}s (lease {LEASE_DURATION:.0f}s + retry {RETRY:.0f}s), a pod change made "
              f"after the kill in the job's status in {reconciled_s:.1f}s")
    finally:
        for op in ops:
            op.stop()


def test_sharding_example_is_accepted_and_names_each_shards_lease(cluster, crd):
    """examples/sharding/ (docs/SHARDING.md): the API server accepts it (server-side dry run), and
    every shard's Deployment renews a Lease that exists and that the Role lets it update."""
    from finetune_operator.config import parse_args
    from finetune_operator.sharding import Shard

    cluster.kubectl("create", "namespace", "finetune-system", check=False)  # the install's namespace
    example = str(REPO / "examples" / "sharding")
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-k", example,
                          timeout=120)
    # The session's CRD was applied client-side: server-side apply warns that it keeps that field.
    warnings = [w for w in out.stderr.splitlines() if "Warning" in w and "last-applied-configuration" not in w]
    assert warnings == [], out.stderr
    docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", example).stdout) if d]
    leases = {d["metadata"]["name"] for d in docs if d["kind"] == "Lease"}
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "finetune-operator-leader-election")
    renewable = set(next(r for r in role["rules"] if "update" in r["verbs"])["resourceNames"])
    used = {}
    for d in docs:
        if d["kind"] == "Deployment":
            args = [a.replace("$(POD_NAMESPACE)", "finetune-system")
                    for a in d["spec"]["template"]["spec"]["containers"][0]["args"]]
            cfg = parse_args(args)
            used[d["metadata"]["name"]] = Shard.of(cfg).lease_name(cfg.leader_election_name)
    assert used == {"finetune-operator-default": "finetune-operator-leader-default",
                    "finetune-operator-a": "finetune-operator-leader-a",
                    "finetune-operator-b": "finetune-operator-leader-b"}
    assert set(used.values()) == leases == renewable
