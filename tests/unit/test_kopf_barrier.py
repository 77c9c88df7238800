"""kopf's start-up barrier with finetune_operator.kopf_barrier installed (docs/ARCHITECTURE.md,
"Start-up"): kopf's own ToggleSet and Toggle, N object workers waiting the way kopf's
processing waits (`wait_for(True)` on the set), N per-object toggles added and dropped the way
kopf's watcher does. The workers still wait until the last toggle is gone, waiters of the other
state still wake, and the waiters' checks grow with N, not with N x N."""
from __future__ import annotations

import asyncio

import pytest
from kopf._cogs.aiokits import aiotoggles

from finetune_operator import kopf_barrier, kopf_pin

N = 300


@pytest.fixture
def installed(monkeypatch):
    for name in ("make_toggle", "drop_toggle", "drop_toggles"):  # restored after the test
        monkeypatch.setattr(aiotoggles.ToggleSet, name, getattr(aiotoggles.ToggleSet, name))
    kopf_barrier.install()


class CountingSet(aiotoggles.ToggleSet):
    """kopf's ToggleSet, counting how often a waiter re-checks its state."""
    checks = 0

    def is_on(self) -> bool:
        CountingSet.checks += 1
        return super().is_on()


async def _startup(barrier: aiotoggles.ToggleSet) -> tuple[list[int], int]:
    """Objects arrive one by one (a toggle each, a worker each that waits on the set); then
    each is indexed (its toggle dropped). Returns when each worker got through, in drop counts."""
    blocker = await barrier.make_toggle(name="orchestration blocker")
    dropped = 0
    passed: list[int] = []

    async def worker() -> None:
        await barrier.wait_for(True)
        passed.append(dropped)

    toggles, workers = [], []
    for i in range(N):
        toggles.append(await barrier.make_toggle(name=f"object {i}"))
        workers.append(asyncio.ensure_future(worker()))
    await barrier.drop_toggle(blocker)
    await asyncio.sleep(0)
    for t in toggles:
        await barrier.drop_toggle(t)
        dropped += 1
        await asyncio.sleep(0)  # let woken workers run, as the event loop would between objects
    await asyncio.gather(*workers)
    return passed, CountingSet.checks


def test_workers_pass_only_once_every_object_is_indexed_and_checks_stay_linear(installed):
    CountingSet.checks = 0
    passed, checks = asyncio.run(_startup(CountingSet(all)))
    assert passed == [N] * N
    assert checks < 10 * N, f"{checks} state checks for {N} objects (kopf's own: about N x N)"


def test_kopf_unpatched_checks_quadratically():
    """The measurement the patch is for, on kopf as shipped (no install())."""
    CountingSet.checks = 0
    passed, checks = asyncio.run(_startup(CountingSet(all)))
    assert passed == [N] * N
    assert checks > N * N // 2, checks


def test_waiters_of_both_states_still_wake(installed):
    async def main() -> None:
        paused = aiotoggles.ToggleSet(any)  # kopf's operator_paused: waited on in both directions
        resumed = asyncio.ensure_future(paused.wait_for(False))
        await asyncio.sleep(0)
        assert resumed.done()
        toggle = await paused.make_toggle(True, name="peering")
        woke_on = asyncio.ensure_future(paused.wait_for(True))
        woke_off = asyncio.ensure_future(paused.wait_for(False))
        await asyncio.sleep(0)
        assert woke_on.done() and not woke_off.done()
        await toggle.turn_to(False)  # a single toggle's own change still notifies
        await asyncio.wait_for(woke_off, 1)
        other = await paused.make_toggle(True)
        again = asyncio.ensure_future(paused.wait_for(False))
        await asyncio.sleep(0)
        await paused.drop_toggles([other])  # the aggregate flips back: waiters of off wake
        await asyncio.wait_for(again, 1)
    asyncio.run(main())


def test_refuses_another_kopf_release(monkeypatch):
    monkeypatch.setattr(kopf_pin, "KOPF_VERSION", "0.0.0")
    with pytest.raises(RuntimeError, match="written for kopf 0.0.0"):
        kopf_barrier.install()
