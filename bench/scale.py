"""`python -m bench.scale` (make bench-scale): what the operator costs as TrainingJobs pile up.

Clusters keep finished jobs until their TTL, so most TrainingJobs an operator watches are
done. One local control plane (as `bench.run`), one operator with production timings, one
namespace:
 1. `--active` jobs submitted and left Running (sim outcome=run);
 2. for each point T of `--points` (ascending): finished jobs are added until T TrainingJobs
    exist (sim outcome=succeed after 1 s, submitted at `--fill-rate`/s, each waited to
    Succeeded), then, with T jobs of which `--active` Running:
    - idle: the operator's CPU, RSS and API requests (audit log) over `--steady-seconds`;
    - lag: `--probe` Running pods finish (pod Succeeded -> owner Succeeded, independent
      watch), then as many new jobs start (pod Running -> owner Running), so `--active` stays;
    - restart: SIGKILL the operator, finish `--probe` more pods while it is down, start it:
      time to /readyz, to every owner matching its pod, to its CPU going quiet; its CPU
      seconds, RSS and LIST/WATCH requests in that window; then `--probe` new jobs again.
Prints one table (a column per point) and writes .state/scale-<timestamp>.json."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune_testbed.cluster import REPO
from finetune_testbed.jobs import sim
from finetune_testbed.operator_proc import OperatorProcess

from . import apimetrics, controlplane, report, workload
from .kubeapi import Api
from .procstat import ProcSampler, wait_until
from .run import OPERATOR_ARGS, log, paced
from .watcher import Watcher, trainingjob_state

FINISHED = sim(outcome="succeed", run_for="1s")
QUIET_CPU_PCT = 5.0  # "its CPU went quiet": under this share of a core over QUIET_WINDOW_S
QUIET_WINDOW_S = 2.0

ROWS: list[tuple[str, str, str]] = [
    ("TrainingJobs (of which Running)", "label", "{}"),
    ("fill: finished jobs added", "fill_jobs", "{:.0f}"),
    ("fill: jobs/s through to Succeeded", "fill_rate", "{:.1f}"),
    ("fill: operator CPU per job (ms)", "fill_cpu_ms_per_job", "{:.1f}"),
    ("operator RSS, idle (MiB)", "rss_idle_mib", "{:.0f}"),
    ("operator RSS peak since its last start (MiB)", "rss_peak_mib", "{:.0f}"),
    ("operator CPU, idle (% of a core)", "idle_cpu_pct", "{:.2f}"),
    ("  API requests/s while idle (excl. WATCH), audit log", "idle_api_per_s", "{:.2f}"),
    ("  kube-apiserver CPU while idle (% of a core)", "idle_apiserver_cpu_pct", "{:.2f}"),
    ("kube-apiserver RSS (MiB), context", "apiserver_rss_mib", "{:.0f}"),
    ("pod Succeeded -> owner lag, median (ms)", "complete_lag_median_ms", "{:.0f}"),
    ("pod Succeeded -> owner lag, p99 (ms)", "complete_lag_p99_ms", "{:.0f}"),
    ("pod Running -> owner lag, median (ms)", "running_lag_median_ms", "{:.0f}"),
    ("pod Running -> owner lag, p99 (ms)", "running_lag_p99_ms", "{:.0f}"),
    ("restart: to /readyz (s)", "restart_ready_s", "{:.1f}"),
    ("restart: to all owners matching their pods (s)", "restart_convergence_s", "{:.1f}"),
    ("restart: to CPU quiet (s)", "restart_quiet_s", "{:.1f}"),
    ("restart: operator CPU until quiet (s)", "restart_cpu_s", "{:.1f}"),
    ("restart: operator RSS when quiet (MiB)", "restart_rss_mib", "{:.0f}"),
    ("restart: LIST requests until quiet", "restart_lists", "{:.0f}"),
    ("restart: WATCH streams opened until quiet", "restart_watches", "{:.0f}"),
    ("restart: other requests until quiet", "restart_other_requests", "{:.0f}"),
]


class Scale:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_id = uuid.uuid4().hex[:6]
        self.ns = f"scale-{self.run_id}"
        self.path = f"/apis/finetune.dev/v1alpha1/namespaces/{self.ns}/trainingjobs"
        self.pods_path = f"/api/v1/namespaces/{self.ns}/pods"
        self.pool = ThreadPoolExecutor(max(1, args.threads))
        self.sampler = ProcSampler()
        self.active: list[str] = []
        self.total = 0
        self.serial = 0
        self.on_point: Callable[[dict, list[dict]], None] | None = None  # after each point

    # ---- helpers --------------------------------------------------------------------------
    def _names(self, prefix: str, n: int) -> list[str]:
        first, self.serial = self.serial, self.serial + n
        return [f"{prefix}-{i:05d}" for i in range(first, first + n)]

    def _submit(self, names: list[str], template: dict, rate: float | None = None) -> None:
        paced(self.pool, lambda n: self.api.create(self.path, workload.trainingjob(n, self.run_id, template)),
              names, rate)
        self.total += len(names)

    def _owners_in(self, names: list[str], state: str) -> bool:
        with self.watcher.lock:
            return all(self.watcher.owners.get(n) is not None and self.watcher.owners[n].state == state
                       for n in names)

    def _finish_pods(self, owners: list[str], rate: float | None) -> None:
        pod_of = self.watcher.pod_of()
        paced(self.pool, lambda o: self.api.merge_patch(f"{self.pods_path}/{pod_of[o]}",
                                                        workload.SUCCEED_PATCH), owners, rate)

    def _start_active(self, n: int) -> list[str]:
        names = self._names("run", n)
        self._submit(names, workload.RUNNING)
        wait_until(lambda: self._owners_in(names, "running"), self.args.timeout,
                   f"{n} new jobs Running", 0.1)
        self.active += names
        return names

    def _audit(self, start: float, end: float) -> apimetrics.ApiCounts:
        return apimetrics.audit_counts(self.audit_log, start, end, apimetrics.operator_agent)["counts"]

    def _cpu(self, name: str) -> float:
        self.sampler.sample(name)
        return self.sampler.cpu_seconds(name)

    # ---- phases ---------------------------------------------------------------------------
    def fill(self, target: int, res: dict) -> None:
        n = max(0, target - self.total)
        res["fill_jobs"] = n
        if not n:
            return
        log(f"adding {n} finished jobs (to {target})")
        names = self._names("done", n)
        cpu0, t0 = self._cpu("operator"), time.monotonic()
        self._submit(names, FINISHED, self.args.fill_rate)
        wait_until(lambda: self._owners_in(names, "complete"), self.args.timeout,
                   f"{n} jobs Succeeded", 0.2)
        elapsed = time.monotonic() - t0
        res["fill_s"] = elapsed
        res["fill_rate"] = n / elapsed
        res["fill_cpu_ms_per_job"] = 1000 * (self._cpu("operator") - cpu0) / n
        log(f"{n} finished jobs in {elapsed:.0f}s")

    def idle(self, res: dict) -> None:
        time.sleep(self.args.settle_seconds)
        cpu0 = {n: self._cpu(n) for n in ("operator", "kube-apiserver")}
        t0, w0 = time.monotonic(), time.time()
        time.sleep(self.args.steady_seconds)
        elapsed, w1 = time.monotonic() - t0, time.time()
        res["idle_cpu_pct"] = 100 * (self._cpu("operator") - cpu0["operator"]) / elapsed
        res["idle_apiserver_cpu_pct"] = 100 * (self._cpu("kube-apiserver") - cpu0["kube-apiserver"]) / elapsed
        res["rss_idle_mib"] = self.sampler.rss_now_mib("operator")
        res["rss_peak_mib"] = self.sampler.rss_peak_mib("operator")
        res["apiserver_rss_mib"] = self.sampler.rss_now_mib("kube-apiserver")
        counts = self._audit(w0, w1)
        res["idle_api_detail"] = {f"{r} {v}": c for (r, v), c in sorted(counts.items())}
        res["idle_api_per_s"] = sum(c for (_r, v), c in counts.items() if v != "WATCH") / elapsed
        log(f"idle: {res['idle_cpu_pct']:.2f}% of a core, RSS {res['rss_idle_mib']:.0f} MiB")

    def lag(self, res: dict) -> None:
        k = self.args.probe
        done, self.active = self.active[:k], self.active[k:]
        self._finish_pods(done, self.args.probe_rate)
        wait_until(lambda: self._owners_in(done, "complete"), self.args.timeout,
                   f"{k} probe jobs Succeeded", 0.1)
        c = report.lag_stats(self.watcher.lags("Succeeded", "complete", owners=set(done)))
        res.update(complete_lag_median_ms=c["median_ms"], complete_lag_p99_ms=c["p99_ms"])
        started = self._start_active(k)
        r = report.lag_stats(self.watcher.lags("Running", "running", owners=set(started)))
        res.update(running_lag_median_ms=r["median_ms"], running_lag_p99_ms=r["p99_ms"])

    def restart(self, res: dict) -> None:
        k = self.args.probe
        done, self.active = self.active[:k], self.active[k:]
        self.sampler.sample("operator")
        self.op.kill()
        self._finish_pods(done, None)
        wait_until(lambda: self.watcher.count_pods("Succeeded") >= self.total - len(self.active),
                   self.args.timeout, "pods Succeeded while the operator is down", 0.1)
        w0, t0 = time.time(), time.monotonic()
        self.op.start(wait_ready=False)
        self.sampler.reset("operator")
        self.sampler.track("operator", self._pid(), from_zero=True)
        wait_until(self.op.ready, self.args.timeout, "restarted operator ready", 0.1)
        res["restart_ready_s"] = time.monotonic() - t0
        wait_until(lambda: self.watcher.inconsistent() == 0, self.args.timeout,
                   "every owner matching its pod", 0.1)
        res["restart_convergence_s"] = time.monotonic() - t0
        wait_until(self._quiet, self.args.timeout, "the restarted operator's CPU quiet", 0)
        res["restart_quiet_s"] = time.monotonic() - t0 - QUIET_WINDOW_S
        res["restart_cpu_s"] = self._cpu("operator")
        res["restart_rss_mib"] = self.sampler.rss_now_mib("operator")
        counts = self._audit(w0, time.time())
        res["restart_api_detail"] = {f"{r} {v}": c for (r, v), c in sorted(counts.items())}
        res["restart_lists"] = sum(c for (_r, v), c in counts.items() if v == "LIST")
        res["restart_watches"] = sum(c for (_r, v), c in counts.items() if v == "WATCH")
        res["restart_other_requests"] = sum(c for (_r, v), c in counts.items()
                                            if v not in ("LIST", "WATCH"))
        log(f"restart: ready {res['restart_ready_s']:.1f}s, converged "
            f"{res['restart_convergence_s']:.1f}s, quiet {res['restart_quiet_s']:.1f}s")
        self._start_active(k)

    def _quiet(self) -> bool:
        cpu0 = self._cpu("operator")
        time.sleep(QUIET_WINDOW_S)
        return 100 * (self._cpu("operator") - cpu0) / QUIET_WINDOW_S < QUIET_CPU_PCT

    def _pid(self) -> int:
        if self.op.pid is None:
            raise RuntimeError("the operator has not been started")
        return self.op.pid

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> tuple[dict, list[dict]]:
        a = self.args
        nodes = math.ceil(a.active / 8) + a.extra_nodes
        log(f"starting local control plane with {nodes} kwok GPU nodes")
        self.cluster, self.audit_log = controlplane.new_cluster(nodes)
        meta = {"active": a.active, "points": a.points, "nodes": nodes, "probe": a.probe,
                "fill_rate_per_s": a.fill_rate, "operator_args": OPERATOR_ARGS,
                "operator_python": a.operator_python,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        points: list[dict] = []
        try:
            self.api: Api = controlplane.start(self.cluster)
            controlplane.create_namespace(self.api, self.ns)
            self.sampler.api_port = self.cluster.ports["apiserver"]
            for name in controlplane.CONTROL_PLANE:
                proc = self.cluster.procs[name]
                if proc.pid is not None:
                    self.sampler.track(name, proc.pid, from_zero=False)
            self.sampler.start()
            self.op = OperatorProcess(self.cluster.kubeconfig, self.cluster.log_dir,
                                      args=OPERATOR_ARGS, python=a.operator_python).start()
            self.sampler.track("operator", self._pid(), from_zero=True)
            self.watcher = Watcher(self.api, self.ns, self.path, trainingjob_state,
                                   "finetune.dev/job-name").start()
            log(f"submitting {a.active} Running jobs")
            self._start_active(a.active)
            for target in sorted(a.points):
                res: dict = {"total": target, "label": f"{target:,} ({a.active:,})"}
                self.fill(target, res)
                self.idle(res)
                self.lag(res)
                self.restart(res)
                points.append(res)
                if self.on_point:
                    self.on_point(meta, points)
        finally:
            self.sampler.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)
            if getattr(self, "watcher", None):
                self.watcher.stop()
            if getattr(self, "op", None):
                self.op.stop()
            self.cluster.cleanup()
        return meta, points


def table(points: list[dict]) -> str:
    lines = ["| | " + " | ".join(p["label"] for p in points) + " |",
             "|---|" + "---:|" * len(points)]
    for label, key, fmt in ROWS[1:]:
        cells = []
        for p in points:
            v = p.get(key)
            cells.append("n/a" if v is None or (isinstance(v, float) and not math.isfinite(v))
                         else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1000, 3000, 10000], help="TrainingJob totals (default 1000,3000,10000)")
    p.add_argument("--active", type=int, default=1000, help="jobs kept Running (default 1000)")
    p.add_argument("--fill-rate", type=float, default=25.0,
                   help="finished jobs submitted per second (default 25)")
    p.add_argument("--probe", type=int, default=50,
                   help="pods finished for the lag and the restart probes (default 50)")
    p.add_argument("--probe-rate", type=float, default=10.0, help="lag probe completions/s")
    p.add_argument("--steady-seconds", type=float, default=30, help="idle window (default 30)")
    p.add_argument("--settle-seconds", type=float, default=15,
                   help="wait before the idle window (default 15)")
    p.add_argument("--extra-nodes", type=int, default=10,
                   help="kwok GPU nodes beyond ceil(active/8), for the jobs being filled in "
                        "(default 10: 80 GPUs)")
    p.add_argument("--threads", type=int, default=4, help="benchmark client threads")
    p.add_argument("--timeout", type=float, default=1800, help="limit of each wait (s)")
    p.add_argument("--operator-python", default=sys.executable,
                   help="the interpreter that runs the operator (as bench.run)")
    p.add_argument("--json-out", help="JSON path (default .state/scale-<timestamp>.json)")
    args = p.parse_args(argv)
    if args.active <= 2 * args.probe:
        p.error(f"--active ({args.active}) must exceed twice --probe ({args.probe})")
    if min(args.points) < args.active:
        p.error(f"every point must be at least --active ({args.active})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.json_out) if args.json_out else REPO / ".state" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(meta: dict, points: list[dict]) -> None:  # after every point: a later one may take long
        out.write_text(json.dumps({"meta": meta, "points": points}, indent=2, default=str))
    scale = Scale(args)
    scale.on_point = write
    meta, points = scale.run()
    write(meta, points)
    print(table(points))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
