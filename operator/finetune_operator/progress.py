"""Reads a trainer's Prometheus endpoint into a ProgressSample. An endpoint that
cannot be reached yields None ("unknown"), never a stall on its own."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from . import metrics
from .core import ProgressSample, parse_trainer_metrics

# A trainer that has not answered yet in this attempt (still starting, an image without the
# metrics endpoint, a network policy in the way) is asked on each of its first UNANSWERED_TRIES
# ticks, then on every UNANSWERED_EVERY-th: a fleet of silent pods costs a third of the failed
# connects (bench/README.md, "Idle CPU"), and a late first answer is seen at most
# UNANSWERED_EVERY - 1 ticks later. One that answered once is asked every tick again (its
# silence is what stall detection reads), so nothing changes for training that runs.
UNANSWERED_TRIES = 3
MAX_ANSWER_BYTES = 1 << 20
UNANSWERED_EVERY = 3


def scrape_due(unanswered: int, skipped: int) -> bool:
    """Whether to read a trainer that failed `unanswered` reads in a row without ever
    answering in this attempt, `skipped` ticks after the last read."""
    return unanswered < UNANSWERED_TRIES or skipped + 1 >= UNANSWERED_EVERY


class ProgressReader:
    """One HTTP/1.0 GET per read on a plain non-blocking socket. The trainer's endpoint
    (prometheus_client's start_http_server, an HTTP/1.0 server) closes the connection after
    every answer, so a pooled HTTP client has nothing to reuse; its per-request machinery was
    most of a read's cost, and most of a failed one's (bench/README.md, "Idle CPU")."""

    def __init__(self, timeout: float = 2.0):
        self._timeout = timeout

    async def read(self, host: str, port: int) -> ProgressSample | None:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await _http_get(host, port, "/metrics")
        except (TimeoutError, OSError):
            return None
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            return None
        try:
            return parse_trainer_metrics(body.decode("utf-8", "replace"))
        except ValueError:
            return None

    async def close(self) -> None:
        return None

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


async def _http_get(host: str, port: int, path: str) -> bytes:
    """The raw answer (status line, headers, body) to an HTTP/1.0 GET: read to EOF, at most
    MAX_ANSWER_BYTES (a trainer's metrics are a few KiB)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.0\r\nHost: {authority}\r\n"
                                      "Accept: text/plain\r\n\r\n".encode())
        chunks, size = [], 0
        while size < MAX_ANSWER_BYTES:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def _metrics_port(pod: Mapping[str, Any]) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                return port.get("containerPort")
    return None
