#!/usr/bin/env python3
"""Writes deploy/monitoring/prometheusrule.yaml from deploy/monitoring/rules.yaml.

rules.yaml (a plain Prometheus rules file, checked and unit-tested with promtool) is the one
source of truth; the PrometheusRule for the Prometheus Operator wraps its `groups` unchanged.

    python hack/gen-prometheusrule.py           # write
    python hack/gen-prometheusrule.py --check   # exit 1 when the file is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "deploy/monitoring/rules.yaml"
DST = ROOT / "deploy/monitoring/prometheusrule.yaml"

HEADER = (
    "# GENERATED from deploy/monitoring/rules.yaml by hack/gen-prometheusrule.py: do not edit.\n"
    "# Add the label your Prometheus' ruleSelector expects with a kustomize patch (README).\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    groups = yaml.safe_load(rules_text)["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "finetune-operator",
            "labels": {"app.kubernetes.io/name": "finetune-operator"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main(argv: list[str]) -> int:
    want = render(SRC.read_text())
    if "--check" in argv:
        if not DST.exists() or DST.read_text() != want:
            print(f"{DST.relative_to(ROOT)} is out of date: run hack/gen-prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    DST.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
