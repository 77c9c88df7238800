"""API request accounting.

- ours: the operator's own `finetune_operator_api_requests_total{verb,resource,code}`
  (exact; covers the operator's client, not kopf's LIST/WATCH streams).
- both sides, same method: deltas of the API server's `apiserver_request_total` over a
  side's window, restricted to the objects a controller of this kind writes (owner,
  owner/status, pods without subresource, core/v1 events), minus the benchmark's own
  requests (counted by bench.kubeapi.Api). The API server has no per-client label, so
  anything else touching those rows in the window (the garbage collector, kwok, the
  scheduler) is attributed too; kwok writes pods/status and the scheduler pods/binding
  and events.k8s.io events, which are excluded. WATCH is left out (counted when a
  stream ends, so it does not fall in a window cleanly). For ours, comparing the
  attributed figure with the operator's own counter shows how good the attribution is.
"""
from __future__ import annotations

import re
from collections import Counter

_LINE = re.compile(r'^(\w+)\{(.*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
VERBS = ("GET", "LIST") + WRITE_VERBS


def parse_counter(text: str, name: str) -> list[tuple[dict, float]]:
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


def apiserver_counts(text: str) -> Counter:
    """(group, resource, subresource, VERB) -> requests, summed over codes and scopes."""
    c: Counter = Counter()
    for labels, value in parse_counter(text, "apiserver_request_total"):
        key = (labels.get("group", ""), labels.get("resource", ""),
               labels.get("subresource", ""), labels.get("verb", ""))
        c[key] += value
    return c


def operator_counts(text: str) -> Counter:
    """(resource, VERB) -> requests, from finetune_operator_api_requests_total."""
    c: Counter = Counter()
    for labels, value in parse_counter(text, "finetune_operator_api_requests_total"):
        c[(labels.get("resource", ""), labels.get("verb", "").upper())] += value
    return c


def attributed(before: Counter, after: Counter, bench_counts: Counter, owner_group: str,
               owner_resource: str) -> Counter:
    """(resource[/sub], VERB) -> requests the controller under test made, as far as the API
    server's metric can tell (see the module docstring)."""
    rows = {(owner_group, owner_resource, ""), (owner_group, owner_resource, "status"),
            ("", "pods", ""), ("", "events", "")}
    out: Counter = Counter()
    for key in set(after) | set(before):
        group, resource, sub, verb = key
        if (group, resource, sub) not in rows or verb not in VERBS:
            continue
        delta = after.get(key, 0) - before.get(key, 0)
        delta -= bench_counts.get((resource, sub, verb), 0)
        if delta:
            out[(resource + (f"/{sub}" if sub else ""), verb)] += delta
    return out


def by_verb(counts: Counter, jobs: int) -> dict[str, float]:
    """VERB -> requests per job, plus 'total' and 'writes'."""
    per: dict[str, float] = {v: 0.0 for v in VERBS}
    for (_res, verb), n in counts.items():
        per[verb] = per.get(verb, 0.0) + n
    out = {v: per[v] / jobs for v in per}
    out["writes"] = sum(per[v] for v in WRITE_VERBS) / jobs
    out["total"] = sum(per.values()) / jobs
    return out


def diff(after: Counter, before: Counter) -> Counter:
    out: Counter = Counter()
    for k in set(after) | set(before):
        d = after.get(k, 0) - before.get(k, 0)
        if d:
            out[k] = d
    return out
