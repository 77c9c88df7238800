"""Operator settings: command-line flags, each with an environment variable fallback
(FINETUNE_<FLAG>), so the Deployment can use either."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from .sharding import shard_name_error
from .version import describe


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()          # empty: cluster-wide
    metrics_port: int = 8080
    health_port: int = 8081
    bind_address: str = "0.0.0.0"
    timer_interval: float = 30.0              # safety-net re-check of every live job
    progress_interval: float = 10.0           # how often a trainer's metrics are read
    progress_write_interval: float = 15.0     # rate limit of progress-only status writes
    progress_timeout: float = 2.0
    node_lost_seconds: float = 60.0          # NotReady this long: its pods count as lost
    allow_privileged_templates: bool = False
    leader_elect: bool = False
    leader_election_namespace: str = "finetune-system"
    leader_election_name: str = "finetune-operator"
    lease_duration: float = 15.0
    identity: str = ""
    shard: str | None = None                  # owns jobs labelled finetune.dev/shard=<shard> (docs/SHARDING.md)
    shard_default: bool = False               # owns jobs without that label
    log_level: str = "INFO"
    # Concurrent API requests. 16 capped pod creation at 1,000 jobs (61 s); 48 halved that
    # (31 s) for about 15 MiB more RSS; unbounded opened ~200 connections (bench/README.md).
    api_connections: int = 48
    # Reconciles running at once (the rest wait, pod changes first: slots.py), as the Job
    # controller's --concurrent-job-syncs. At 1,000 new jobs, against unbounded: 16 submitted
    # them in 21 s (33), created their pods in 38 s (39), Running-lag p99 0.9 s (6.7); 4 in
    # 10 s, 44 s, 0.3 s (bench/README.md, "Concurrent reconciles").
    concurrent_reconciles: int = 16


def _env(name: str, default):
    value = os.environ.get(f"FINETUNE_{name.upper()}")
    if value is None:
        return default
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return tuple(v for v in value.split(",") if v)
    return type(default)(value)


def parse_args(argv: list[str] | None = None) -> OperatorConfig:
    d = OperatorConfig()
    p = argparse.ArgumentParser(prog="finetune-operator",
                                description="Kubernetes operator for TrainingJob resources.")
    p.add_argument("--version", action="version", version=describe())
    p.add_argument("--namespace", action="append", dest="namespaces",
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--metrics-port", type=int, default=_env("metrics_port", d.metrics_port))
    p.add_argument("--health-port", type=int, default=_env("health_port", d.health_port))
    p.add_argument("--bind-address", default=_env("bind_address", d.bind_address))
    p.add_argument("--timer-interval", type=float, default=_env("timer_interval", d.timer_interval),
                   help="seconds between safety-net re-checks of each live job")
    p.add_argument("--progress-interval", type=float,
                   default=_env("progress_interval", d.progress_interval))
    p.add_argument("--progress-write-interval", type=float,
                   default=_env("progress_write_interval", d.progress_write_interval))
    p.add_argument("--node-lost-seconds", type=float,
                   default=_env("node_lost_seconds", d.node_lost_seconds))
    p.add_argument("--allow-privileged-templates", action="store_true",
                   default=_env("allow_privileged_templates", d.allow_privileged_templates),
                   help="allow privileged, hostPath, hostNetwork and added capabilities in "
                        "spec.template (off by default: creating a job must not grant them)")
    p.add_argument("--leader-elect", action="store_true", default=_env("leader_elect", d.leader_elect),
                   help="hold a coordination.k8s.io Lease; standbys wait until it expires")
    p.add_argument("--leader-election-namespace",
                   default=_env("leader_election_namespace", d.leader_election_namespace))
    p.add_argument("--leader-election-name", "--leader-election-id", dest="leader_election_name",
                   default=_env("leader_election_name",
                                                          d.leader_election_name))
    p.add_argument("--lease-duration", type=float, default=_env("lease_duration", d.lease_duration))
    p.add_argument("--identity", default=_env("identity", os.environ.get("POD_NAME", "")))
    p.add_argument("--shard", default=os.environ.get("FINETUNE_SHARD") or None,
                   help="own only the jobs labelled finetune.dev/shard=SHARD, with the Lease "
                        "<leader-election-name>-SHARD (docs/SHARDING.md)")
    p.add_argument("--shard-default", action="store_true", default=_env("shard_default", d.shard_default),
                   help="own only the jobs without the finetune.dev/shard label")
    p.add_argument("--log-level", default=_env("log_level", d.log_level))
    p.add_argument("--api-connections", type=int, default=_env("api_connections", d.api_connections),
                   help="most concurrent requests to the API server (watches not counted)")
    p.add_argument("--concurrent-reconciles", type=int,
                   default=_env("concurrent_reconciles", d.concurrent_reconciles),
                   help="most jobs reconciled at once; the others wait, their events coalescing")
    a = p.parse_args(argv)
    for flag in ("api_connections", "concurrent_reconciles"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.shard is not None and a.shard_default:
        p.error("--shard and --shard-default exclude each other: one replica serves one shard")
    if a.shard is not None and (err := shard_name_error(a.shard)):
        p.error(err)
    namespaces = tuple(a.namespaces or _env("namespaces", ()))
    return OperatorConfig(namespaces=namespaces, metrics_port=a.metrics_port,
                          health_port=a.health_port, bind_address=a.bind_address,
                          timer_interval=a.timer_interval, progress_interval=a.progress_interval,
                          progress_write_interval=a.progress_write_interval,
                          node_lost_seconds=a.node_lost_seconds,
                          allow_privileged_templates=a.allow_privileged_templates,
                          leader_elect=a.leader_elect,
                          leader_election_namespace=a.leader_election_namespace,
                          leader_election_name=a.leader_election_name,
                          lease_duration=a.lease_duration, identity=a.identity,
                          shard=a.shard, shard_default=a.shard_default,
                          log_level=a.log_level, api_connections=a.api_connections,
                          concurrent_reconciles=a.concurrent_reconciles)
