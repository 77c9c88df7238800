"""Every PromQL expression the project ships, extracted programmatically.

Sources: the alert rules (deploy/monitoring/rules.yaml, the source of the PrometheusRule) and
the Grafana dashboard (deploy/monitoring/dashboard.json). Nothing is copied by hand, so a test
that runs these queries against a real Prometheus scraping the real operator checks what is
actually shipped.

Plain module (PyYAML only, no pytest), importable from any test:

    import importlib.util, pathlib
    spec = importlib.util.spec_from_file_location(
        "promql_queries", pathlib.Path(ROOT, "tests/static/promql_queries.py"))
    promql_queries = importlib.util.module_from_spec(spec); spec.loader.exec_module(promql_queries)

or, with `pythonpath = ["tests/static"]` in pytest's ini options, `import promql_queries`.

    all_queries()            -> {name: promql}  every alert expr + every dashboard target,
                                Grafana variables resolved, ready for /api/v1/query
    alert_rules()            -> [AlertRule]     name, group, expr, for, labels, annotations
    dashboard_targets()      -> [PanelTarget]   panel id/title, refId, raw expr, resolved query
    metric_names(expr)       -> {metric names}  finetune_* names, histogram suffixes stripped
    contract_metric_names()  -> {metric names}  every finetune_* metric named in docs/CONTRACTS.md
    recording_rules_file(p)  -> writes a Prometheus rules file with one recording rule per
                                dashboard target, for `promtool check rules` (syntax check)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "deploy/monitoring/rules.yaml"
DASHBOARD_FILE = ROOT / "deploy/monitoring/dashboard.json"
CONTRACTS_FILE = ROOT / "docs/CONTRACTS.md"

# Grafana's built-in and dashboard variables, as Prometheus would see them with "All" chosen.
DEFAULT_VARIABLES: dict[str, str] = {
    "namespace": ".*",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}

_METRIC_RE = re.compile(r"\bfinetune_(?:operator|trainer)_[a-z0-9_]*[a-z0-9]")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class AlertRule:
    name: str
    group: str
    expr: str
    for_: str = "0s"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PanelTarget:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str   # as written in the dashboard (with $variables)
    query: str  # variables resolved: valid PromQL

    @property
    def name(self) -> str:
        return f"panel {self.panel_id} {self.panel_title!r} {self.ref_id}"


def load_rule_groups(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["groups"]


def alert_rules(path: Path = RULES_FILE) -> list[AlertRule]:
    out = []
    for group in load_rule_groups(path):
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            out.append(AlertRule(
                name=rule["alert"], group=group["name"], expr=rule["expr"].strip(),
                for_=str(rule.get("for", "0s")), labels=dict(rule.get("labels", {})),
                annotations=dict(rule.get("annotations", {}))))
    return out


def alert_expressions(path: Path = RULES_FILE) -> dict[str, str]:
    return {r.name: r.expr for r in alert_rules(path)}


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(dashboard: dict[str, Any]):
    """All panels, rows' nested (collapsed) panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def resolve_variables(expr: str, variables: dict[str, str] | None = None) -> str:
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VAR_RE.sub(sub, expr)


def dashboard_targets(path: Path = DASHBOARD_FILE,
                      variables: dict[str, str] | None = None) -> list[PanelTarget]:
    out = []
    for panel in iter_panels(load_dashboard(path)):
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if not expr:
                continue
            out.append(PanelTarget(panel_id=panel["id"], panel_title=panel.get("title", ""),
                                   ref_id=target.get("refId", "?"), expr=expr,
                                   query=resolve_variables(expr, variables)))
    return out


def all_queries(variables: dict[str, str] | None = None) -> dict[str, str]:
    """name -> PromQL, for every alert expression and every dashboard target."""
    queries = {f"alert {r.name}": r.expr for r in alert_rules()}
    queries.update({t.name: t.query for t in dashboard_targets(variables=variables)})
    return queries


def metric_names(expr: str) -> set[str]:
    """finetune_* metric names in an expression; _bucket/_count/_sum map to the histogram."""
    names = set()
    for name in _METRIC_RE.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def contract_metric_names(path: Path = CONTRACTS_FILE) -> set[str]:
    return set(_METRIC_RE.findall(path.read_text()))


def recording_rules_file(path: Path, variables: dict[str, str] | None = None) -> Path:
    """One recording rule per dashboard target: `promtool check rules` then parses each query."""
    rules = [{"record": f"finetune_dashboard:panel_{t.panel_id}_{t.ref_id}", "expr": t.query}
             for t in dashboard_targets(variables=variables)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "finetune-dashboard", "rules": rules}]},
                                   sort_keys=False))
    return path


if __name__ == "__main__":  # print them: python tests/static/promql_queries.py
    for name, query in all_queries().items():
        print(f"# {name}\n{query}\n")
