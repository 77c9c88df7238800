"""`python -m finetune_operator`: checks, optional leader election, then kopf.

Start-up fails loudly (non-zero exit, one clear line) when the CRD is missing or RBAC
denies something the operator needs, instead of running and silently doing nothing."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys

import kopf

from . import json_codec, kopf_barrier, metrics
from .config import OperatorConfig, parse_args
from .handlers import POD_SELECTOR, register
from .health import HealthServer, keep_checking_api
from .kube import TRANSPORT_ERRORS, KubeClient
from .leader import LeaderElector
from .metrics import REGISTRY, FleetCollector
from .preflight import PreflightError, preflight
from .reconciler import Reconciler
from .sharding import Shard
from .version import describe
from .watch_gaps import keep_auditing

log = logging.getLogger("finetune.operator")


def in_cluster_server(env=os.environ) -> str | None:
    """The API server as client-go's in-cluster config finds it: KUBERNETES_SERVICE_HOST and
    _PORT, which the kubelet sets in every container. kopf alone always uses
    https://kubernetes.default.svc, which needs cluster DNS and port 443."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


async def login() -> kopf.ConnectionInfo:
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings)
    if info is not None and (server := in_cluster_server()):
        info = dataclasses.replace(info, server=server)
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise PreflightError("no Kubernetes credentials: neither an in-cluster service account "
                             "nor a kubeconfig (KUBECONFIG or ~/.kube/config) was found")
    return info


async def wait_for_api(client: KubeClient, cfg: OperatorConfig, stop: asyncio.Event) -> bool:
    """Run the start-up checks, waiting (not-ready, loudly) while the API server cannot be
    reached: exiting would only add a crash-loop back-off to the outage. False if stopped."""
    delay = 1.0
    while not stop.is_set():
        try:
            await preflight(client, cfg)
            return True
        except TRANSPORT_ERRORS as exc:
            log.warning("API server unreachable (%s); retrying in %.0fs", exc, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 15.0)
    return False


def _elector(client: KubeClient, cfg: OperatorConfig) -> LeaderElector | None:
    """This replica's leader elector; None when leader election is off."""
    if not cfg.leader_elect:
        return None
    identity = cfg.identity or f"{socket.gethostname()}-{os.getpid()}"
    # One Lease per shard: one leader and its standbys per shard (docs/SHARDING.md).
    return LeaderElector(client, cfg.leader_election_namespace,
                         Shard.of(cfg).lease_name(cfg.leader_election_name), identity, cfg.lease_duration)


async def _lead(elector: LeaderElector | None, stop: asyncio.Event) -> bool:
    """Wait until this replica leads (at once without leader election); False when asked to stop first."""
    if elector is None:
        metrics.LEADER.set(1)
        return True
    acquire = asyncio.ensure_future(elector.acquire())
    await asyncio.wait([acquire, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        acquire.cancel()
        return False
    asyncio.ensure_future(elector.keep_renewing())
    return True


async def _run_kopf(registry: kopf.OperatorRegistry, reconciler: Reconciler, client: KubeClient,
                    cfg: OperatorConfig, stop: asyncio.Event, elector: LeaderElector | None) -> None:
    """Run kopf's watches and timers until a signal or the loss of leadership."""
    loop = asyncio.get_running_loop()
    kopf_stop = asyncio.Event()
    # Created before kopf starts: kopf waits 5 s on exit for every task created after its
    # start ("hung" tasks), and a waiter left pending would delay the Lease release.
    waiters = [asyncio.ensure_future(stop.wait())]
    auditor = asyncio.ensure_future(keep_auditing(reconciler, client, cfg.timer_interval,
                                                  reconciler.shard.pod_selector(POD_SELECTOR)))
    if elector:
        waiters.append(asyncio.ensure_future(elector.lost.wait()))

    async def watch_stop():
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        kopf_stop.set()
    waiters.append(asyncio.ensure_future(watch_stop()))
    namespaces = cfg.namespaces
    log.info("operator starting: %s, %s, timer every %.0fs, progress every %.0fs",
             f"namespaces {', '.join(namespaces)}" if namespaces else "all namespaces",
             reconciler.shard.describe(), cfg.timer_interval, cfg.progress_interval)
    # kopf.operator() is spawn_tasks() + run_tasks(); split so that our signal handlers
    # win: spawn_tasks installs kopf's own SIGTERM/SIGINT handlers, and on a signal kopf
    # leaves its stop-flag waiter pending and waits 5 s for that "hung" task before it
    # returns, which would delay the Lease release by 5 s.
    existing = asyncio.all_tasks() - {asyncio.current_task()}
    tasks = await kopf.spawn_tasks(registry=registry, standalone=True,
                                   clusterwide=not namespaces, namespaces=namespaces,
                                   stop_flag=kopf_stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await kopf.run_tasks(tasks, ignored=existing)
    finally:
        for waiter in waiters:
            waiter.cancel()
        auditor.cancel()


async def run(cfg: OperatorConfig) -> int:
    # First line of every replica's log, standby or leader: which build is running.
    log.info("%s, leader election %s", describe(), "on" if cfg.leader_elect else "off")
    info = await login()
    client = KubeClient(info, connections=cfg.api_connections)
    health = HealthServer(client.state)
    await health.start(cfg.bind_address, cfg.health_port, cfg.metrics_port)
    api_watchdog = asyncio.ensure_future(keep_checking_api(client))
    reconciler = Reconciler(client, cfg)
    REGISTRY.register(FleetCollector(reconciler.fleet))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    elector = None
    try:
        if not await wait_for_api(client, cfg, stop):
            return 0
        elector = _elector(client, cfg)
        if not await _lead(elector, stop):
            return 0
        registry = kopf.OperatorRegistry()
        register(registry, reconciler, cfg)

        @kopf.on.login(registry=registry)
        def _login(**_):
            return info

        await _run_kopf(registry, reconciler, client, cfg, stop, elector)
        if elector and elector.lost.is_set():
            log.error("leadership lost; exiting so that a fresh process can stand by")
            return 1
        return 0
    except PreflightError as exc:
        log.critical("start-up check failed: %s", exc)
        return 2
    finally:
        if elector and not elector.lost.is_set():
            await elector.release()
        api_watchdog.cancel()
        await reconciler.progress.close()
        await health.stop()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    kopf_barrier.install()
    json_codec.install_in_kopf()
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
