"""The API server (and etcd) go away for ~10 s while jobs run, then come back.

One outage is run once per module (fixture `outage`) and observed from outside:
- `steady` runs throughout (outcome run): it must stay Running on attempt 1 with the same
  pod: an operator that took its emptied or stale caches for truth would resume or fail it;
- `finisher` is simulated to exit 0 about 4 s into the outage; kwok (the kubelet) can only
  report that once the API server is back, so the operator learns it after the return and
  the job must end Succeeded on attempt 1, with no detour through other phases;
- the operator's /readyz is sampled during the outage and after the return;
- every status version written after the return is read back through a watch started at
  the last resourceVersion seen before the outage (nothing is missed).
The outage is a crash (SIGKILL of kube-apiserver and etcd), then both are started again on
the same data. The tests then assert on what was recorded."""
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
TJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/trainingjobs"


@pytest.fixture(scope="module")
def outage(rel_cluster):
    c = rel_cluster
    ns = create_namespace(c, f"outage-{uuid.uuid4().hex[:5]}")
    op = OperatorProcess(c.kubeconfig, c.log_dir, name="outage-operator",
                         args=FAST_ARGS + ["--namespace", ns])
    op.start()
    jobs = ApiJobs(c, ns)
    kube = Kube(c.kubeconfig)
    rec: dict = {"ns": ns, "pid": op.pid}
    try:
        jobs.apply(job_manifest("steady", template=sim(outcome="run")))
        jobs.apply(job_manifest("finisher", template=sim(outcome="succeed", run_for="6s")))
        for name in ("steady", "finisher"):
            jobs.wait(name, lambda s: s.get("phase") == "Running", 60, f"{name} Running")
        rec["pods_before"] = {p["metadata"]["name"]: p["metadata"]["uid"]
                              for n in ("steady", "finisher") for p in jobs.pods(n)}
        rec["status_before"] = {n: jobs.status(n) for n in ("steady", "finisher")}
        rec["events_before"] = {n: {e["metadata"]["name"] for e in jobs.events(n)}
                                for n in ("steady", "finisher")}
        rec["ready_before"] = op.ready()

        t_down = time.monotonic()
        c.procs["kube-apiserver"].kill()
        c.procs["etcd"].kill()
        samples = []
        while time.monotonic() - t_down < DOWN_SECONDS:
            samples.append((round(time.monotonic() - t_down, 1), op.ready()))
            time.sleep(0.5)
        rec["ready_during"] = samples
        rec["alive_during"] = op.running()
        c.start_etcd()
        c.start_apiserver()
        t_up = time.monotonic()
        rec["outage_seconds"] = t_up - t_down

        # Every status version from the moment the API server answers again (a watch from
        # the pre-outage resourceVersion is refused: the restarted watch cache starts at the
        # current revision). Events complete the picture: one per phase transition.
        versions: dict[str, list[dict]] = {"steady": [], "finisher": []}
        done_at: list[float] = []

        def collect(seconds: float) -> None:
            end = time.monotonic() + seconds
            rv = None
            while time.monotonic() < end:
                try:
                    if rv is None:
                        listing = kube.get(TJ.format(ns=ns))
                        rv = listing["metadata"]["resourceVersion"]
                        for obj in listing["items"]:
                            _keep(obj)
                    for ev in kube.watch(TJ.format(ns=ns), {"resourceVersion": rv,
                                                            "timeoutSeconds": 5}, timeout=10):
                        if ev.get("type") == "ERROR":
                            rv = None
                            break
                        obj = ev.get("object") or {}
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev.get("type") in ("ADDED", "MODIFIED"):
                            _keep(obj)
                        if time.monotonic() >= end:
                            return
                except Exception:  # noqa: BLE001 - still coming up
                    rv = None
                    time.sleep(0.3)

        def _keep(obj):
            name = obj["metadata"]["name"]
            status = obj.get("status") or {}
            if name in versions and (not versions[name] or versions[name][-1] != status):
                versions[name].append(status)
                if name == "finisher" and status.get("phase") == "Succeeded" and not done_at:
                    done_at.append(time.monotonic() - t_up)

        collect_for = 60.0
        t_collect = time.monotonic()
        while time.monotonic() - t_collect < collect_for and not done_at:
            collect(2.0)
        collect(6.0)  # no late wrong transition may follow
        if done_at:
            rec["truth_after_return"] = done_at[0]
        rec["events_after"] = {n: [(e.get("type"), e.get("reason"), e.get("message"))
                                   for e in jobs.events(n)
                                   if e["metadata"]["name"] not in rec["events_before"][n]]
                               for n in ("steady", "finisher")}
        rec["versions"] = versions
        try:
            wait_for(op.ready, 60, "operator /readyz 200 after the return")
            rec["ready_after"] = True
        except TimeoutError:
            rec["ready_after"] = False
        rec["status_after"] = {n: jobs.status(n) for n in ("steady", "finisher")}
        rec["pods_after"] = {p["metadata"]["name"]: (p["metadata"]["uid"], p["status"].get("phase"))
                             for n in ("steady", "finisher") for p in jobs.pods(n)}
        rec["pid_after"] = op.pid if op.running() else None
        rec["log"] = op.proc.log_path.read_text(errors="replace")
        print(f"\noutage {rec['outage_seconds']:.1f}s; readyz during: {samples}; "
              f"finisher Succeeded {rec.get('truth_after_return', float('nan')):.1f}s after the "
              f"return; ready afterwards: {rec['ready_after']}")
        yield rec
    finally:
        kube.close()
        op.stop()


def test_operator_process_survives_the_outage(outage):
    assert outage["alive_during"]
    assert outage["pid_after"] == outage["pid"], outage["log"][-3000:]
    assert "Traceback" not in outage["log"], outage["log"][outage["log"].index("Traceback"):][:3000]


@pytest.mark.xfail(strict=True, reason="BUG (reliability report): /readyz reflects only the "
                   "operator's own last API call; while nothing changes it makes none, so it "
                   "stays 200 for the whole outage (kopf's failing watches are not counted)")
def test_readyz_fails_while_the_apiserver_is_down(outage):
    assert outage["ready_before"]
    assert any(not ok for _, ok in outage["ready_during"]), outage["ready_during"]


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
    Running -> Succeeded (no Resuming, Queued or Failed detour from stale or empty caches)."""
    seen = {n: [(s.get("phase"), s.get("attempt"), s.get("failures"), s.get("resumes"))
                for s in v] for n, v in outage["versions"].items()}
    assert all(v == ("Running", 1, 0, 0) for v in seen["steady"]), seen["steady"]
    phases = [p for p, *_ in seen["finisher"]]
    assert phases and phases[-1] == "Succeeded", seen["finisher"]
    assert set(phases) <= {"Running", "Succeeded"}, seen["finisher"]
    assert all(a == 1 and f == 0 and r == 0 for _, a, f, r in seen["finisher"]), seen["finisher"]
    # The Events (one per phase transition) after the outage: none for steady, exactly
    # Running -> Succeeded for finisher.
    new_steady = outage["events_after"]["steady"]
    new_finisher = outage["events_after"]["finisher"]
    assert new_steady == [], new_steady
    assert [m.split(":")[0] for _, _, m in new_finisher] == ["Running -> Succeeded"], new_finisher


def test_running_job_keeps_its_pod_through_the_outage(outage):
    assert outage["status_after"]["steady"]["phase"] == "Running"
    assert outage["status_after"]["steady"]["attempt"] == 1
    assert outage["pods_after"]["steady-1"] == (outage["pods_before"]["steady-1"], "Running")
