"""Every dashboard query and every alert expression, evaluated by a real Prometheus that
scrapes the real operator (and a fake trainer endpoint on a simulated pod's IP) while the
operator drives a scenario on the local control plane.

Prometheus (Debian `prometheus` binary, hack/install-tools.sh) runs on 127.0.0.1 with a 1 s
scrape and rule-evaluation interval, loads deploy/monitoring/rules.yaml, and scrapes with
the configuration the Prometheus Operator would generate from the shipped ServiceMonitor and
PodMonitor (finetune_testbed.prometheus), so `namespace`, `pod`, `job`, `trainingjob` carry
what they will carry in a cluster.

Each expression from tests/static/promql_queries.py `all_queries()` must parse; every
dashboard query and the alert expressions the scenario produces must return series
(dashboard variables resolved to this test's namespace, so the series are the scenario's);
the alerts that need hours of history or a broken operator are listed in EXPECTED_EMPTY with
the reason, and a witness query shows the data they are built on is there."""
from __future__ import annotations

import importlib.util
import math
import sys
import time

import pytest

from finetune_testbed.cluster import REPO
from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.procs import wait_for
from finetune_testbed.prometheus import (
    RULES_FILE,
    FakeTrainer,
    PrometheusServer,
    operator_scrape_config,
    pod_target,
    trainer_scrape_config,
    write_trainer_targets,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OPERATOR_POD = "finetune-operator-7d9c-test"  # the `pod` label the ServiceMonitor would add
OPERATOR_JOB = "finetune-operator"            # job label: the Service name
TRAINER_JOB = "finetune-system/finetune-trainer"  # job label: <namespace>/<PodMonitor>


def _load_promql_queries():
    name = "promql_queries"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests/static/promql_queries.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


promql_queries = _load_promql_queries()

# Alerts whose expression must be EMPTY in this scenario: why, and a witness query (with
# NS for the test namespace) that must return series, so "empty" means "below the
# threshold", not "no data". `scoped`: the alert aggregates by namespace, so only this test's
# namespace is checked (earlier tests in the session may have left other namespaces).
EXPECTED_EMPTY = {
    "alert TrainingJobQueuedTooLong": dict(
        why="fires after a job has been Queued for > 1 h; the scenario's unschedulable job "
            "has waited seconds",
        witness='max by (namespace) (finetune_operator_oldest_queued_seconds{namespace="NS"}) > 0',
        scoped=True),
    "alert TrainingJobStalled": dict(
        why="needs a Running job without a step for longer than its stall timeout (30 min "
            "default); the fake trainer advances",
        witness='max by (namespace) (finetune_operator_stalled_jobs{namespace="NS"}) == 0',
        scoped=True),
    "alert TrainingJobResumeStorm": dict(
        why="needs > 10 resumes in 15 min in one namespace; the scenario resumes once",
        witness='sum by (namespace) (finetune_operator_resumes_total{namespace="NS"}) >= 1',
        scoped=True),
    "alert FinetuneOperatorDown": dict(
        why="the operator is scraped and leading; the positive case (operator frozen, "
            "scrapes fail) is checked at the end of the test",
        witness="finetune_operator_leader == 1", scoped=False),
    "alert FinetuneOperatorMultipleLeaders": dict(
        why="one replica (two leaders are the failover test's concern)",
        witness="sum(finetune_operator_leader) == 1", scoped=False),
    "alert FinetuneOperatorReconcileErrors": dict(
        why="needs > 5 % failed reconciles; the scenario has none (reported, not asserted: "
            "the ratio is per trigger over the whole session's last 10 min)",
        witness="sum by (trigger) (rate(finetune_operator_reconcile_duration_seconds_count[10m])) > 0",
        scoped=None),
    "alert FinetuneOperatorStaleCorrections": dict(
        why="the watch path keeps status right; the safety-net timer corrected nothing",
        witness='finetune_operator_stale_corrections_total{namespace="NS"} == 0',
        scoped=True),
}
# Produced by the scenario: four jobs fail (3 failures after the first scrape, the
# threshold), one succeeds.
EXPECTED_SERIES_ALERTS = {"alert TrainingJobFailureRateHigh"}


def _pod(jobs, name: str, attempt: int) -> dict:
    def find():
        for p in jobs.pods(name):
            if p["metadata"]["name"] == f"{name}-{attempt}" and p["status"].get("podIP"):
                return p
        return None
    return wait_for(find, 30, f"pod {name}-{attempt} with an IP")


def _fmt(result: list[dict], limit: int = 3) -> str:
    parts = []
    for r in result[:limit]:
        labels = {k: v for k, v in r["metric"].items()
                  if k in ("namespace", "exported_namespace", "phase", "to_phase", "reason", "trigger", "pod",
                           "trainingjob", "le", "code", "verb")}
        parts.append(f"{labels or '{}'}={r['value'][1]}")
    more = f" (+{len(result) - limit})" if len(result) > limit else ""
    return ", ".join(parts) + more


@pytest.fixture
def prometheus(cluster, live_operator, tmp_path):
    sd_file = tmp_path / "trainer-targets.json"
    write_trainer_targets(sd_file, [])
    prom = PrometheusServer(
        tmp_path / "prometheus", cluster.log_dir, rule_files=[RULES_FILE],
        scrape_configs=[operator_scrape_config(live_operator.metrics_url, pod=OPERATOR_POD),
                        trainer_scrape_config(sd_file)])
    prom.sd_file = sd_file
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()
        assert not prom.running(), "prometheus still running after stop()"


def test_dashboard_and_alert_queries_against_real_prometheus(prometheus, jobs, cluster,
                                                            namespace, live_operator):
    prom, ns = prometheus, namespace
    t_start = time.monotonic()
    prom.wait_target_up(OPERATOR_JOB)

    # Every rule group of rules.yaml loaded and evaluated without error.
    expected_groups = {g["name"]: len(g["rules"]) for g in promql_queries.load_rule_groups()}

    def rules_healthy():
        groups = {g["name"]: g for g in prom.rule_groups()}
        assert set(groups) == set(expected_groups), f"loaded groups {sorted(groups)}"
        for name, g in groups.items():
            assert len(g["rules"]) == expected_groups[name]
            for r in g["rules"]:
                assert r.get("lastError", "") == "", f"{r['name']}: {r['lastError']}"
        return all(r["health"] == "ok" for g in groups.values() for r in g["rules"])
    wait_for(rules_healthy, 30, "every alert rule evaluated with health ok", interval=0.5)

    # ---- the scenario -------------------------------------------------------------------
    trainer = None
    try:
        jobs.apply(job_manifest("trainee", template=sim(outcome="run")))
        jobs.apply(job_manifest("ok", template=sim(outcome="succeed", run_for="2s")))
        jobs.apply(job_manifest("resumed", template=sim(outcome="run")))
        jobs.apply(job_manifest("queued", resources={"gpus": 9}))  # no node has 9 GPUs
        failing = dict(runPolicy={"backoffLimit": 0},
                       template=sim(outcome="fail", run_for="2s", exit_code=3))
        jobs.apply(job_manifest("fail-1", **failing))

        # The operator's namespace label must survive the scrape (a ServiceMonitor without
        # honorLabels renames it to exported_namespace and every `by (namespace)` breaks).
        try:
            prom.wait_query(f'finetune_operator_jobs{{namespace="{ns}"}}', 60,
                            f"finetune_operator_jobs series labelled namespace={ns}")
        except TimeoutError as exc:
            seen = prom.query('finetune_operator_jobs{phase="Queued"}')
            pytest.fail(f"{exc}; finetune_operator_jobs series as scraped: {_fmt(seen, 5)}")

        jobs.wait_phase("trainee", "Running", 60)
        pod = _pod(jobs, "trainee", 1)
        trainer = FakeTrainer(pod["status"]["podIP"], 9400, total_steps=200)
        trainer.advance(10, 2.5)
        write_trainer_targets(prom.sd_file, [pod_target(pod)])

        jobs.wait_phase("resumed", "Running", 60)
        cluster.kubectl("delete", "pod", "resumed-1", "-n", ns, "--wait=false")

        jobs.wait_phase("fail-1", "Failed", 60)
        # A counter series born with its first increment shows no increase(); the first
        # failure must be scraped before the next three for the failure-rate alert's ">= 3".
        prom.wait_query(f'finetune_operator_transitions_total{{namespace="{ns}",to_phase="Failed"}}',
                        30, "first Failed transition scraped")
        for i in (2, 3, 4):
            jobs.apply(job_manifest(f"fail-{i}", **failing))

        jobs.wait_phase("ok", "Succeeded", 60)
        jobs.wait("queued", lambda s: s.get("phase") == "Queued" and s.get("reason") == "Unschedulable",
                  60, "queued: Unschedulable")
        status = jobs.wait("resumed", lambda s: s.get("phase") == "Running" and s.get("attempt") == 2,
                           60, "resumed: attempt 2 Running")
        assert status["resumes"] == 1
        for i in (2, 3, 4):
            jobs.wait_phase(f"fail-{i}", "Failed", 60)
        jobs.wait("trainee", lambda s: (s.get("progress") or {}).get("step") == 10, 30,
                  "trainee progress read by the operator")
        trainer.advance(40, 1.75, checkpoint_step=30)

        # Wait until Prometheus has scraped the end state.
        for expr in (f'finetune_operator_jobs{{namespace="{ns}",phase="Failed"}} == 4',
                     f'finetune_operator_jobs{{namespace="{ns}",phase="Succeeded"}} == 1',
                     f'finetune_operator_jobs{{namespace="{ns}",phase="Running"}} == 2',
                     f'finetune_operator_jobs{{namespace="{ns}",phase="Queued"}} == 1',
                     f'finetune_trainer_step{{namespace="{ns}",trainingjob="trainee"}} == 40',
                     'finetune_operator_time_to_first_step_seconds_count > 0',
                     f'sum(finetune_operator_transitions_total{{namespace="{ns}",to_phase="Failed"}}) == 4'):
            prom.wait_query(expr, 60)
        scenario_s = time.monotonic() - t_start

        # ---- every query ------------------------------------------------------------------
        at = time.time()
        scoped = promql_queries.all_queries(variables={"namespace": ns})
        unscoped = promql_queries.all_queries()  # Grafana's "All"
        results, errors = {}, {}
        for name, expr in scoped.items():
            for variant in {expr, unscoped[name]}:
                try:
                    res = prom.query(variant, at=at)
                except Exception as exc:
                    errors[name] = str(exc)
                    continue
                if variant == expr:
                    results[name] = res
        assert not errors, "queries Prometheus refused:\n" + "\n".join(
            f"  {n}: {e}" for n, e in errors.items())

        def in_ns(res):
            return [r for r in res if r["metric"].get("namespace") == ns]

        lines, problems = [], []
        for name in scoped:
            res = results[name]
            if name in EXPECTED_EMPTY:
                exp = EXPECTED_EMPTY[name]
                witness = prom.query(exp["witness"].replace("NS", ns), at=at)
                if not witness:
                    problems.append(f"{name}: witness returned nothing: {exp['witness']}")
                relevant = in_ns(res) if exp["scoped"] else res
                if exp["scoped"] is not None and relevant:
                    problems.append(f"{name}: expected no series, got {_fmt(relevant)}")
                lines.append(f"  EMPTY   {name}: {len(res)} series ({exp['why']}); "
                             f"witness {_fmt(witness)}")
            elif name in EXPECTED_SERIES_ALERTS:
                if not in_ns(res):
                    problems.append(f"{name}: no series for namespace {ns}: {_fmt(res)}")
                lines.append(f"  SERIES  {name}: {_fmt(in_ns(res))}")
            else:
                if not res:
                    problems.append(f"{name}: no series: {scoped[name]}")
                lines.append(f"  SERIES  {name}: {_fmt(res)}")
        print(f"\nscenario {scenario_s:.0f}s; {len(scoped)} queries at t={at:.0f}:\n" + "\n".join(lines))
        assert not problems, "\n".join(problems)

        # ---- values the scenario fixes -------------------------------------------------
        def panel(pid: int, ref: str = "A") -> list[dict]:
            key = next(n for n in scoped if n.startswith(f"panel {pid} ") and n.endswith(f" {ref}"))
            return results[key]

        def scalar(pid: int, ref: str = "A") -> float:
            res = panel(pid, ref)
            assert len(res) == 1, res
            return float(res[0]["value"][1])

        by_phase = {r["metric"]["phase"]: float(r["value"][1]) for r in panel(8)}
        assert set(by_phase) == {"Queued", "Starting", "Running", "Resuming", "Suspended",
                                 "Succeeded", "Failed"}, by_phase
        assert by_phase["Succeeded"] == 1 and by_phase["Failed"] == 4, by_phase
        assert by_phase["Running"] == 2 and by_phase["Queued"] == 1, by_phase
        assert scalar(2) == 2 and scalar(3) == 1 and scalar(4) == 0 and scalar(5) == 0
        assert scalar(6) > 0                                   # oldest queued, seconds
        assert scalar(7) >= 3                                  # Failed (24h), increase()
        assert scalar(18) == 1 and scalar(19) == 1 and scalar(20) == 1
        assert [r["metric"].get("pod") for r in panel(28)] == [OPERATOR_POD]
        assert not math.isnan(scalar(23)), "reconcile p99 NaN: no reconcile in the last minute"
        triggers = {r["metric"]["trigger"] for r in panel(24)}
        # The contract names job|pod|timer; the reconciler also labels "progress" and
        # "wakeup" reconciles, and a timer reconcile only happens for a job left alone for
        # --timer-interval, so only job and pod are certain here.
        assert triggers >= {"job", "pod"}, triggers
        calls = {(r["metric"]["verb"], r["metric"]["resource"]) for r in panel(27)}
        assert {("post", "pods"), ("put", "trainingjobs/status"), ("post", "events")} <= calls, calls
        progress = panel(30)
        assert [(r["metric"]["namespace"], r["metric"]["trainingjob"]) for r in progress] == \
            [(ns, "trainee")]
        assert float(progress[0]["value"][1]) == pytest.approx(40 / 200)
        assert float(panel(34)[0]["value"][1]) == 10           # steps since last checkpoint
        assert 0 <= float(panel(33)[0]["value"][1]) < 120      # heartbeat age, seconds
        rate_alert = [r for r in results["alert TrainingJobFailureRateHigh"]
                      if r["metric"]["namespace"] == ns]
        assert float(rate_alert[0]["value"][1]) > 0.5
    finally:
        if trainer:
            trainer.close()

    # ---- FinetuneOperatorDown, positive case: the only replica stops answering ------------
    down = "absent(finetune_operator_leader == 1)"
    assert prom.query(down) == []
    t0 = time.monotonic()
    live_operator.pause()
    try:
        prom.wait_query(down, 30, "FinetuneOperatorDown expression with the operator frozen")
        assert prom.value(f'up{{job="{OPERATOR_JOB}"}}') == 0
        down_after = time.monotonic() - t0
    finally:
        live_operator.resume()
    wait_for(lambda: prom.query(down) == [], 30, "operator scraped again", interval=0.5)
    print(f"FinetuneOperatorDown expression returned a series {down_after:.1f}s after the "
          f"operator froze (the alert itself waits `for: 5m`)")
