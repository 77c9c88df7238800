"""Leader election on a coordination.k8s.io Lease: one active replica, standbys wait.

Timings follow client-go: lease 15 s, renew deadline 10 s, retry every 2 s. A standby
takes the Lease over only once renewTime + leaseDurationSeconds has passed; a leader
that could not renew for the renew deadline stops acting (the process exits and the
Deployment restarts it as a standby) before any standby may take over."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging

from . import metrics
from .kube import Conflict, KubeClient, NotFound

log = logging.getLogger("finetune.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str,
                 lease_duration: float = 15.0, retry_period: float = 2.0):
        self.client, self.identity = client, identity
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.name, self.duration = name, lease_duration
        self.retry = retry_period
        self.renew_deadline = lease_duration * 2 / 3
        self.lost = asyncio.Event()
        self.acquired_at: dt.datetime | None = None

    def _spec(self, lease: dict | None, now: dt.datetime) -> dict:
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = _fmt(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if lease else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=int(self.duration),
                    renewTime=_fmt(now))
        return spec

    async def try_acquire(self) -> bool:
        now = _now()
        try:
            lease = await self.client.get(self.path)
        except NotFound:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name}, "spec": self._spec(None, now)}
            try:
                await self.client.create(self.collection, body)
                return True
            except Conflict:  # another replica created it first
                return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        duration = spec.get("leaseDurationSeconds") or self.duration
        expired = renewed is None or now > renewed + dt.timedelta(seconds=duration)
        if holder and holder != self.identity and not expired:
            return False
        lease["spec"] = self._spec(lease, now)
        try:
            await self.client.request("PUT", self.path, body=lease)
            return True
        except Conflict:  # someone else renewed or took it first
            return False

    async def acquire(self) -> None:
        logged = False
        while True:
            try:
                if await self.try_acquire():
                    self.acquired_at = _now()
                    metrics.LEADER.set(1)
                    log.info("became leader (lease %s, identity %s)", self.name, self.identity)
                    return
            except Exception as exc:  # API down: keep waiting, loudly
                log.warning("leader election: %s", exc)
            if not logged:
                log.info("standby: lease %s is held by another replica; waiting", self.name)
                logged = True
            await asyncio.sleep(self.retry)

    async def keep_renewing(self) -> None:
        last_renew = asyncio.get_running_loop().time()
        while not self.lost.is_set():
            await asyncio.sleep(self.retry)
            try:
                if await self.try_acquire():
                    last_renew = asyncio.get_running_loop().time()
                    continue
                log.error("lost the lease %s to another replica", self.name)
                self.lost.set()
                metrics.LEADER.set(0)
            except Exception as exc:  # any failure counts against the renew deadline
                log.warning("lease renewal failed: %s", exc)
                if asyncio.get_running_loop().time() - last_renew > self.renew_deadline:
                    log.error("could not renew the lease for %.0fs; stepping down",
                              self.renew_deadline)
                    self.lost.set()
                    metrics.LEADER.set(0)

    async def release(self) -> None:
        """Hand over at once on a clean shutdown instead of making standbys wait."""
        try:
            lease = await self.client.get(self.path)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["renewTime"] = _fmt(_now() - dt.timedelta(seconds=self.duration + 1))
                lease["spec"]["holderIdentity"] = ""
                await self.client.request("PUT", self.path, body=lease)
        except Exception as exc:  # best effort: the lease expires on its own
            log.warning("could not release the lease: %s", exc)
