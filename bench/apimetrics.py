"""API request accounting.

Primary, the same method for both sides: the API server's audit log (level Metadata,
written by the local control plane for the benchmark), which names the client of every
request by user agent. Per side, over the side's time window:
- ours: the operator process = user agents `kopf/...` (kopf's watches, LISTs and its
  finalizer PATCHes) and `Python/... aiohttp/...` (the operator's own client);
- the Job controller: kube-controller-manager's user agent ending in `/job-controller`
  (KCM's clients name their controller), and, as context, KCM's shared informers.
Each request is counted once: at ResponseComplete, or at ResponseStarted for a WATCH.

Also read: the operator's own `finetune_operator_api_requests_total{verb,resource,code}`,
which covers its own client only (not kopf's requests): the difference is shown.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

_LINE = re.compile(r'^(\w+)\{(.*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
VERBS = ("GET", "LIST") + WRITE_VERBS
# audit verbs -> HTTP-ish verbs used in the table
_AUDIT_VERB = {"get": "GET", "list": "LIST", "watch": "WATCH", "create": "POST", "update": "PUT",
               "patch": "PATCH", "delete": "DELETE", "deletecollection": "DELETE"}

AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
"""

# (resource, VERB) -> requests
ApiCounts = Counter[tuple[str, str]]


class AuditCounts(TypedDict):
    counts: ApiCounts                     # (resource, VERB) -> requests
    failed: Counter[tuple[str, str, int]]  # (resource, VERB, HTTP code) -> failed requests
    agents: Counter[str]                  # user agent -> requests


def parse_counter(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    prefix = name + "{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = _LINE.match(line)
        if not m or m.group(1) != name:
            continue
        out.append((dict(_LABEL.findall(m.group(2))), float(m.group(3))))
    return out


def operator_counts(text: str) -> ApiCounts:
    """(resource, VERB) -> requests, from finetune_operator_api_requests_total."""
    c: ApiCounts = Counter()
    for labels, value in parse_counter(text, "finetune_operator_api_requests_total"):
        # typeshed: Counter values are int only; Counter documents any number (the float sample)
        c[(labels.get("resource", ""), labels.get("verb", "").upper())] += value  # type: ignore[assignment]
    return c


def diff(after: ApiCounts, before: ApiCounts) -> ApiCounts:
    out: ApiCounts = Counter()
    for k in set(after) | set(before):
        d = after.get(k, 0) - before.get(k, 0)
        if d:
            out[k] = d
    return out


def by_verb(counts: ApiCounts, jobs: int) -> dict[str, float]:
    """counts keyed (resource, VERB) -> VERB -> requests per job, plus 'writes' and 'total'
    (WATCH excluded from 'total': a watch is a stream, not a request per job)."""
    per: dict[str, float] = {v: 0.0 for v in VERBS}
    for (_res, verb), n in counts.items():
        per[verb] = per.get(verb, 0.0) + n
    out = {v: per[v] / jobs for v in per}
    out["writes"] = sum(per[v] for v in WRITE_VERBS) / jobs
    out["total"] = sum(per[v] for v in VERBS) / jobs
    return out


# ---- audit log ---------------------------------------------------------------------------
def operator_agent(ua: str) -> bool:
    return ua.startswith("kopf/") or (ua.startswith("Python/") and "aiohttp" in ua)


def job_controller_agent(ua: str) -> bool:
    return ua.startswith("kube-controller-manager/") and ua.endswith("/job-controller")


def kcm_informer_agent(ua: str) -> bool:
    return ua.startswith("kube-controller-manager/") and ua.endswith("/shared-informers")


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def audit_counts(path: Path, start: float, end: float, agent: Callable[[str], bool]) -> AuditCounts:
    """Requests by the clients `agent(user_agent)` accepts, whose response completed (or,
    for WATCH, started) within [start, end] (wall clock seconds)."""
    by_key: ApiCounts = Counter()
    failed: Counter[tuple[str, str, int]] = Counter()
    agents: Counter[str] = Counter()
    with open(path, errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            ua = e.get("userAgent") or ""
            if not agent(ua):
                continue
            verb = _AUDIT_VERB.get(e.get("verb"), (e.get("verb") or "").upper())
            stage = e.get("stage")
            if (verb == "WATCH") != (stage == "ResponseStarted") or stage not in (
                    "ResponseStarted", "ResponseComplete"):
                continue
            t = _ts(e["stageTimestamp"])
            if not start <= t <= end:
                continue
            ref = e.get("objectRef") or {}
            res = (ref.get("resource") or e.get("requestURI", "?").split("?")[0])
            if ref.get("subresource"):
                res += "/" + ref["subresource"]
            by_key[(res, verb)] += 1
            code = (e.get("responseStatus") or {}).get("code") or 0
            if code >= 400:
                failed[(res, verb, code)] += 1
            agents[ua] += 1
    return {"counts": by_key, "failed": failed, "agents": agents}


# ---- what the operator did in a window (its own counters) -------------------------------------
_ACTIVITY = {"reconciles": ("finetune_operator_reconcile_duration_seconds_count", "trigger"),
             "progress_scrapes": ("finetune_operator_progress_scrapes_total", "result"),
             "api_requests": ("finetune_operator_api_requests_total", "verb")}


def idle_activity(before: str, after: str) -> dict[str, dict[str, float]]:
    """Reconciles by trigger, progress scrapes by result and the operator's own API requests
    by verb between two scrapes of its /metrics (the idle window's work, in numbers)."""
    out: dict[str, dict[str, float]] = {}
    for what, (name, label) in _ACTIVITY.items():
        c: Counter[str] = Counter()
        for labels, value in parse_counter(after, name):
            c[labels.get(label, "")] += value  # type: ignore[assignment]
        for labels, value in parse_counter(before, name):
            c[labels.get(label, "")] -= value  # type: ignore[assignment]
        out[what] = {k: v for k, v in sorted(c.items()) if v}
    return out
