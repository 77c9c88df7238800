"""Reads a trainer's Prometheus endpoint into a ProgressSample. An endpoint that
cannot be reached yields None ("unknown"), never a stall on its own."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from . import metrics
from .core import ProgressSample, parse_trainer_metrics


class ProgressReader:
    def __init__(self, timeout: float = 2.0):
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def read(self, host: str, port: int) -> ProgressSample | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(f"http://{host}:{port}/metrics") as resp:
                if resp.status != 200:
                    return None
                return parse_trainer_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape(self, pods: Iterable[Mapping[str, Any]], pod_name: str) -> ProgressSample | None:
        """The sample of the named pod's trainer; None while it has no IP or does not answer."""
        for pod in pods:
            if pod["metadata"]["name"] != pod_name:
                continue
            ip = (pod.get("status") or {}).get("podIP")
            port = _metrics_port(pod)
            if ip and port:
                sample = await self.read(ip, port)
                metrics.PROGRESS_SCRAPES.labels("ok" if sample else "unreachable").inc()
                return sample
        return None


def _metrics_port(pod: Mapping[str, Any]) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                return port.get("containerPort")
    return None
