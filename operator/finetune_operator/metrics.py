"""Operator metrics (names fixed in docs/CONTRACTS.md). Labels stay bounded:
namespace, phase, reason, verb — never pod or job names."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from .version import PYTHON_VERSION, __version__

REGISTRY = CollectorRegistry(auto_describe=True)
P = "finetune_operator_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LONG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

TRANSITIONS = Counter(P + "transitions_total", "Phase transitions of TrainingJobs.",
                      ["namespace", "from_phase", "to_phase", "reason"], registry=REGISTRY)
ATTEMPTS = Counter(P + "attempts_total", "Attempts (pods) started.", ["namespace"],
                   registry=REGISTRY)
RESUMES = Counter(P + "resumes_total", "Interrupted attempts that will resume.",
                  ["namespace", "reason"], registry=REGISTRY)
FAILURES = Counter(P + "failures_total", "Attempts that failed (count against backoffLimit).",
                   ["namespace", "reason"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(P + "reconcile_duration_seconds", "Time for one reconcile.",
                              ["trigger"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
RECONCILE_ERRORS = Counter(P + "reconcile_errors_total", "Reconciles that raised.",
                           ["trigger"], registry=REGISTRY)
STATUS_LAG = Histogram(P + "status_lag_seconds",
                       "Pod change observed by the operator until the job status was written.",
                       buckets=LATENCY_BUCKETS, registry=REGISTRY)
STALE_CORRECTIONS = Counter(P + "stale_corrections_total",
                            "Timer reconciles that found a job's status wrong (missed event).",
                            ["namespace"], registry=REGISTRY)
API_REQUESTS = Counter(P + "api_requests_total", "Kubernetes API requests.",
                       ["verb", "resource", "code"], registry=REGISTRY)
QUEUED_SECONDS = Histogram(P + "queued_seconds", "Time from creation until the first attempt ran.",
                           buckets=LONG_BUCKETS, registry=REGISTRY)
TIME_TO_FIRST_STEP = Histogram(P + "time_to_first_step_seconds",
                               "Time from creation until the trainer reported its first step.",
                               buckets=LONG_BUCKETS, registry=REGISTRY)
INTERRUPTED_GPU_SECONDS = Counter(P + "interrupted_gpu_seconds_total",
                                  "GPU-seconds of attempts that ended in an interruption.",
                                  ["namespace", "reason"], registry=REGISTRY)
PROGRESS_SCRAPES = Counter(P + "progress_scrapes_total",
                           "Reads of trainers' metrics endpoints by result (ok, unreachable).",
                           ["result"], registry=REGISTRY)
LEADER = Gauge(P + "leader", "1 on the replica that holds the leader Lease (always 1 without "
               "--leader-elect), 0 on a standby.", registry=REGISTRY)
for _trigger in ("job", "pod", "timer"):
    RECONCILE_ERRORS.labels(_trigger)  # exported at 0 so the first error is an increase
API_READY = Gauge(P + "api_ready", "1 when the last Kubernetes API call succeeded.",
                  registry=REGISTRY)
# prometheus_client's Info: exposed as the gauge finetune_operator_build_info{version,python} 1.
BUILD_INFO = Info(P + "build", "The operator's version (operator/pyproject.toml) and Python version.",
                  registry=REGISTRY)
BUILD_INFO.info({"version": __version__, "python": PYTHON_VERSION})


class FleetCollector:
    """Gauges computed at scrape time from the operator's current view of the jobs,
    so they are right after a restart (no counters to rebuild)."""

    PHASES = ("Queued", "Starting", "Running", "Resuming", "Suspended", "Succeeded", "Failed")

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, dict[str, Any]]]]):
        self._snapshot = snapshot  # (namespace, job_metrics.fleet_row) per job

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(P + "jobs", "TrainingJobs by phase.", labels=["namespace", "phase"])
        oldest = GaugeMetricFamily(P + "oldest_queued_seconds",
                                   "Seconds the oldest Queued job has waited (since its attempt "
                                   "started).", labels=["namespace"])
        stalled = GaugeMetricFamily(P + "stalled_jobs",
                                    "Running jobs whose trainer reported no step for longer than "
                                    "their stall timeout (1800 s when unset).", labels=["namespace"])
        counts: dict[tuple[str, str], int] = {}
        oldest_by_ns: dict[str, float] = {}
        stalled_by_ns: dict[str, int] = {}
        namespaces: set[str] = set()
        for ns, row in self._snapshot():
            namespaces.add(ns)
            phase = row.get("phase") or "Queued"
            counts[(ns, phase)] = counts.get((ns, phase), 0) + 1
            if phase == "Queued" and row.get("queued_for") is not None:
                oldest_by_ns[ns] = max(oldest_by_ns.get(ns, 0.0), row["queued_for"])
            if row.get("stalling"):
                stalled_by_ns[ns] = stalled_by_ns.get(ns, 0) + 1
        for ns in sorted(namespaces):
            for phase in self.PHASES:
                jobs.add_metric([ns, phase], counts.get((ns, phase), 0))
            oldest.add_metric([ns], oldest_by_ns.get(ns, 0.0))
            stalled.add_metric([ns], stalled_by_ns.get(ns, 0))
        yield jobs
        yield oldest
        yield stalled
