"""The side-by-side table (ours vs the Job controller) and the JSON record."""
from __future__ import annotations

import math
import statistics

# (row label, key in a side's result, format)
ROWS: list[tuple[str, str, str]] = [
    ("submit N owners (s)", "submit_s", "{:.1f}"),
    ("time to create all pods, from first submit (s)", "pods_created_s", "{:.1f}"),
    ("time to all pods Running (s)", "pods_running_s", "{:.1f}"),
    ("time to all owners running (s)", "owners_running_s", "{:.1f}"),
    ("pod Running -> owner running lag, median (ms)", "running_lag_median_ms", "{:.0f}"),
    ("pod Running -> owner running lag, p99 (ms)", "running_lag_p99_ms", "{:.0f}"),
    ("pod Succeeded -> owner complete lag, median (ms)", "complete_lag_median_ms", "{:.0f}"),
    ("pod Succeeded -> owner complete lag, p99 (ms)", "complete_lag_p99_ms", "{:.0f}"),
    ("pod Succeeded -> owner complete lag, max (ms)", "complete_lag_max_ms", "{:.0f}"),
    ("all owners complete after last pod succeeded (s)", "completion_tail_s", "{:.2f}"),
    ("restart convergence, from restart (s)", "restart_convergence_s", "{:.1f}"),
    ("controller RSS with N Running (MiB) [Job: whole KCM]", "rss_at_n_running_mib", "{:.0f}"),
    ("controller RSS peak (MiB) [Job: whole KCM]", "rss_peak_mib", "{:.0f}"),
    ("controller RSS at end (MiB) [Job: whole KCM]", "rss_end_mib", "{:.0f}"),
    ("controller CPU (s) [Job: whole KCM]", "cpu_s", "{:.1f}"),
    ("controller TCP connections to the API server, peak", "api_connections_peak", "{:.0f}"),
    ("controller CPU with N Running, idle (% of a core) [Job: KCM]", "steady_cpu_pct", "{:.1f}"),
    ("  API requests/s by the controller while idle, audit log", "steady_api_per_s", "{:.2f}"),
    ("control plane CPU (s), context", "control_plane_cpu_s", "{:.1f}"),
    ("API requests/job by the controller, audit log (excl. WATCH)", "api_audit_total", "{:.2f}"),
    ("  POST/job", "api_audit_POST", "{:.2f}"),
    ("  PUT/job", "api_audit_PUT", "{:.2f}"),
    ("  PATCH/job", "api_audit_PATCH", "{:.2f}"),
    ("  DELETE/job", "api_audit_DELETE", "{:.2f}"),
    ("  GET/job", "api_audit_GET", "{:.2f}"),
    ("  LIST/job", "api_audit_LIST", "{:.2f}"),
    ("  failed (HTTP >= 400)/job", "api_audit_failed", "{:.2f}"),
    ("  WATCH streams opened (total, not per job)", "api_audit_WATCH", "{:.0f}"),
    ("API requests/job, operator's own metric (not kopf's)", "api_own_total", "{:.2f}"),
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    idx = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))
    return s[idx]


def lag_stats(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"n": 0, "median_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {"n": len(values_s), "median_ms": statistics.median(values_s) * 1000,
            "p99_ms": percentile(values_s, 0.99) * 1000, "max_ms": max(values_s) * 1000}


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return fmt.format(value)


def ratio(a, b) -> float | None:
    try:
        if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
            return None
        return a / b
    except TypeError:
        return None


def table(results: dict, meta: dict) -> tuple[str, list[dict]]:
    ours, jobs = results.get("ours", {}), results.get("jobs", {})
    rows = []
    for label, key, fmt in ROWS:
        a, b = ours.get(key), jobs.get(key)
        rows.append({"metric": label, "key": key, "ours": a, "job_controller": b,
                     "ratio": ratio(a, b), "_fmt": fmt})
    w0 = max(len(r["metric"]) for r in rows)
    head = (f"TrainingJob operator vs batch/v1 Job controller: N={meta['jobs']} jobs, "
            f"{meta['nodes']} kwok nodes x {meta['gpus_per_node']} GPUs, "
            f"cores={meta['cores']}, order={meta['order']}")
    lines = [head, f"{'metric':<{w0}}  {'ours':>10}  {'Job ctrl':>10}  {'ours/Job':>8}",
             "-" * (w0 + 34)]
    for r in rows:
        lines.append(f"{r['metric']:<{w0}}  {_fmt(r['ours'], r['_fmt']):>10}  "
                     f"{_fmt(r['job_controller'], r['_fmt']):>10}  "
                     f"{_fmt(r['ratio'], '{:.2f}'):>8}")
    for r in rows:
        r.pop("_fmt")
    return "\n".join(lines), rows
