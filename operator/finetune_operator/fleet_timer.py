"""The timer of every job in one asyncio task: each job the reconciler holds is ticked (progress
scrape + safety-net reconcile, Reconciler.tick) once per interval, at its own offset, so the
ticks of a fleet are spread over the interval instead of bunching.

It replaces one kopf timer per job. kopf runs each timer as its own task that sleeps, builds
the handler's keyword arguments and goes through its handler machinery on every tick: at 300
idle jobs that machinery was 11.5% of the operator's CPU on top of the tick itself
(bench/README.md, "Idle CPU"). Here a tick costs one heap operation and one task.

A job is ticked while it is live, and once finished only while it still has a TTL to honour
(`needs_timer`, what kopf's `when=` filter said before). Nothing here is state of record:
offsets are drawn afresh at start-up, the job list is the reconciler's watch-fed cache."""
from __future__ import annotations

import asyncio
import heapq
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .api import TERMINAL_PHASES, SpecError, parse_phase, parse_spec
from .kube import resource_version

log = logging.getLogger("finetune.timer")
Key = tuple[str, str]
# How often the loop looks for jobs it does not tick yet, at most: a new job's first tick is
# drawn in [0, interval) anyway, as kopf's jittered initial delay was.
ADMIT_EVERY = 1.0
# Ticks due within this of each other run in one wake-up of the loop.
GRANULARITY = 0.05


def needs_timer(job: Mapping[str, Any]) -> bool:
    """A live job needs the timer; a finished one only to delete it after its TTL."""
    if parse_phase(job.get("status")) not in TERMINAL_PHASES:
        return True
    try:
        return parse_spec(job.get("spec")).run_policy.ttl_seconds_after_finished is not None
    except SpecError:
        return False  # decide() cannot read a TTL from a spec that fails validation either


class FleetTimer:
    def __init__(self, jobs: Mapping[Key, Mapping[str, Any]], tick: Callable[[Key], Awaitable[None]],
                 interval: float, rng: Callable[[], float] = random.random):
        self.jobs, self.tick, self.interval, self.rng = jobs, tick, interval, rng
        self._due: list[tuple[float, Key]] = []      # heap of (loop time of the next tick, job)
        self._scheduled: set[Key] = set()
        self._needs: dict[Key, tuple[int, bool]] = {}  # needs_timer per resourceVersion
        self._ticking: dict[Key, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._ticking.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        admitted = -ADMIT_EVERY
        while True:
            now = loop.time()
            try:
                if now - admitted >= ADMIT_EVERY:
                    self._admit(now)
                    admitted = now
                self._fire(now)
            except Exception:  # a bug here must not end every job's safety net silently
                log.exception("fleet timer round failed; retried in %.0fs", ADMIT_EVERY)
                admitted = now
            next_due = self._due[0][0] if self._due else now + ADMIT_EVERY
            await asyncio.sleep(min(max(GRANULARITY, next_due - loop.time()), ADMIT_EVERY))

    def _admit(self, now: float) -> None:
        for key in self.jobs.keys() - self._scheduled:
            self._scheduled.add(key)
            heapq.heappush(self._due, (now + self.rng() * self.interval, key))

    def _fire(self, now: float) -> None:
        while self._due and self._due[0][0] <= now + GRANULARITY:
            due, key = heapq.heappop(self._due)
            job = self.jobs.get(key)
            if job is None:  # deleted: forget it (a job re-created under the name is admitted anew)
                self._scheduled.discard(key)
                self._needs.pop(key, None)
                continue
            # Keep the job's offset; a loop that fell behind (a long GC, a blocked loop) skips
            # the ticks it missed instead of running them back to back.
            nxt = due + self.interval
            if nxt <= now:
                nxt += self.interval * ((now - nxt) // self.interval + 1)
            heapq.heappush(self._due, (nxt, key))
            if key not in self._ticking and self._needs_timer(key, job):
                self._ticking[key] = asyncio.ensure_future(self._tick(key))

    def _needs_timer(self, key: Key, job: Mapping[str, Any]) -> bool:
        rv = resource_version(job)
        cached = self._needs.get(key)
        if cached is None or cached[0] != rv:
            cached = self._needs[key] = (rv, needs_timer(job))
        return cached[1]

    async def _tick(self, key: Key) -> None:
        try:
            await self.tick(key)
        except Exception as exc:  # one job's failed tick must not stop the others'
            log.error("timer of %s/%s failed: %s", key[0], key[1], exc, exc_info=True)
        finally:
            self._ticking.pop(key, None)
