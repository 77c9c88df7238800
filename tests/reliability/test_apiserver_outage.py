"""The API server (and etcd) go away for ~10 s while jobs run, then come back.

The outage is run once per operator mode (module fixture `outage`, parametrized) and
observed from outside; the tests then assert on what was recorded:
- mode `standalone`: the operator as tests and `make run` start it (no --leader-elect);
- mode `leader-elect`: as the Deployment starts it (--leader-elect, lease renewed every 2 s).
  By contract it stops acting and exits non-zero once it could not renew for 10 s; it is
  then started again with the same identity (what kubelet does with the container).
Jobs:
- `steady` runs throughout (outcome run): it must stay Running on attempt 1 with the same
  pod: an operator that took its emptied or stale caches for truth would resume or fail it;
- `finisher` is simulated to exit 0 about 4 s into the outage; kwok (the kubelet) can only
  report that once the API server is back, so the operator learns it after the return and
  the job must end Succeeded on attempt 1, with no detour through other phases.
The operator's /readyz is sampled during the outage; every status version from the moment
the API server answers again is read through a watch, and the Events are compared.
The outage is a crash (SIGKILL of kube-apiserver and etcd); both restart on the same data."""
from __future__ import annotations

import time
import uuid

import pytest

from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.kuberaw import Kube
from finetune_testbed.operator_proc import FAST_ARGS, OperatorProcess
from finetune_testbed.procs import wait_for
from finetune_testbed.reliability import ApiJobs, create_namespace

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GPU_NODES = 2
DOWN_SECONDS = 10.0
SCHEDULER_RELIST_SECONDS = 90  # client-go reflector back-off: at most 60 s, then a list
TJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/trainingjobs"
JOBS = ("steady", "finisher")


def _collect_versions(kube: Kube, ns: str, versions: dict, seconds: float, done_at: list,
                      t_up: float) -> None:
    """Every status version of our jobs for `seconds` (list, then watch from the list)."""
    end = time.monotonic() + seconds
    rv = None

    def keep(obj):
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        if name in versions and (not versions[name] or versions[name][-1] != status):
            versions[name].append(status)
            if name == "finisher" and status.get("phase") == "Succeeded" and not done_at:
                done_at.append(time.monotonic() - t_up)
    while time.monotonic() < end:
        try:
            if rv is None:
                listing = kube.get(TJ.format(ns=ns))
                rv = listing["metadata"]["resourceVersion"]
                for obj in listing["items"]:
                    keep(obj)
            for ev in kube.watch(TJ.format(ns=ns), {"resourceVersion": rv, "timeoutSeconds": 5},
                                 timeout=10):
                if ev.get("type") == "ERROR":
                    rv = None
                    break
                obj = ev.get("object") or {}
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if ev.get("type") in ("ADDED", "MODIFIED"):
                    keep(obj)
                if time.monotonic() >= end:
                    return
        except Exception:
            rv = None
            time.sleep(0.3)


@pytest.fixture(scope="module", params=["standalone", "leader-elect"])
def outage(rel_cluster, request):
    mode = request.param
    c = rel_cluster
    ns = create_namespace(c, f"outage-{mode}-{uuid.uuid4().hex[:5]}")
    args = FAST_ARGS + ["--namespace", ns]
    if mode == "leader-elect":
        args += ["--leader-elect", "--leader-election-namespace", ns,
                 "--leader-election-id", "finetune-operator-leader", "--identity", "operator-0"]
    op = OperatorProcess(c.kubeconfig, c.log_dir, name=f"outage-{mode}-operator", args=args)
    op.start()
    jobs = ApiJobs(c, ns)
    kube = Kube(c.kubeconfig)
    rec: dict = {"mode": mode, "ns": ns, "pid": op.pid}
    try:
        jobs.apply(job_manifest("steady", template=sim(outcome="run")))
        jobs.apply(job_manifest("finisher", template=sim(outcome="succeed", run_for="6s")))
        for name in JOBS:
            jobs.wait(name, lambda s: s.get("phase") == "Running", 60, f"{name} Running")
        rec["pods_before"] = {p["metadata"]["name"]: p["metadata"]["uid"]
                              for n in JOBS for p in jobs.pods(n)}
        rec["events_before"] = {n: {e["metadata"]["name"] for e in jobs.events(n)} for n in JOBS}
        rec["ready_before"] = op.ready()

        t_down = time.monotonic()
        c.procs["kube-apiserver"].kill()
        c.procs["etcd"].kill()
        samples, exited_at = [], None
        while time.monotonic() - t_down < DOWN_SECONDS:
            samples.append((round(time.monotonic() - t_down, 1), op.ready()))
            if exited_at is None and not op.running():
                exited_at = time.monotonic() - t_down
            time.sleep(0.5)
        rec["ready_during"] = samples
        c.start_etcd()
        c.start_apiserver()
        t_up = time.monotonic()
        rec["outage_seconds"] = t_up - t_down
        if exited_at is None and not op.running():
            exited_at = t_up - t_down  # at the latest
        rec["exited_at"] = exited_at
        rec["exit_code"] = op.proc.popen.returncode if exited_at is not None else None
        if exited_at is not None:
            op.start(wait_ready=False)  # the container restart; same identity
        rec["restarted"] = exited_at is not None

        versions: dict[str, list[dict]] = {n: [] for n in JOBS}
        done_at: list[float] = []
        while time.monotonic() - t_up < 60 and not done_at:
            _collect_versions(kube, ns, versions, 2.0, done_at, t_up)
        _collect_versions(kube, ns, versions, 6.0, done_at, t_up)  # no late wrong transition
        rec["versions"] = versions
        rec["truth_after_return"] = done_at[0] if done_at else None
        try:
            wait_for(op.ready, 60, "operator /readyz 200 after the return")
            rec["ready_after"] = True
        except TimeoutError:
            rec["ready_after"] = False
        rec["events_after"] = {n: [(e.get("type"), e.get("reason"), e.get("message"))
                                   for e in jobs.events(n)
                                   if e["metadata"]["name"] not in rec["events_before"][n]]
                               for n in JOBS}
        rec["status_after"] = {n: jobs.status(n) for n in JOBS}
        rec["pods_after"] = {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"].get("phase"))
                             for n in JOBS for p in jobs.pods(n)}
        rec["pid_after"] = op.pid if op.running() else None
        rec["log"] = op.proc.log_path.read_text(errors="replace")
        truth = rec["truth_after_return"]
        exited = "no" if exited_at is None else f"after {exited_at:.1f}s, rc {rec['exit_code']}"
        succeeded = "n/a" if truth is None else f"{truth:.1f}s"
        print(f"\n[{mode}] outage {rec['outage_seconds']:.1f}s; readyz during: "
              f"{''.join('+' if ok else '-' for _, ok in samples)} (one sample per 0.5 s); "
              f"operator exited: {exited}; finisher Succeeded {succeeded} after the return")
        yield rec
    finally:
        kube.close()
        jobs.close()
        op.stop()


def test_operator_process_survives_or_steps_down_by_contract(outage):
    """standalone: the same process lives through the outage. leader-elect: it stops acting
    and exits non-zero about 10 s after its last renewal (CONTRACTS: renew deadline), and
    the restarted process takes over."""
    log = outage["log"]
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]
    if outage["mode"] == "standalone":
        assert not outage["restarted"], log[-3000:]
        assert outage["pid_after"] == outage["pid"]
    else:
        assert outage["restarted"], "the leader kept acting without a lease"
        assert outage["exit_code"] not in (0, None) and 7.0 <= outage["exited_at"] <= 16.0, \
            (outage["exit_code"], outage["exited_at"])
        assert "stepping down" in log and outage["pid_after"] is not None, log[-3000:]


def test_readyz_fails_while_the_apiserver_is_down(outage):
    assert outage["ready_before"]
    down = [t for t, ok in outage["ready_during"] if not ok]
    assert down, outage["ready_during"]
    assert down[0] <= 4.0, f"readyz went non-200 only {down[0]}s into the outage"


def test_readyz_is_200_again_after_the_return(outage):
    assert outage["ready_after"], outage["log"][-3000:]


def test_pod_that_finished_during_the_outage_makes_the_job_succeed(outage):
    status = outage["status_after"]["finisher"]
    assert (status["phase"], status["attempt"], status["failures"], status["resumes"]) == \
        ("Succeeded", 1, 0, 0), status
    assert outage["pods_after"]["finisher-1"] == (outage["pods_before"]["finisher-1"], "Succeeded")
    assert set(outage["pods_after"]) == {"steady-1", "finisher-1"}, outage["pods_after"]


def test_no_wrong_transition_after_the_return(outage):
    """Every status written after the return: steady stays Running/1/0/0; finisher only goes
    Running -> Succeeded (no Resuming, Queued or Failed detour from stale or empty caches);
    the Events after the outage say the same."""
    seen = {n: [(s.get("phase"), s.get("attempt"), s.get("failures"), s.get("resumes"))
                for s in v] for n, v in outage["versions"].items()}
    assert all(v == ("Running", 1, 0, 0) for v in seen["steady"]), seen["steady"]
    phases = [p for p, *_ in seen["finisher"]]
    assert phases and phases[-1] == "Succeeded", seen["finisher"]
    assert set(phases) <= {"Running", "Succeeded"}, seen["finisher"]
    assert all(a == 1 and f == 0 and r == 0 for _, a, f, r in seen["finisher"]), seen["finisher"]
    assert outage["events_after"]["steady"] == [], outage["events_after"]["steady"]
    assert [m.split(":")[0] for _, _, m in outage["events_after"]["finisher"]] == \
        ["Running -> Succeeded"], outage["events_after"]["finisher"]


def test_running_job_keeps_its_pod_through_the_outage(outage):
    assert outage["status_after"]["steady"]["phase"] == "Running"
    assert outage["status_after"]["steady"]["attempt"] == 1
    assert outage["pods_after"]["steady-1"] == (outage["pods_before"]["steady-1"], "Running")


def test_operator_started_while_the_apiserver_is_down_waits_for_it(rel_cluster):
    c = rel_cluster
    ns = create_namespace(c, f"outage-start-{uuid.uuid4().hex[:5]}")
    op = OperatorProcess(c.kubeconfig, c.log_dir, name="outage-start-operator",
                         args=FAST_ARGS + ["--namespace", ns])
    c.procs["kube-apiserver"].kill()
    c.procs["etcd"].kill()
    try:
        op.start(wait_ready=False)
        time.sleep(8)
        alive, ready_while_down = op.running(), op.ready()
        rc = None if alive else op.proc.popen.returncode
    finally:
        c.start_etcd()
        c.start_apiserver()
    jobs = ApiJobs(c, ns)
    try:
        assert alive, f"the operator exited with {rc} while the API server was down:\n{op.log_tail(12)}"
        assert not ready_while_down
        wait_for(op.ready, 60, "operator ready once the API server is back")
        jobs.apply(job_manifest("late", template=sim(outcome="run")))
        jobs.wait("late", lambda s: s.get("phase") == "Running", SCHEDULER_RELIST_SECONDS,
                  "late Running")
    finally:
        jobs.close()
        op.stop()


def test_pod_deleted_while_the_operator_was_disconnected_is_noticed(rel_cluster):
    """Unobserved deletion (Sieve): the operator is cut off (SIGSTOP) across an API server
    restart, and the job's pod is deleted before it reconnects. Its watches resume from a
    resourceVersion the restarted API server no longer has (410), so it re-lists; the pod is
    simply absent from the listing, no DELETED event ever comes. The job must still resume."""
    c = rel_cluster
    ns = create_namespace(c, f"outage-gap-{uuid.uuid4().hex[:5]}")
    op = OperatorProcess(c.kubeconfig, c.log_dir, name="outage-gap-operator",
                         args=FAST_ARGS + ["--namespace", ns])
    op.start()
    jobs = ApiJobs(c, ns)
    try:
        jobs.apply(job_manifest("gap", template=sim(outcome="run")))
        jobs.wait("gap", lambda s: s.get("phase") == "Running", 60, "gap Running")
        op.pause()
        try:
            c.procs["kube-apiserver"].kill()
            c.procs["etcd"].kill()
            c.start_etcd()
            c.start_apiserver()
            c.kubectl("delete", "pod", "gap-1", "-n", ns, "--grace-period=0", "--force")
            assert jobs.pods("gap") == []
        finally:
            op.resume()
        status = jobs.wait("gap", lambda s: s.get("attempt") == 2
                           and (s.get("lastInterruption") or {}).get("reason") == "PodDeleted",
                           30, "attempt 2 started for the unobserved deletion")
        assert status["resumes"] == 1 and status["failures"] == 0, status
        # The status names attempt 2 before its pod is created (status first: docs/ARCHITECTURE.md).
        names = wait_for(lambda: [p["metadata"]["name"] for p in jobs.pods("gap")] or None, 10, "pod gap-2")
        assert names == ["gap-2"]
        # Binding gap-2 is the scheduler's: after this module's API server restarts its
        # informers may back off up to 60 s before they list again (docs/TESTBED.md).
        status = jobs.wait("gap", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running",
                           SCHEDULER_RELIST_SECONDS, "attempt 2 Running")
        assert status["resumes"] == 1 and status["failures"] == 0, status
    finally:
        jobs.close()
        op.stop()
