"""`make demo`: the whole product on one machine, no Docker, no GPU.

Starts the local control plane (kwok GPU nodes), a real node (kubelet + containerd) that
runs the trainer image, the operator; applies examples/demo/ (a tiny model fine-tuned for real, simulated GPU jobs);
drains the node of one simulated job mid-run and evicts the real one mid-run; shows a live
`kubectl get tj` until everything settles; prints a summary. Ctrl-C stops everything."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .cluster import REPO, LocalCluster
from .operator_proc import OperatorProcess
from .realjob import ASSETS_CLAIM, prepare_assets
from .realnode import RealNode

NS = "demo"
EXAMPLES = REPO / "examples" / "demo"
DRAINED, EVICTED = "qwen-7b-drained", "tiny-llama-local"
TERMINAL = ("Succeeded", "Failed")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Demo:
    def __init__(self, state: Path):
        self.state = state
        # Set by start(), each as soon as it exists, so stop() cleans up a partial start.
        self._cluster: LocalCluster | None = None
        self._operator: OperatorProcess | None = None
        self._node: RealNode | None = None
        self.drained_node: str | None = None
        self.evicted = False

    @property
    def cluster(self) -> LocalCluster:
        if self._cluster is None:
            raise RuntimeError("demo not started: no control plane")
        return self._cluster

    @property
    def operator(self) -> OperatorProcess:
        if self._operator is None:
            raise RuntimeError("demo not started: no operator")
        return self._operator

    @property
    def node(self) -> RealNode:
        if self._node is None:
            raise RuntimeError("demo not started: no real node")
        return self._node

    # ---- setup -------------------------------------------------------------------------
    def start(self) -> None:
        say(
            "building or reusing the control plane binaries "
            "(first run with empty Go caches: ~17 min on 2 cores, progress every 30 s)"
        )
        self._cluster = LocalCluster()
        self.cluster.start()
        say(
            f"control plane ready in {self.cluster.startup_seconds:.1f}s: etcd, kube-apiserver, "
            f"scheduler, controller-manager, kwok with {self.cluster.config.gpu_nodes} GPU nodes"
        )
        self.kubectl("apply", "-f", str(REPO / "crds"))
        self.cluster.wait_established("trainingjobs.finetune.dev")
        say(
            "starting the real node (kubelet, containerd, runc, CNI bridge; the trainer image "
            "is imported into containerd: a few minutes the first time)"
        )
        # The node's directory (claims, pod logs) outlives the demo for a look at the adapter;
        # the next demo starts it afresh.
        self._node = RealNode(self.cluster, gpus=1, workdir=self.state / "node", fresh=True)
        self.node.start()
        say(
            f"real node {self.node.name} ready in {self.node.startup_seconds:.1f}s "
            "(containerd://, 1 x nvidia.com/gpu from the fake device plugin)"
        )
        self._operator = OperatorProcess(self.cluster.kubeconfig, self.cluster.log_dir)
        self.operator.start()
        say(f"operator running (pid {self.operator.pid}), metrics at {self.operator.metrics_url}")
        say("building a tiny random Llama and a dataset on disk (no model hub)")
        assets = prepare_assets(self.state / "assets")
        self.kubectl("create", "namespace", NS)
        self.wait(lambda: self.kubectl("get", "sa", "default", "-n", NS, check=False).returncode == 0, 60)
        self.node.create_pvc(NS, ASSETS_CLAIM, path=assets)
        self.node.create_pvc(NS, "tiny-llama-ckpt")
        for path in sorted(EXAMPLES.glob("*.yaml")):
            self.cluster.kubectl("apply", "-n", NS, "-f", str(path))
            say(f"applied examples/demo/{path.name}")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, check=check, input=input)

    @staticmethod
    def wait(predicate: Callable[[], object], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.5)
        raise TimeoutError("timed out")

    # ---- the show ----------------------------------------------------------------------------
    def jobs(self) -> dict[str, dict]:
        items = self.cluster.get_json("tj", "-n", NS)["items"]
        return {j["metadata"]["name"]: j for j in items}

    def pods(self, job: str) -> list[dict]:
        return self.cluster.get_json("pods", "-n", NS, "-l", f"finetune.dev/job-name={job}")["items"]

    def disrupt(self, jobs: dict[str, dict]) -> None:
        drained = jobs.get(DRAINED, {}).get("status") or {}
        if self.drained_node is None and drained.get("phase") == "Running":
            pod = next((p for p in self.pods(DRAINED) if p["status"].get("phase") == "Running"), None)
            started = pod["status"].get("startTime") if pod is not None else None
            if pod is not None and started and time.time() - _epoch(started) > 8:
                self.drained_node = pod["spec"]["nodeName"]
                say(f"draining {self.drained_node} while {DRAINED} runs on it (kubectl drain)")
                self.kubectl(
                    "drain",
                    self.drained_node,
                    "--force",
                    "--ignore-daemonsets",
                    "--delete-emptydir-data",
                    "--timeout=60s",
                )
        if self.drained_node and drained.get("attempt", 0) >= 2 and drained.get("phase") == "Running":
            self.kubectl("uncordon", self.drained_node, check=False)
        real = jobs.get(EVICTED, {}).get("status") or {}
        step = (real.get("progress") or {}).get("step") or 0
        if not self.evicted and real.get("phase") == "Running" and real.get("attempt") == 1 and step >= 25:
            self.evicted = True
            say(
                f"evicting {EVICTED}-1 at step {step} through the Eviction API: the trainer "
                "checkpoints on SIGTERM and the next attempt resumes from it"
            )
            if not self._evict(f"{EVICTED}-1"):
                self.kubectl("delete", "pod", f"{EVICTED}-1", "-n", NS, "--wait=false", check=False)

    def _evict(self, pod: str) -> bool:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        try:
            client.CoreV1Api(api).create_namespaced_pod_eviction(
                pod, NS, client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=NS))
            )
            return True
        except Exception as exc:
            say(f"eviction refused ({exc}); deleting the pod instead")
            return False
        finally:
            api.close()

    def watch(self, timeout: float) -> dict[str, dict]:
        tty = sys.stdout.isatty()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            table = self.kubectl("get", "tj", "-n", NS).stdout.rstrip()
            if tty:
                print("\033[2J\033[H" + f"kubectl get tj -n {NS}   ({time.strftime('%H:%M:%S')})\n" + table, flush=True)
            elif table != last:
                print(f"--- kubectl get tj -n {NS} ({time.strftime('%H:%M:%S')})\n{table}", flush=True)
            last = table
            jobs = self.jobs()
            self.disrupt(jobs)
            if jobs and all((j.get("status") or {}).get("phase") in TERMINAL for j in jobs.values()):
                return jobs
            time.sleep(1)
        raise TimeoutError(f"jobs did not settle within {timeout:.0f}s")

    # ---- summary -----------------------------------------------------------------------------
    def summary(self, jobs: dict[str, dict]) -> str:
        rows = [("JOB", "PHASE", "ATTEMPTS", "FAILURES", "RESUMES", "RESUMED FROM", "FINAL LOSS", "REASON")]
        for name, job in sorted(jobs.items()):
            s = job.get("status") or {}
            resumed = "-"
            if s.get("resumes") or s.get("failures"):
                resumed = "step 0 (simulated pods keep no checkpoint)"
                for pod in self.pods(name):
                    msg = _termination(pod)
                    if msg.get("resumedFrom"):
                        resumed = f"checkpoint step {msg['resumedFrom']} ({pod['metadata']['name']})"
            loss = (s.get("progress") or {}).get("loss")
            rows.append(
                (
                    name,
                    s.get("phase", "?"),
                    str(s.get("attempt", 0)),
                    str(s.get("failures", 0)),
                    str(s.get("resumes", 0)),
                    resumed,
                    f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                    s.get("reason") or "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        real = (jobs.get(EVICTED) or {}).get("status") or {}
        output = self.node.uri_dir(NS, real.get("outputPath") or "")
        adapter = output / "adapter_model.safetensors" if output is not None else None
        lines += [
            "",
            f"operator metrics:  {self.operator.metrics_url}  (finetune_operator_*)",
            "trainer metrics:   podIP:9400/metrics while a trainer runs (finetune_trainer_*)",
            f"trainer logs:      {self.node.workdir / 'pod-logs'}",
            f"final adapter:     {real.get('outputPath') or '(none)'}",
            f"  on this machine: {adapter if adapter is not None and adapter.exists() else '(none)'}",
        ]
        return "\n".join(lines)

    def stop(self) -> None:
        for part in (self._operator,):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:
                    say(f"stopping {type(part).__name__}: {exc}")
        if self._node is not None:
            self._node.stop()
        if self._cluster is not None:
            self._cluster.cleanup()


def _epoch(ts: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _termination(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        msg = ((cs.get("state") or {}).get("terminated") or {}).get("message")
        if msg:
            try:
                return json.loads(msg)
            except ValueError:
                return {}
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = REPO / ".state" / "demo"
    state.mkdir(parents=True, exist_ok=True)
    demo = Demo(state)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.start()
        jobs = demo.watch(args.timeout)
        text = demo.summary(jobs)
        print("\n=== summary ===\n" + text, flush=True)
        (state / "summary.txt").write_text(text + "\n")
        if args.keep:
            say(f"still running; export KUBECONFIG={demo.cluster.kubeconfig}; Ctrl-C to stop")
            signal.pause()
        return 0
    except KeyboardInterrupt:
        say("interrupted: shutting everything down")
        return 130
    finally:
        demo.stop()
        say("stopped; nothing left running")


if __name__ == "__main__":
    sys.exit(main())
