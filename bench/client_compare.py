"""`python -m bench.client_compare`: the operator's hand-written API client
(finetune_operator.kube) against lightkube's and kubernetes_asyncio's async clients, on one
local control plane (etcd + kube-apiserver; the controllers are stopped once it is up, so
nothing else competes for the CPU).

Each client runs in a fresh interpreter, `--repeat` times, in rotating order, and measures:
 - import: time to import the client library, and RSS after the import plus one request;
 - latency: median and p95 of `--n` GETs of one TrainingJob, then `--n` merge-patches of its
   status subresource, one request in flight at a time (each patch changes status.message,
   so every one is a real write); CPU time per request of the client process.
`--baseline operator` (default) first imports what the operator process loads whatever its
client is (kopf, aiohttp, pydantic, prometheus_client, the operator's models), so the
import and RSS figures are what each client adds to the operator; `--baseline bare` measures
the client alone in an empty interpreter (ours then pulls in kopf, for ConnectionInfo).
Figures are medians over the repeats. Prints a table with ratios against ours (above 1: ours
is smaller or faster) and writes .state/client-compare-<timestamp>.json.

kopf imports kubernetes and kubernetes_asyncio whenever they are installed (to recognise
their models), so a child hides every such client except the one it measures, and that one
until its own import: the baseline is the operator image's (neither is installed there).
kubernetes_asyncio belongs in no shared environment for the same reason: install it into
`--site` (default .state/client-compare-site), which only the children see:
  pip install --no-deps --target .state/client-compare-site kubernetes_asyncio==36.1.0
(its dependencies are the sync kubernetes client's, already in the dev environment)."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLIENTS = ("ours", "lightkube", "kubernetes_asyncio")
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "trainingjobs"
MERGE = "application/merge-patch+json"
# Imported by the operator whatever its API client is (finetune_operator.kube itself excluded).
OPERATOR_BASE = ("kopf", "aiohttp", "pydantic", "prometheus_client", "finetune_operator.api",
                 "finetune_operator.config", "finetune_operator.metrics", "finetune_operator.core")
# Optional clients kopf imports when present; hidden in a child unless measured there.
OPTIONAL_CLIENTS = frozenset({"kubernetes", "kubernetes_asyncio", "lightkube", "pykube"})
DEFAULT_SITE = Path(__file__).resolve().parents[1] / ".state" / "client-compare-site"
DISTRIBUTIONS = {"ours": ("aiohttp", "kopf"), "lightkube": ("lightkube", "lightkube-models", "httpx2"),
                 "kubernetes_asyncio": ("kubernetes_asyncio", "aiohttp")}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[client-compare {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- the three clients, as a child process drives them ------------------------------------------
class Ours:
    def load(self) -> None:
        import kopf

        from finetune_operator import kube
        self.kopf, self.kube = kopf, kube

    async def open(self, kubeconfig: str) -> None:
        os.environ["KUBECONFIG"] = kubeconfig  # the operator's own login path (kopf reads it)
        info = self.kopf.login_with_kubeconfig(settings=self.kopf.OperatorSettings())
        if info is None:
            raise RuntimeError(f"no credentials in {kubeconfig}")
        self.client = self.kube.KubeClient(info)

    async def get(self, ns: str, name: str) -> Any:
        return await self.client.get(self.client.job_path(ns, name))

    async def patch_status(self, ns: str, name: str, body: dict) -> Any:
        path = self.client.job_path(ns, name) + "/status"
        return await self.client.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    async def close(self) -> None:
        await self.client.close()


class Lightkube:
    def load(self) -> None:
        from lightkube import AsyncClient, KubeConfig
        from lightkube.generic_resource import create_namespaced_resource
        from lightkube.types import PatchType
        self.AsyncClient, self.KubeConfig, self.PatchType = AsyncClient, KubeConfig, PatchType
        self.TrainingJob = create_namespaced_resource(GROUP, VERSION, "TrainingJob", PLURAL)

    async def open(self, kubeconfig: str) -> None:
        # trust_env off like aiohttp's default: the machine's CA bundle variables must not win.
        self.client = self.AsyncClient(config=self.KubeConfig.from_file(kubeconfig), trust_env=False)

    async def get(self, ns: str, name: str) -> Any:
        return await self.client.get(self.TrainingJob, name, namespace=ns)

    async def patch_status(self, ns: str, name: str, body: dict) -> Any:
        return await self.client.patch(self.TrainingJob.Status, name, body, namespace=ns,
                                       patch_type=self.PatchType.MERGE)

    async def close(self) -> None:
        await self.client.close()


class KubernetesAsyncio:
    def load(self) -> None:
        from kubernetes_asyncio import client, config
        self.k8s, self.config = client, config

    async def open(self, kubeconfig: str) -> None:
        cfg = self.k8s.Configuration()
        await self.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.api = self.k8s.ApiClient(cfg)
        self.objects = self.k8s.CustomObjectsApi(self.api)

    async def get(self, ns: str, name: str) -> Any:
        return await self.objects.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    async def patch_status(self, ns: str, name: str, body: dict) -> Any:
        return await self.objects.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, body,
                                                                        _content_type=MERGE)

    async def close(self) -> None:
        await self.api.close()


DRIVERS: dict[str, type[Ours] | type[Lightkube] | type[KubernetesAsyncio]] = {
    "ours": Ours, "lightkube": Lightkube, "kubernetes_asyncio": KubernetesAsyncio,
}


def _ms_stats(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3,
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1e3}


async def _measure(driver: Any, args: argparse.Namespace, proc: Any) -> dict:
    await driver.open(args.kubeconfig)
    try:
        t = time.perf_counter()
        await driver.get(args.namespace, args.name)
        first_ms = (time.perf_counter() - t) * 1e3
        rss_first = proc.memory_info().rss
        out: dict = {"first_request_ms": first_ms, "rss_after_first_request": rss_first}
        for op in ("get", "patch"):
            samples = []
            cpu = proc.cpu_times()
            for i in range(args.n):
                t = time.perf_counter()
                if op == "get":
                    await driver.get(args.namespace, args.name)
                else:
                    await driver.patch_status(args.namespace, args.name,
                                              {"status": {"message": f"{args.child}-{i}"}})
                samples.append(time.perf_counter() - t)
            used = proc.cpu_times()
            cpu_s = (used.user - cpu.user) + (used.system - cpu.system)
            out[op] = {**_ms_stats(samples), "mean_ms": statistics.fmean(samples) * 1e3,
                       "cpu_ms_per_request": cpu_s * 1e3 / args.n}
        out["rss_end"] = proc.memory_info().rss
        return out
    finally:
        await driver.close()


class Hidden(importlib.abc.MetaPathFinder):
    """Makes top-level packages look uninstalled (kopf catches the ImportError)."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by the benchmark)", name=fullname)
        return None


def child(args: argparse.Namespace) -> int:
    import psutil
    proc = psutil.Process()
    hidden = Hidden(set(OPTIONAL_CLIENTS))
    sys.meta_path.insert(0, hidden)
    rss_start = proc.memory_info().rss
    if args.baseline == "operator":
        for module in OPERATOR_BASE:
            importlib.import_module(module)
        assert "finetune_operator.kube" not in sys.modules, "the baseline must not contain our client"
    assert not {m.split(".")[0] for m in sys.modules} & OPTIONAL_CLIENTS, "an optional client is in the baseline"
    rss_base = proc.memory_info().rss
    driver = DRIVERS[args.child]()
    hidden.names.discard(args.child)
    t = time.perf_counter()
    driver.load()
    import_ms = (time.perf_counter() - t) * 1e3
    rss_import = proc.memory_info().rss
    result = asyncio.run(_measure(driver, args, proc))
    result.update(client=args.child, baseline=args.baseline, import_ms=import_ms, rss_start=rss_start,
                  rss_base=rss_base, rss_after_import=rss_import,
                  rss_added=result["rss_after_first_request"] - rss_base)
    print(json.dumps(result))
    return 0


# ---- the parent: control plane, rounds, table -----------------------------------------------------
def _versions(client: str) -> str:
    parts = []
    for dist in DISTRIBUTIONS[client]:
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} missing")
    return ", ".join(parts)


def _installed(client: str) -> bool:
    module = {"ours": "finetune_operator.kube"}.get(client, client)
    return importlib.util.find_spec(module) is not None


def _child_env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(client: str, args: argparse.Namespace, kubeconfig: str, namespace: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "bench.client_compare", "--child", client, "--kubeconfig", kubeconfig,
           "--namespace", namespace, "--name", name, "--n", str(args.n), "--baseline", args.baseline]
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=args.child_timeout, env=_child_env(args.site))
    if res.returncode != 0:
        raise RuntimeError(f"{client} child failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _summarize(runs: list[dict]) -> dict:
    def med(*keys: str) -> float:
        values = []
        for r in runs:
            v: Any = r
            for k in keys:
                v = v[k]
            values.append(v)
        return statistics.median(values)

    mib = 1024 * 1024
    return {"runs": len(runs), "import_ms": med("import_ms"),
            "rss_mib": med("rss_after_first_request") / mib, "rss_added_mib": med("rss_added") / mib,
            "first_request_ms": med("first_request_ms"),
            "get_p50_ms": med("get", "p50_ms"), "get_p95_ms": med("get", "p95_ms"),
            "get_cpu_ms": med("get", "cpu_ms_per_request"),
            "patch_p50_ms": med("patch", "p50_ms"), "patch_p95_ms": med("patch", "p95_ms"),
            "patch_cpu_ms": med("patch", "cpu_ms_per_request")}


COLUMNS = [("import_ms", "import ms"), ("rss_mib", "RSS MiB"), ("rss_added_mib", "+RSS MiB"),
           ("first_request_ms", "1st req ms"), ("get_p50_ms", "GET p50"), ("get_p95_ms", "GET p95"),
           ("get_cpu_ms", "GET cpu ms"), ("patch_p50_ms", "PATCH p50"), ("patch_p95_ms", "PATCH p95"),
           ("patch_cpu_ms", "PATCH cpu ms")]


def table(summary: dict[str, dict], meta: dict) -> str:
    width = max(len(c) for c in summary) + 2
    head = "client".ljust(width) + "".join(f"{title:>13}" for _, title in COLUMNS)
    lines = [f"API clients, {meta['n']} GETs + {meta['n']} status merge-patches each, median of "
             f"{meta['repeat']} fresh processes, baseline: {meta['baseline']} ({meta['cores']} cores)", head]
    for client, s in summary.items():
        lines.append(client.ljust(width) + "".join(f"{s[key]:>13.2f}" for key, _ in COLUMNS))
    if "ours" in summary:
        lines.append("")
        lines.append("ratio vs ours (above 1: ours is smaller/faster)")
        ours = summary["ours"]
        for client, s in summary.items():
            if client == "ours":
                continue
            lines.append(client.ljust(width) + "".join(
                f"{(s[key] / ours[key] if ours[key] else float('nan')):>13.2f}" for key, _ in COLUMNS))
    lines.append("")
    lines += [f"{client}: {meta['versions'][client]}" for client in summary]
    lines += [f"{client}: not measured ({why})" for client, why in meta["skipped"].items()]
    return "\n".join(lines)


def _kubectl(kubeconfig: str, *args: str, input: str | None = None) -> str:
    from finetune_testbed.cluster import kubectl_path
    res = subprocess.run([kubectl_path(), f"--kubeconfig={kubeconfig}", *args], input=input,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {res.stderr}")
    return res.stdout


def _prepare(kubeconfig: str, namespace: str, name: str) -> None:
    from finetune_testbed.cluster import REPO
    from finetune_testbed.jobs import job_manifest
    _kubectl(kubeconfig, "apply", "-f", str(REPO / "crds" / "finetune.dev_trainingjobs.yaml"))
    _kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
    _kubectl(kubeconfig, "create", "namespace", namespace)
    _kubectl(kubeconfig, "create", "-n", namespace, "-f", "-", input=json.dumps(job_manifest(name)))


def _status_message(kubeconfig: str, namespace: str, name: str) -> str:
    obj = json.loads(_kubectl(kubeconfig, "get", f"{PLURAL}.{GROUP}", name, "-n", namespace, "-o", "json"))
    return (obj.get("status") or {}).get("message", "")


def compare(args: argparse.Namespace, kubeconfig: str) -> dict:
    namespace, name = f"client-compare-{os.getpid()}", "bench"
    _prepare(kubeconfig, namespace, name)
    clients = [c for c in args.clients.split(",") if c]
    skipped = {c: "not installed" for c in clients if not _installed(c)}
    clients = [c for c in clients if c not in skipped]
    runs: dict[str, list[dict]] = {c: [] for c in clients}
    for round_ in range(args.repeat):
        order = clients[round_ % len(clients):] + clients[:round_ % len(clients)]
        for client in order:
            r = _run_child(client, args, kubeconfig, namespace, name)
            written = _status_message(kubeconfig, namespace, name)
            assert written == f"{client}-{args.n - 1}", f"{client}: the last patch did not land ({written!r})"
            log(f"round {round_ + 1}/{args.repeat} {client}: import {r['import_ms']:.0f} ms, "
                f"+RSS {r['rss_added'] / 2**20:.1f} MiB, GET p50 {r['get']['p50_ms']:.2f} ms, "
                f"PATCH p50 {r['patch']['p50_ms']:.2f} ms")
            runs[client].append(r)
    _kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")
    summary = {c: _summarize(rs) for c, rs in runs.items()}
    meta = {"n": args.n, "repeat": args.repeat, "baseline": args.baseline, "cores": os.cpu_count(),
            "python": sys.version.split()[0], "versions": {c: _versions(c) for c in clients},
            "skipped": skipped, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"meta": meta, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="GETs and merge-patches per client process")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per client")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--baseline", choices=("operator", "bare"), default="operator")
    ap.add_argument("--kubeconfig", help="use this running cluster instead of starting one")
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE,
                    help="extra packages for the children only (kubernetes_asyncio); default %(default)s")
    ap.add_argument("--child-timeout", type=float, default=300)
    ap.add_argument("--json-out", help="default: .state/client-compare-<timestamp>.json")
    ap.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    ap.add_argument("--namespace", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.site and args.site.is_dir():
        sys.path.insert(0, str(args.site))  # so that the parent finds what the children will import
    else:
        args.site = None

    if args.kubeconfig:
        result = compare(args, args.kubeconfig)
    else:
        from finetune_testbed.cluster import ClusterConfig, LocalCluster
        cluster = LocalCluster(config=ClusterConfig(gpu_nodes=0))
        try:
            cluster.start()
            log(f"control plane ready in {cluster.startup_seconds:.1f}s ({cluster.workdir})")
            for proc in ("kwok", "kube-scheduler", "kube-controller-manager"):
                cluster.procs[proc].stop()  # idle, but they share the two cores with what is measured
            result = compare(args, str(cluster.kubeconfig))
        finally:
            cluster.cleanup()
    print(table(result["summary"], result["meta"]))
    from finetune_testbed.cluster import REPO
    out = Path(args.json_out) if args.json_out else \
        REPO / ".state" / f"client-compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
