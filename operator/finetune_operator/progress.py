"""Reads a trainer's Prometheus endpoint into a ProgressSample. An endpoint that
cannot be reached yields None ("unknown"), never a stall on its own."""
from __future__ import annotations

import asyncio

import aiohttp

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
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
