"""`python -m finetune_testbed up|down|status|serve` — the local control plane for people,
with `--real-node` (REAL_NODE=1) a real node too (finetune_testbed.realnode), with `--kueue`
(KUEUE=1) Kueue's manager (finetune_testbed.kueue).

`up` starts a background server process that owns the components and prints the
KUBECONFIG to use; `down` stops it (and with it every component)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .cluster import REPO, ClusterConfig, LocalCluster

STATE_DIR = Path(os.environ.get("FINETUNE_STATE_DIR", REPO / ".state"))
STATE_FILE = STATE_DIR / "cluster.json"


def _read_state() -> dict | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def serve(args) -> int:
    workdir = STATE_DIR / "cluster"
    if workdir.exists():
        import shutil
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(workdir, config=ClusterConfig(gpu_nodes=args.nodes,
                                                         gpus_per_node=args.gpus))
    cluster.start()
    node = None
    kueue = None
    extra: dict = {}
    try:
        if args.kueue:
            from .kueue import MANAGED_LABEL, MANAGED_VALUE, Kueue
            kueue = Kueue(cluster).start()
            extra["kueue_namespace_label"] = f"{MANAGED_LABEL}={MANAGED_VALUE}"
        if args.real_node:
            from .realnode import RealNode
            # Beside the cluster's directory, not in it: the rmtree above must never meet
            # the mounts a killed node left (RealNode sweeps them before emptying its own).
            node = RealNode(cluster, gpus=args.real_node_gpus, workdir=STATE_DIR / "node",
                            fresh=True)
            node.start()
            startup = node.startup_seconds  # set by start()
            extra = {"real_node": node.name, "real_node_startup_seconds":
                     round(startup, 1) if startup is not None else None,
                     "real_node_logs": str(node.log_dir)}
        STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "ready": True,
                                          "startup_seconds": round(cluster.startup_seconds, 1),
                                          **cluster.summary(), **extra}))
        while not stop.wait(1.0):
            procs = {**cluster.procs, **(node.procs if node else {})}
            dead = [n for n, p in procs.items() if not p.running()]
            if dead:
                print(f"component(s) exited: {dead}; see {cluster.log_dir}", file=sys.stderr)
                return 1
    finally:
        if node is not None:
            node.stop()
        if kueue is not None:
            kueue.stop()
        cluster.stop()
        STATE_FILE.unlink(missing_ok=True)
    return 0


def up(args) -> int:
    state = _read_state()
    if state and _alive(state["pid"]):
        print(f"already running\nexport KUBECONFIG={state['kubeconfig']}")
        return 0
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.unlink(missing_ok=True)
    log = open(STATE_DIR / "cluster-server.log", "ab")
    t0 = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "finetune_testbed", "serve",
                               "--nodes", str(args.nodes), "--gpus", str(args.gpus),
                               *(["--real-node"] if args.real_node else []),
                               *(["--kueue"] if args.kueue else []),
                               "--real-node-gpus", str(args.real_node_gpus)],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    print("starting the local control plane (first run builds the binaries: see "
          f"{STATE_DIR / 'cluster-server.log'}) ...", file=sys.stderr)
    while True:
        state = _read_state()
        if state and state.get("ready"):
            break
        if server.poll() is not None:
            print((STATE_DIR / "cluster-server.log").read_text()[-3000:], file=sys.stderr)
            print(f"cluster server exited with {server.returncode}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"ready in {time.monotonic() - t0:.1f}s (components {state['startup_seconds']}s); "
          f"{args.nodes} kwok GPU nodes x {args.gpus} nvidia.com/gpu", file=sys.stderr)
    if state.get("real_node"):
        print(f"real node {state['real_node']} (kubelet + containerd, "
              f"{args.real_node_gpus} x nvidia.com/gpu) ready in "
              f"{state['real_node_startup_seconds']}s; logs in {state['real_node_logs']}",
              file=sys.stderr)
    if state.get("kueue_namespace_label"):
        print(f"Kueue runs; it manages the pods of namespaces labelled {state['kueue_namespace_label']}",
              file=sys.stderr)
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


def down(_args) -> int:
    state = _read_state()
    if not state or not _alive(state["pid"]):
        print("not running")
        STATE_FILE.unlink(missing_ok=True)
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state["pid"]):
        os.kill(state["pid"], signal.SIGKILL)
    print("stopped")
    return 0


def status(_args) -> int:
    state = _read_state()
    if state and _alive(state["pid"]):
        print(json.dumps(state, indent=2))
        return 0
    print("not running")
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="finetune_testbed")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn in (("up", up), ("serve", serve)):
        p = sub.add_parser(name)
        p.add_argument("--nodes", type=int, default=int(os.environ.get("GPU_NODES", 4)))
        p.add_argument("--gpus", type=int, default=int(os.environ.get("GPUS_PER_NODE", 8)))
        p.add_argument("--real-node", action="store_true",
                       default=os.environ.get("REAL_NODE", "0") not in ("", "0"),
                       help="also start the real node (kubelet + containerd; REAL_NODE=1)")
        p.add_argument("--kueue", action="store_true",
                       default=os.environ.get("KUEUE", "0") not in ("", "0"),
                       help="also start Kueue with its pod integration (KUEUE=1)")
        p.add_argument("--real-node-gpus", type=int,
                       default=int(os.environ.get("REAL_NODE_GPUS", 2)))
        p.set_defaults(fn=fn)
    sub.add_parser("down").set_defaults(fn=down)
    sub.add_parser("status").set_defaults(fn=status)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
