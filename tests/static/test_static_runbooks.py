"""Every alert links its runbook: a `runbook_url` annotation pointing at a section of
docs/RUNBOOKS.md in the project's repository, by the anchor GitHub gives that heading."""
from __future__ import annotations

import re

import promql_queries as pq
import pytest
from static_support import ROOT

RUNBOOKS = ROOT / "docs" / "RUNBOOKS.md"
# The project's repository, as the image's org.opencontainers.image.source names it (Dockerfile).
RUNBOOK_BASE = "https://github.com/finetune-dev/finetune-operator/blob/main/docs/RUNBOOKS.md#"


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    anchors, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced  # '#' lines inside code blocks are shell comments, not headings
            continue
        match = re.match(r"#{1,6} (.+)", line)
        if match and not fenced:
            anchors.add(github_anchor(match.group(1)))
    return anchors


def test_anchor_rule_matches_githubs():
    assert github_anchor("TrainingJobQueuedTooLong") == "trainingjobqueuedtoolong"
    assert github_anchor("Upgrade: CRD first, then the operator") == "upgrade-crd-first-then-the-operator"
    assert heading_anchors("# A b\n```\n# not a heading\n```\n## C_d\n") == {"a-b", "c_d"}


@pytest.mark.parametrize("rule", pq.alert_rules(), ids=lambda r: r.name)
def test_alert_runbook_url_points_at_a_runbook_heading(rule):
    url = rule.annotations.get("runbook_url")
    assert url, f"{rule.name}: no runbook_url annotation"
    assert url.startswith(RUNBOOK_BASE), f"{rule.name}: runbook_url {url!r} is not under {RUNBOOK_BASE}"
    anchor = url.removeprefix(RUNBOOK_BASE)
    assert anchor in heading_anchors(RUNBOOKS.read_text()), (
        f"{rule.name}: runbook_url anchor #{anchor} is not a heading of docs/RUNBOOKS.md")
