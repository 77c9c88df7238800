"""Alerts and dashboard: promtool checks and unit tests pass, every alert is unit-tested both
firing and not firing, every query parses, and only contract metric names are used."""
from __future__ import annotations

import json

import promql_queries as pq
import pytest
import yaml
from static_support import MONITORING, run

REQUIRED_ALERTS = {
    "TrainingJobQueuedTooLong", "TrainingJobStalled", "TrainingJobFailureRateHigh",
    "TrainingJobResumeStorm", "FinetuneOperatorDown", "FinetuneOperatorReconcileErrors",
    "FinetuneOperatorStaleCorrections",
}
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))


def test_required_alerts_are_defined():
    names = [r.name for r in pq.alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names)


@pytest.mark.parametrize("rule", pq.alert_rules(), ids=lambda r: r.name)
def test_alert_is_documented(rule):
    assert rule.labels.get("severity") in {"warning", "critical"}
    assert rule.annotations.get("summary") and rule.annotations.get("description")


def test_promtool_check_rules(promtool):
    out = run([promtool, "check", "rules", str(MONITORING / "rules.yaml")]).stdout
    assert "SUCCESS" in out


def test_promtool_check_prometheusrule_groups(promtool, monitoring_objects, tmp_path):
    rule = next(o for o in monitoring_objects if o["kind"] == "PrometheusRule")
    path = tmp_path / "prometheusrule-groups.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    run([promtool, "check", "rules", str(path)])


def test_promtool_unit_tests_pass(promtool):
    assert UNIT_TESTS, "no promtool unit tests in deploy/monitoring/tests/"
    proc = run([promtool, "test", "rules", *map(str, UNIT_TESTS)], cwd=MONITORING / "tests")
    assert "FAILED" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("rule", pq.alert_rules(), ids=lambda r: r.name)
def test_every_alert_has_firing_and_quiet_unit_tests(rule):
    firing = quiet = 0
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules.yaml"], f"{path.name} must test the shipped rules"
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                if check["alertname"] != rule.name:
                    continue
                if check.get("exp_alerts"):
                    firing += 1
                else:
                    quiet += 1
    assert firing >= 1, f"{rule.name}: no promtool test where it fires"
    assert quiet >= 1, f"{rule.name}: no promtool test where it stays quiet"


def test_dashboard_is_valid_grafana_json():
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    assert dash["uid"] == "finetune-operator" and dash["title"]
    ids = [p["id"] for p in pq.iter_panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in pq.iter_panels(dash):
        assert {"id", "type", "title", "gridPos"} <= set(panel), panel.get("title")
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel.get("targets") or []
        assert targets and all(t.get("expr") for t in targets), f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)


def test_every_dashboard_query_parses(promtool, tmp_path):
    targets = pq.dashboard_targets()
    assert len(targets) >= 20
    path = pq.recording_rules_file(tmp_path / "dashboard-queries.yaml")
    out = run([promtool, "check", "rules", str(path)]).stdout
    assert f"{len(targets)} rules found" in out


@pytest.mark.parametrize("name, query", sorted(pq.all_queries().items()))
def test_queries_use_only_contract_metric_names(name, query):
    used = pq.metric_names(query)
    assert used, f"{name} uses no finetune_* metric"
    unknown = used - pq.contract_metric_names()
    assert not unknown, f"{name} uses metrics not in docs/CONTRACTS.md: {sorted(unknown)}"


def test_every_contract_metric_is_on_the_dashboard_or_alerted():
    used = set().union(*(pq.metric_names(q) for q in pq.all_queries().values()))
    missing = pq.contract_metric_names() - used
    assert not missing, f"contract metrics nobody looks at: {sorted(missing)}"
