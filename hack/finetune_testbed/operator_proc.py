"""The operator as a separate process (so tests can SIGKILL, SIGSTOP and restart it)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import requests

from .identities import metric_value
from .procs import Proc, free_port, wait_for

# Fast timings for tests and the demo; production defaults live in config.py.
FAST_ARGS = ["--timer-interval", "5", "--progress-interval", "2",
             "--progress-write-interval", "2", "--node-lost-seconds", "10"]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, log_dir: Path, *, args: list[str] | None = None,
                 name: str = "operator", env: dict | None = None, python: str | None = None):
        self.metrics_port, self.health_port = free_port(), free_port()
        self.kubeconfig = kubeconfig
        self.identity = name  # the --identity of a leader-election replica (election_replica)
        argv = [python or sys.executable, "-m", "finetune_operator",
                "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                "--bind-address", "127.0.0.1", *(FAST_ARGS if args is None else args)]
        self.proc = Proc(name, argv, log_dir, env={"KUBECONFIG": str(kubeconfig),
                                                   "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, wait_ready: bool = True) -> OperatorProcess:
        self.proc.start()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{self.health_port}/readyz",
                                      timeout=2).status_code == 200,
                 timeout, "operator /readyz", procs=[self.proc])

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.health_port}/readyz",
                                timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def metrics_text(self) -> str:
        return requests.get(self.metrics_url, timeout=5).text

    def kill(self) -> None:
        self.proc.kill()

    def pause(self) -> None:
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.running():
            self.proc.signal(signal.SIGCONT)
        self.proc.stop()

    def running(self) -> bool:
        return self.proc.running()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines)


def env_without_kubeconfig() -> dict:
    return {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}


def election_replica(cluster, namespace: str, identity: str, lease_id: str, *args: str) -> OperatorProcess:
    """A replica with Lease leader election in `namespace` (as the Deployment runs it), not started."""
    op = OperatorProcess(cluster.kubeconfig, cluster.log_dir, name=f"operator-{identity}",
                         args=[*FAST_ARGS, *args, "--leader-elect", f"--leader-election-namespace={namespace}",
                               f"--leader-election-id={lease_id}", f"--identity={identity}"])
    op.identity = identity
    return op


def leader_gauge(op: OperatorProcess) -> float | None:
    """Its finetune_operator_leader gauge; None while it does not answer."""
    try:
        return metric_value(op.metrics_text(), "finetune_operator_leader")
    except requests.RequestException:
        return None
