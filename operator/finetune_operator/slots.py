"""A bounded number of reconciles at once, the rest served by priority.

Unbounded, 1,000 new jobs meant 1,000 reconciles in flight: the operator's CPU and its API
requests crowded out everything else on the control plane (submitting 1,000 TrainingJobs took
36 s against 2.4 s with the operator stopped), and every job's pod events waited behind that
crowd. The Job controller bounds itself the same way (--concurrent-job-syncs). Waiting work
runs by priority, FIFO within one: reconciles for pod changes and timed wake-ups of jobs
already started go before the first reconcile of new jobs, so a bound that paces new jobs
does not delay the status of running ones (bench/README.md, "Concurrent reconciles")."""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

URGENT, ROUTINE = 0, 1


class PrioritySlots:
    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"PrioritySlots needs at least one slot, got {size}")
        self.free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @asynccontextmanager
    async def held(self, priority: int) -> AsyncIterator[None]:
        if self.free > 0:  # then no one waits: a released slot goes to a waiter first
            self.free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._order), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # granted just before the cancellation
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            *_, fut = heapq.heappop(self._waiting)
            if not fut.done():  # skip waiters cancelled while they waited
                fut.set_result(None)
                return
        self.free += 1
