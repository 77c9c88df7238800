"""finetune_operator.slots.PrioritySlots: never more holders than slots; waiters served by
priority, FIFO within one; a waiter cancelled while it waits, or right after it was granted a
slot, leaks no slot."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_operator.slots import ROUTINE, URGENT, PrioritySlots


async def _run(slots: PrioritySlots, jobs: list[tuple[str, int]], hold: asyncio.Event,
               order: list[str], peak: list[int], inside: list[int]) -> None:
    async def one(name: str, priority: int) -> None:
        async with slots.held(priority):
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            order.append(name)
            await hold.wait()
            inside[0] -= 1
    tasks = []
    for name, priority in jobs:
        tasks.append(asyncio.ensure_future(one(name, priority)))
        await asyncio.sleep(0)  # each enters the queue in list order
    hold.set()
    await asyncio.gather(*tasks)


def test_urgent_waiters_go_first_and_fifo_within_a_priority():
    async def main():
        slots, order, peak, inside = PrioritySlots(2), [], [0], [0]
        jobs = [("a", ROUTINE), ("b", ROUTINE), ("new1", ROUTINE), ("new2", ROUTINE),
                ("pod1", URGENT), ("new3", ROUTINE), ("pod2", URGENT)]
        await _run(slots, jobs, asyncio.Event(), order, peak, inside)
        assert order == ["a", "b", "pod1", "pod2", "new1", "new2", "new3"]
        assert peak[0] == 2 and slots.free == 2
    asyncio.run(main())


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 5), priorities=st.lists(st.sampled_from([URGENT, ROUTINE]), max_size=30))
def test_never_more_holders_than_slots_and_every_slot_comes_back(size, priorities):
    async def main():
        slots, order, peak, inside = PrioritySlots(size), [], [0], [0]
        jobs = [(str(i), p) for i, p in enumerate(priorities)]
        await _run(slots, jobs, asyncio.Event(), order, peak, inside)
        assert peak[0] <= size and sorted(order, key=int) == [j for j, _ in jobs]
        assert slots.free == size
    asyncio.run(main())


def test_cancelled_waiters_leak_no_slot():
    async def main():
        slots = PrioritySlots(1)
        ran: list[str] = []

        async def waiter(name: str) -> None:
            async with slots.held(URGENT):
                ran.append(name)

        holder = slots.held(URGENT)
        await holder.__aenter__()
        gone, granted, last = (asyncio.ensure_future(waiter(n)) for n in ("gone", "granted", "last"))
        await asyncio.sleep(0)  # all three wait, in this order
        gone.cancel()  # cancelled while it waits: skipped when the slot is released
        await asyncio.sleep(0)
        await holder.__aexit__(None, None, None)  # hands the slot to `granted` ...
        granted.cancel()  # ... cancelled before it ran: the slot must go on to `last`
        await asyncio.wait_for(asyncio.gather(gone, granted, last, return_exceptions=True), 5)
        assert ran == ["last"] and slots.free == 1
    asyncio.run(main())


def test_at_least_one_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        PrioritySlots(0)
