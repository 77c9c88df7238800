"""`python -m bench.run` (make bench): the TrainingJob operator against the batch/v1 Job
controller on one local control plane (etcd, kube-apiserver without inflight limits,
kube-controller-manager, kube-scheduler, kwok GPU nodes).

Per side (ours = N TrainingJobs + the operator; jobs = N batch/v1 Jobs + the Job controller in
kube-controller-manager), in its own namespace, one side after the other (default ours first;
the first side's namespace is deleted and gone before the second starts):
 1. submit N owners (1 GPU each, pods stay Running: sim outcome=run);
 2. wait until all pods exist, run, and the owners say running;
 3. restart: SIGKILL the controller, make `--restart-changes` pods succeed while it is down,
    start it again, time until every owner's status matches its pod again;
 4. finish the other pods at `--rate` per second (annotation patch; kwok acts on it) and
    measure pod Succeeded -> owner complete as seen by an independent watch;
 5. RSS/CPU (psutil), API requests (own counter and API server attribution).
Prints one table and writes .state/bench-<timestamp>.json."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from finetune_testbed.cluster import REPO, LocalCluster
from finetune_testbed.operator_proc import OperatorProcess
from finetune_testbed.procs import Proc

from . import apimetrics, controlplane, profiling, report, workload
from .kubeapi import Api
from .procstat import ProcSampler, wait_until
from .watcher import Watcher, job_state, trainingjob_state

# Production defaults of finetune_operator/config.py, spelled out so a change of default
# does not silently change what the benchmark measures.
OPERATOR_ARGS = ["--timer-interval", "30", "--progress-interval", "10",
                 "--progress-write-interval", "15", "--node-lost-seconds", "60",
                 "--log-level", "INFO"]
CONTROL_PLANE = controlplane.CONTROL_PLANE
T0 = time.monotonic()
T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _started_pid(pid: int | None, what: str) -> int:
    """The pid of a process that has been started (psutil.Process(None) would be this one)."""
    if pid is None:
        raise RuntimeError(f"{what} has not been started")
    return pid


# ---- the two sides --------------------------------------------------------------------------
class Side:
    key = ""
    title = ""
    group = resource = ""
    pod_owner_label = ""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.namespace = f"bench-{self.key}-{ctx.run_id}"

    def owner_path(self) -> str:
        raise NotImplementedError

    def manifest(self, name: str) -> dict:
        raise NotImplementedError

    def owner_state(self, obj: dict) -> str | None:
        raise NotImplementedError

    @staticmethod
    def agent(ua: str) -> bool:
        """Whether a request with this user agent was made by the controller under test."""
        raise NotImplementedError

    def setup(self) -> None: ...
    def idle_begins(self) -> None: ...
    def idle_ends(self, res: dict) -> None: ...
    def before_kill(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...
    def finish(self) -> dict: return {}
    def teardown(self) -> None: ...


class OperatorSide(Side):
    key, title = "ours", "TrainingJob operator"
    group, resource = "finetune.dev", "trainingjobs"
    pod_owner_label = "finetune.dev/job-name"
    agent = staticmethod(apimetrics.operator_agent)

    def owner_path(self) -> str:
        return f"/apis/finetune.dev/v1alpha1/namespaces/{self.namespace}/trainingjobs"

    def manifest(self, name: str) -> dict:
        return workload.trainingjob(name, self.ctx.run_id)

    def owner_state(self, obj: dict) -> str | None:
        return trainingjob_state(obj)

    def setup(self) -> None:
        c = self.ctx
        env = ({"PYTHONPATH": os.pathsep.join([c.args.operator_src, os.environ.get("PYTHONPATH", "")])}
               if c.args.operator_src else None)
        self.op = OperatorProcess(c.cluster.kubeconfig, c.cluster.log_dir, args=c.operator_args,
                                  python=c.operator_python, env=env)
        self.op.start()
        c.sampler.track("controller", _started_pid(self.op.pid, "operator"), from_zero=True)
        self.counts: apimetrics.ApiCounts = Counter()
        self.base = apimetrics.operator_counts(self.op.metrics_text())
        self.profiles: list[str] = []
        self.profiler = self._profile("run")

    def _profile(self, tag: str) -> profiling.Profiler | None:
        if not self.ctx.args.profile:
            return None
        out = self.ctx.state_dir / f"bench-{self.ctx.stamp}-profile-{tag}.txt"
        return profiling.Profiler(_started_pid(self.op.pid, "operator"), out,
                                  rate=self.ctx.args.profile_rate)

    def _stop_profiler(self) -> None:
        if self.profiler:
            path = self.profiler.stop()
            if path:
                self.profiles.append(str(path))
            self.profiler = None

    def idle_begins(self) -> None:
        # the idle window gets its own profile (the "run" one covers the burst)
        self._stop_profiler()
        self.profiler = self._profile("idle")
        self.idle_metrics = self.op.metrics_text()

    def idle_ends(self, res: dict) -> None:
        self._stop_profiler()
        self.profiler = self._profile("run-after-idle")
        res["steady_operator_metrics"] = apimetrics.idle_activity(self.idle_metrics,
                                                                  self.op.metrics_text())

    def _scrape(self) -> apimetrics.ApiCounts:
        return apimetrics.operator_counts(self.op.metrics_text())

    def before_kill(self) -> None:
        self.counts += apimetrics.diff(self._scrape(), self.base)
        self._stop_profiler()

    def kill(self) -> None:
        self.ctx.sampler.sample("controller")
        self.op.kill()

    def restart(self) -> None:
        self.op.start(wait_ready=False)
        self.ctx.sampler.track("controller", _started_pid(self.op.pid, "operator"), from_zero=True)
        self.base = Counter()
        if self.ctx.args.profile:
            wait_until(self.op.ready, 60, "restarted operator ready")
            self.profiler = self._profile("after-restart")

    def finish(self) -> dict:
        self._stop_profiler()
        self.counts += apimetrics.diff(self._scrape(), self.base)
        own = apimetrics.by_verb(self.counts, self.ctx.n)
        summaries = {}
        for path in self.profiles:
            s = profiling.summarize(Path(path))
            summaries[path] = s
            log(f"{path}\n{profiling.format_summary(s)}")
        return {"api_own": own, "api_own_detail": {f"{r} {v}": n for (r, v), n in
                                                   sorted(self.counts.items())},
                "api_own_total": own["total"], "api_own_writes": own["writes"],
                "profiles": summaries}

    def teardown(self) -> None:
        self._stop_profiler()
        self.op.stop()


class JobSide(Side):
    key, title = "jobs", "batch/v1 Job controller"
    group, resource = "batch", "jobs"
    pod_owner_label = "batch.kubernetes.io/job-name"
    agent = staticmethod(apimetrics.job_controller_agent)

    def owner_path(self) -> str:
        return f"/apis/batch/v1/namespaces/{self.namespace}/jobs"

    def manifest(self, name: str) -> dict:
        return workload.batch_job(name, self.ctx.run_id)

    def owner_state(self, obj: dict) -> str | None:
        return job_state(obj)

    @property
    def kcm(self) -> Proc:
        return self.ctx.cluster.procs["kube-controller-manager"]

    def setup(self) -> None:
        self.ctx.sampler.track("controller", _started_pid(self.kcm.pid, self.kcm.name), from_zero=False)

    def kill(self) -> None:
        self.ctx.sampler.sample("controller")
        self.kcm.kill()

    def restart(self) -> None:
        self.kcm.start()
        self.ctx.sampler.track("controller", _started_pid(self.kcm.pid, self.kcm.name), from_zero=True)

    def finish(self) -> dict:
        return {"api_own_total": None, "api_own_writes": None}


SIDES: dict[str, type[Side]] = {"ours": OperatorSide, "jobs": JobSide}


# ---- one side's run ---------------------------------------------------------------------------
class Context:
    def __init__(self, args: argparse.Namespace, cluster: LocalCluster, audit_log: Path):
        self.args = args
        self.n = args.jobs
        self.run_id = uuid.uuid4().hex[:6]
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.state_dir = Path(args.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.operator_args = args.operator_args or OPERATOR_ARGS
        self.operator_python = args.operator_python
        self.cluster = cluster
        self.audit_log = audit_log  # the API server's audit log (apimetrics)
        self._api: Api | None = None
        self.sampler = ProcSampler()
        self.pool = ThreadPoolExecutor(max(1, args.threads))
        self.last_side: Side | None = None

    @property
    def api(self) -> Api:
        """The benchmark's client, set once the control plane is up."""
        if self._api is None:
            raise RuntimeError("bench Context.api: the control plane is not up yet")
        return self._api

    @api.setter
    def api(self, api: Api) -> None:
        self._api = api


def _names(n: int) -> list[str]:
    return [f"bj-{i:05d}" for i in range(n)]


def _delete_namespace(ctx: Context, ns: str, timeout: float) -> float:
    t = time.monotonic()
    controlplane.delete_namespace(ctx.api, ns, timeout)
    return time.monotonic() - t


def paced(pool: ThreadPoolExecutor, fn: Callable[[T], object], items: Sequence[T],
          rate: float | None) -> None:
    """Calls fn(item) at `rate` per second (started on schedule, run on the pool; None: all
    at once) and waits for every call."""
    start, futures = time.monotonic(), []
    for i, item in enumerate(items):
        delay = start + i / rate - time.monotonic() if rate else 0
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(fn, item))
    for f in futures:
        f.result()


def _cp_cpu(ctx: Context) -> float:
    return sum(ctx.sampler.cpu_seconds(n) for n in CONTROL_PLANE)


def warm_up(ctx: Context) -> None:
    """One suspended owner of each kind, created and deleted before anything is measured:
    the API server's quota admission loads its evaluator for a new resource on the first
    create (about 2 s, once per fresh CRD), which is no property of either controller."""
    ns = f"bench-warmup-{ctx.run_id}"
    controlplane.create_namespace(ctx.api, ns)
    owners: list[tuple[type[Side], str]] = [
        (OperatorSide, f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/trainingjobs"),
        (JobSide, f"/apis/batch/v1/namespaces/{ns}/jobs")]
    for side_cls, path in owners:
        body = side_cls(ctx).manifest("warmup")
        body["spec"]["suspend"] = True
        ctx.api.create(path, body)
        ctx.api.request("DELETE", f"{path}/warmup")
    ctx.api.request("DELETE", f"/api/v1/namespaces/{ns}")


def audit_api(ctx: Context, side: Side, res: dict) -> None:
    """Requests per job by the controller under test, from the audit log (apimetrics)."""
    path = ctx.audit_log
    got = apimetrics.audit_counts(path, res["window_start"], res["window_end"], side.agent)
    per = apimetrics.by_verb(got["counts"], ctx.n)
    res["api_audit"] = per
    res["api_audit_total"] = per["total"]
    for verb in apimetrics.VERBS:
        res[f"api_audit_{verb}"] = per[verb]
    res["api_audit_WATCH"] = sum(c for (_r, v), c in got["counts"].items() if v == "WATCH")
    res["api_audit_failed"] = sum(got["failed"].values()) / ctx.n
    res["api_audit_detail"] = {f"{r} {v}": c for (r, v), c in sorted(got["counts"].items())}
    res["api_audit_failed_detail"] = {f"{r} {v} {code}": c
                                      for (r, v, code), c in sorted(got["failed"].items())}
    res["api_audit_agents"] = dict(got["agents"])
    if "steady_window" in res:  # what the controller asked of the API server while idle
        w = res["steady_window"]
        idle = apimetrics.audit_counts(path, w["start"], w["end"], side.agent)["counts"]
        res["steady_api_detail"] = {f"{r} {v}": c for (r, v), c in sorted(idle.items())}
        res["steady_api_per_s"] = sum(c for (_r, v), c in idle.items() if v != "WATCH") / w["seconds"]
    if isinstance(side, JobSide):
        kcm = apimetrics.audit_counts(path, res["window_start"], res["window_end"],
                                      apimetrics.kcm_informer_agent)
        res["api_audit_kcm_informers"] = {f"{r} {v}": c for (r, v), c in
                                          sorted(kcm["counts"].items())}


def _submit(ctx: Context, side: Side, watcher: Watcher, names: list[str], res: dict) -> None:
    """Phases 1-2: submit N owners; time to pods created, pods Running, owners running."""
    n, api, wait = ctx.n, ctx.api, ctx.args.timeout
    log(f"{side.key}: submitting {n} owners")
    t0 = time.monotonic()
    create_s: list[float] = []

    def create(name: str) -> None:
        t = time.monotonic()
        api.create(side.owner_path(), side.manifest(name))
        create_s.append(time.monotonic() - t)
    paced(ctx.pool, create, names, None)
    res["submit_s"] = time.monotonic() - t0
    res["create_call_ms"] = report.lag_stats(create_s)
    log(f"{side.key}: {n} owners submitted in {res['submit_s']:.1f}s "
        f"(create call p50 {res['create_call_ms']['median_ms']:.0f} ms)")
    wait_until(lambda: watcher.count_pods() >= n, wait, f"{n} pods created", 0.05)
    res["pods_created_s"] = max(watcher.added_times("pod")) - t0
    log(f"{side.key}: all {n} pods exist after {res['pods_created_s']:.1f}s")
    wait_until(lambda: watcher.count_pods("Running") >= n, wait, f"{n} pods Running", 0.05)
    res["pods_running_s"] = max(watcher.first_time("pod", "Running")) - t0
    wait_until(lambda: watcher.count_owners("running") >= n, wait, f"{n} owners running", 0.05)
    res["owners_running_s"] = max(watcher.first_time("owner", "running")) - t0
    lag = report.lag_stats(watcher.lags("Running", "running"))
    res.update(running_lag_median_ms=lag["median_ms"], running_lag_p99_ms=lag["p99_ms"],
               running_lag_max_ms=lag["max_ms"])
    log(f"{side.key}: all owners running after {res['owners_running_s']:.1f}s")


def _steady_state(ctx: Context, side: Side, res: dict) -> None:
    """N jobs Running, nothing changing: what the controller costs to hold them. The window
    opens `--settle-seconds` after the last owner went running, so the tail of the burst
    (the last status writes and Events still in flight) is not counted as idle."""
    time.sleep(ctx.args.settle_seconds)
    side.idle_begins()
    ctx.sampler.sample()
    cpu0, t_s, w0 = ctx.sampler.cpu_seconds("controller"), time.monotonic(), time.time()
    cp0 = {n: ctx.sampler.cpu_seconds(n) for n in CONTROL_PLANE}
    time.sleep(ctx.args.steady_seconds)
    ctx.sampler.sample()
    elapsed = max(1e-9, time.monotonic() - t_s)
    res["steady_cpu_pct"] = 100 * (ctx.sampler.cpu_seconds("controller") - cpu0) / elapsed
    res["steady_control_plane_cpu_pct"] = {
        n: round(100 * (ctx.sampler.cpu_seconds(n) - cp0[n]) / elapsed, 2) for n in CONTROL_PLANE}
    res["steady_window"] = {"start": w0, "end": time.time(), "seconds": elapsed,
                            "settle_seconds": ctx.args.settle_seconds}
    res["rss_at_n_running_mib"] = ctx.sampler.rss_now_mib("controller")
    res["api_connections_at_n_running"] = ctx.sampler.connections("controller")[0]
    side.idle_ends(res)
    log(f"{side.key}: idle with {ctx.n} running: {res['steady_cpu_pct']:.2f}% of a core over "
        f"{elapsed:.0f}s, RSS {res['rss_at_n_running_mib']:.0f} MiB")


def _restart(ctx: Context, side: Side, watcher: Watcher, changed_owners: list[str], pod_of: dict[str, str],
             res: dict) -> None:
    """Phase 3: pods complete while the controller is down; time to converge after its restart."""
    api, wait, k = ctx.api, ctx.args.timeout, len(changed_owners)
    pods_path = f"/api/v1/namespaces/{side.namespace}/pods"
    side.before_kill()
    side.kill()
    t_kill = time.monotonic()
    paced(ctx.pool, lambda o: api.merge_patch(f"{pods_path}/{pod_of[o]}",
                                              workload.SUCCEED_PATCH), changed_owners, None)
    wait_until(lambda: watcher.count_pods("Succeeded") >= k, wait,
               f"{k} pods Succeeded while the controller is down", 0.05)
    res["inconsistent_at_restart"] = watcher.inconsistent()
    t_restart = time.monotonic()
    side.restart()
    wait_until(lambda: watcher.inconsistent() == 0, wait, "all owners match their pods", 0.05)
    res["restart_convergence_s"] = time.monotonic() - t_restart
    with watcher.lock:
        res["restart_owner_times"] = sorted(
            round(watcher.owners[o].times.get("complete", float("nan")) - t_restart, 3)
            for o in changed_owners)
    res["restart"] = {"changed_pods": k, "down_s": t_restart - t_kill,
                      "convergence_s": res["restart_convergence_s"]}
    log(f"{side.key}: restart with {k} changed pods converged in "
        f"{res['restart_convergence_s']:.1f}s")


def _complete(ctx: Context, side: Side, watcher: Watcher, rest: list[str], pod_of: dict[str, str],
              res: dict) -> None:
    """Phase 4: complete the remaining pods at a fixed rate; lag from pod to owner."""
    n, api, wait, rate = ctx.n, ctx.api, ctx.args.timeout, ctx.args.rate
    pods_path = f"/api/v1/namespaces/{side.namespace}/pods"
    log(f"{side.key}: completing {len(rest)} pods at {rate:g}/s")
    t_c = time.monotonic()
    paced(ctx.pool, lambda o: api.merge_patch(f"{pods_path}/{pod_of[o]}",
                                              workload.SUCCEED_PATCH), rest, rate)
    wait_until(lambda: watcher.count_owners("complete") >= n, wait, f"{n} owners complete",
               0.05)
    # the two watch streams are independent: an owner's event can arrive before its pod's
    wait_until(lambda: watcher.count_pods("Succeeded") >= n, wait, f"{n} pods Succeeded", 0.05)
    res["completion_phase_s"] = time.monotonic() - t_c
    lags = watcher.lags("Succeeded", "complete", owners=set(rest))
    c = report.lag_stats(lags)
    res.update(complete_lag_n=c["n"], complete_lag_median_ms=c["median_ms"],
               complete_lag_p99_ms=c["p99_ms"], complete_lag_max_ms=c["max_ms"])
    with watcher.lock:
        last_pod = max(watcher.pods[pod_of[o]].times["Succeeded"] for o in rest)
        last_owner = max(watcher.owners[o].times["complete"] for o in rest)
    res["completion_tail_s"] = last_owner - last_pod
    log(f"{side.key}: all owners complete; lag median {c['median_ms']:.0f} ms, "
        f"p99 {c['p99_ms']:.0f} ms")


def _resources(ctx: Context, side: Side, watcher: Watcher, res: dict) -> None:
    """Phase 5: memory, CPU and connections of the controller and the control plane."""
    ctx.sampler.sample()
    res.update(side.finish())
    res["window_end"] = time.time()
    res["rss_peak_mib"] = ctx.sampler.rss_peak_mib("controller")
    res["rss_end_mib"] = ctx.sampler.rss_now_mib("controller")
    res["cpu_s"] = ctx.sampler.cpu_seconds("controller")
    res["api_connections_peak"] = ctx.sampler.connections("controller")[1]
    res["control_plane_cpu_s"] = _cp_cpu(ctx)
    res["control_plane_cpu_detail"] = {nm: ctx.sampler.cpu_seconds(nm) for nm in CONTROL_PLANE}
    res["watch_errors"] = sum(s.errors for s in watcher.streams)


def run_side(ctx: Context, side: Side) -> dict:
    res: dict = {"side": side.title, "namespace": side.namespace}
    controlplane.create_namespace(ctx.api, side.namespace)
    ctx.sampler.reset("controller")
    for name in CONTROL_PLANE:
        ctx.sampler.reset(name)
        ctx.sampler.track(name, _started_pid(ctx.cluster.procs[name].pid, name), from_zero=False)
    side.setup()
    watcher = Watcher(ctx.api, side.namespace, side.owner_path(), side.owner_state,
                      side.pod_owner_label).start()
    names = _names(ctx.n)
    try:
        res["window_start"] = time.time()
        _submit(ctx, side, watcher, names, res)
        _steady_state(ctx, side, res)
        if ctx.args.stop_after == "idle":
            _resources(ctx, side, watcher, res)
            return res
        k = min(ctx.args.restart_changes, ctx.n // 2)
        pod_of = watcher.pod_of()
        _restart(ctx, side, watcher, names[:k], pod_of, res)
        _complete(ctx, side, watcher, names[k:], pod_of, res)
        _resources(ctx, side, watcher, res)
        return res
    finally:
        watcher.stop()
        try:
            if ctx.args.cleanup and side is not ctx.last_side:
                res["cleanup_s"] = _delete_namespace(ctx, side.namespace, ctx.args.timeout)
                log(f"{side.key}: namespace deleted in {res['cleanup_s']:.1f}s")
        finally:
            side.teardown()


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000, help="N owners per side (default 1000)")
    p.add_argument("--extra-nodes", type=int, default=2,
                   help="kwok GPU nodes beyond ceil(N/8) (default 2)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="pod completions per second in the lag phase (default 20)")
    p.add_argument("--restart-changes", type=int, default=100,
                   help="pods made to succeed while the controller is down (capped at N/2)")
    p.add_argument("--steady-seconds", type=float, default=20,
                   help="idle window with all N Running, for the steady-state CPU row")
    p.add_argument("--settle-seconds", type=float, default=10,
                   help="wait after all owners run before the idle window opens (default 10)")
    p.add_argument("--stop-after", choices=("all", "idle"), default="all",
                   help="idle: end each side after the idle window (no restart, no "
                        "completion phase): the idle cost alone, cheaply")
    p.add_argument("--operator-src",
                   help="directory put first on the operator's PYTHONPATH (e.g. another "
                        "checkout's operator/), for A/B runs of two versions in one session")
    p.add_argument("--order", choices=("ours-first", "jobs-first"), default="ours-first")
    p.add_argument("--only", choices=("ours", "jobs"), help="run one side only")
    p.add_argument("--timeout", type=float, default=600, help="limit of each wait (s)")
    p.add_argument("--threads", type=int, default=4, help="benchmark client threads")
    p.add_argument("--no-cleanup", dest="cleanup", action="store_false",
                   help="keep the first side's namespace while the second runs")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the operator (before the kill and after the restart)")
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples/s")
    p.add_argument("--operator-arg", dest="operator_args", action="append",
                   help="replace the operator's arguments (repeat per argument)")
    p.add_argument("--operator-python", default=sys.executable,
                   help="the interpreter that runs the operator; `make bench` passes one from a "
                        "venv with only the operator's own dependencies, as in the image (the "
                        "dev venv's kubernetes client, which kopf imports when present, adds "
                        "about 10 MiB of RSS)")
    p.add_argument("--state-dir", default=str(REPO / ".state"))
    p.add_argument("--json-out", help="JSON path (default .state/bench-<timestamp>.json)")
    return p.parse_args(argv)


def _finite(value: object) -> object:
    """NaN/inf -> null, so the record is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    order = ["ours", "jobs"] if args.order == "ours-first" else ["jobs", "ours"]
    if args.only:
        order = [args.only]
    n = args.jobs
    nodes = math.ceil(n / 8) + args.extra_nodes
    log(f"starting local control plane with {nodes} kwok GPU nodes")
    cluster, audit_log = controlplane.new_cluster(nodes)
    ctx = Context(args, cluster, audit_log)
    meta = {"jobs": n, "nodes": nodes, "gpus_per_node": 8, "cores": os.cpu_count(),
            "order": " then ".join(order), "rate_per_s": args.rate,
            "restart_changes": min(args.restart_changes, n // 2),
            "operator_args": ctx.operator_args,
            "operator_python": ctx.operator_python,
            "kcm": "--kube-api-qps=100 --kube-api-burst=200 --concurrent-job-syncs=5 (default)",
            "apiserver": "no inflight limits, APF off (ClusterConfig.no_limits); audit log "
                         "level Metadata (blocking file backend) for the API accounting",
            "measured_by": "independent watch client in the benchmark process (monotonic clock)",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results: dict = {}
    t_start = time.monotonic()
    try:
        ctx.api = controlplane.start(cluster)
        log(f"control plane ready in {cluster.startup_seconds:.1f}s ({cluster.workdir})")
        ctx.sampler.api_port = cluster.ports["apiserver"]
        warm_up(ctx)
        ctx.sampler.start()
        sides = [SIDES[k](ctx) for k in order]
        ctx.last_side = sides[-1]
        for side in sides:
            t = time.monotonic()
            results[side.key] = run_side(ctx, side)
            results[side.key]["wall_s"] = time.monotonic() - t
        for side in sides:
            audit_api(ctx, side, results[side.key])
    finally:
        ctx.sampler.stop()
        ctx.pool.shutdown(wait=False, cancel_futures=True)
        if os.environ.get("FINETUNE_KEEP_CLUSTER_DIR"):
            log(f"cluster directory kept: {cluster.workdir}")
        cluster.cleanup()
    meta["wall_s"] = time.monotonic() - t_start
    text, rows = report.table(results, meta)
    print(text)
    out = Path(args.json_out) if args.json_out else ctx.state_dir / f"bench-{ctx.stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite({"meta": meta, "table": rows, "results": results}),
                              indent=2, default=str))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
