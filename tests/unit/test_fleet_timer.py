"""The fleet-wide timer (finetune_operator/fleet_timer.py): every live job ticked once per
interval at its own offset, finished jobs only while a TTL is pending, deleted jobs forgotten,
never two ticks of one job at once. Real asyncio time, short intervals."""
from __future__ import annotations

import asyncio
from collections import Counter

from finetune_operator import fleet_timer
from finetune_operator.fleet_timer import FleetTimer


def _job(name: str, phase: str | None = "Running", ttl: int | None = None, rv: int = 1) -> dict:
    spec = {"image": "i", "model": "/m", "dataset": {"path": "/d.jsonl"},
            "hyperparameters": {"maxSteps": 10}}
    if ttl is not None:
        spec["runPolicy"] = {"ttlSecondsAfterFinished": ttl}
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": str(rv)},
            "spec": spec, "status": {"phase": phase} if phase else {}}


async def _run_for(timer: FleetTimer, seconds: float) -> None:
    timer.start()
    await asyncio.sleep(seconds)
    await timer.stop()


def test_each_job_ticked_once_per_interval_spread_over_it(monkeypatch):
    monkeypatch.setattr(fleet_timer, "ADMIT_EVERY", 0.05)
    jobs = {("ns", f"j{i}"): _job(f"j{i}") for i in range(40)}
    ticks: Counter = Counter()
    first: dict = {}

    async def tick(key):
        loop = asyncio.get_running_loop()
        ticks[key] += 1
        first.setdefault(key, loop.time())

    async def main():
        timer = FleetTimer(jobs, tick, interval=0.5)
        t0 = asyncio.get_running_loop().time()
        await _run_for(timer, 1.6)
        return t0

    t0 = asyncio.run(main())
    assert set(ticks) == set(jobs)
    # 1.6 s at 0.5 s: 3 or 4 ticks each, whatever its offset
    assert all(3 <= n <= 4 for n in ticks.values()), ticks
    offsets = sorted(t - t0 for t in first.values())
    assert offsets[-1] - offsets[0] > 0.25, f"first ticks bunched: {offsets}"


def test_finished_jobs_ticked_only_with_a_ttl_and_deleted_ones_forgotten(monkeypatch):
    monkeypatch.setattr(fleet_timer, "ADMIT_EVERY", 0.05)
    jobs = {("ns", "live"): _job("live"), ("ns", "done"): _job("done", "Succeeded"),
            ("ns", "ttl"): _job("ttl", "Failed", ttl=60), ("ns", "new"): _job("new", None),
            ("ns", "bad"): {**_job("bad", "Failed"), "spec": {"image": 3}}}
    ticks: Counter = Counter()

    async def tick(key):
        ticks[key] += 1

    async def main():
        timer = FleetTimer(jobs, tick, interval=0.2)
        timer.start()
        await asyncio.sleep(0.7)
        del jobs[("ns", "live")]
        jobs[("ns", "later")] = _job("later")
        before = ticks[("ns", "live")]
        await asyncio.sleep(0.7)
        await timer.stop()
        return before

    before = asyncio.run(main())
    assert ticks[("ns", "live")] == before > 0
    assert ticks[("ns", "ttl")] > 0 and ticks[("ns", "new")] > 0 and ticks[("ns", "later")] > 0
    assert ticks[("ns", "done")] == 0 and ticks[("ns", "bad")] == 0


def test_a_slow_tick_is_not_overlapped_and_stop_cancels_it(monkeypatch):
    monkeypatch.setattr(fleet_timer, "ADMIT_EVERY", 0.05)
    jobs = {("ns", "slow"): _job("slow")}
    running, most, cancelled = 0, 0, []

    async def tick(key):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(key)
            raise
        finally:
            running -= 1

    asyncio.run(_run_for(FleetTimer(jobs, tick, interval=0.1), 0.8))
    assert most == 1 and cancelled == [("ns", "slow")] and running == 0


def test_a_failing_tick_does_not_stop_the_others(monkeypatch):
    monkeypatch.setattr(fleet_timer, "ADMIT_EVERY", 0.05)
    jobs = {("ns", "a"): _job("a"), ("ns", "b"): _job("b")}
    ticks: Counter = Counter()

    async def tick(key):
        ticks[key] += 1
        if key == ("ns", "a"):
            raise RuntimeError("boom")

    asyncio.run(_run_for(FleetTimer(jobs, tick, interval=0.1), 0.6))
    assert ticks[("ns", "a")] >= 3 and ticks[("ns", "b")] >= 3


def test_a_failing_round_does_not_end_the_other_jobs_ticks(monkeypatch):
    monkeypatch.setattr(fleet_timer, "ADMIT_EVERY", 0.05)
    jobs = {("ns", "bad"): _job("bad"), ("ns", "good"): _job("good")}
    real = fleet_timer.needs_timer

    def needs_timer(job):
        if job["metadata"]["name"] == "bad":
            raise RuntimeError("a bug in needs_timer")
        return real(job)

    monkeypatch.setattr(fleet_timer, "needs_timer", needs_timer)
    ticks: Counter = Counter()

    async def tick(key):
        ticks[key] += 1

    asyncio.run(_run_for(FleetTimer(jobs, tick, interval=0.2), 1.5))
    assert ticks[("ns", "bad")] == 0
    assert ticks[("ns", "good")] >= 5, ticks
