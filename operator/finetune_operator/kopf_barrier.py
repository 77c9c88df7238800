"""kopf's start-up barrier without its quadratic wake-ups (docs/ARCHITECTURE.md, "Start-up").

kopf runs no handler before every index is filled: each object of an indexed kind (our pods,
Nodes) adds an "off" toggle to one ToggleSet and drops it once indexed, while every object's
worker (jobs and pods alike) waits on that set. kopf 1.45 wakes all waiting workers on every
add and drop, although what they wait for, the set's aggregate (all toggles dropped), did not
change: objects x objects wake-ups. At 3,000 jobs a restarted operator spent 128 s there.

`install()` makes a ToggleSet notify its waiters only when its aggregate flips. That is all any
waiter of a ToggleSet waits for (`wait_for` compares `is_on()` with a state), so no waiter can
miss its state; a single Toggle's own `turn_to` still notifies on every change."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from kopf._cogs.aiokits import aiotoggles

from . import kopf_pin

_ToggleSet = aiotoggles.ToggleSet


async def _changed(self: aiotoggles.ToggleSet, change: Callable[[], object]) -> None:
    async with self._condition:
        before = self.is_on()
        change()
        if self.is_on() != before:
            self._condition.notify_all()


async def _make_toggle(self: aiotoggles.ToggleSet, state: bool = False, *,
                       name: str | None = None) -> aiotoggles.Toggle:
    toggle = aiotoggles.Toggle(state, name=name, condition=self._condition)
    await _changed(self, lambda: self._toggles.add(toggle))
    return toggle


async def _drop_toggle(self: aiotoggles.ToggleSet, toggle: aiotoggles.Toggle) -> None:
    await _changed(self, lambda: self._toggles.discard(toggle))


async def _drop_toggles(self: aiotoggles.ToggleSet, toggles: Iterable[aiotoggles.Toggle]) -> None:
    await _changed(self, lambda: self._toggles.difference_update(toggles))


def install() -> None:
    """Replace the three methods; refuses (loudly) a kopf whose ToggleSet is not the one read."""
    kopf_pin.require("kopf_barrier", "kopf's aiotoggles.ToggleSet")
    _ToggleSet.make_toggle = _make_toggle  # type: ignore[method-assign]
    _ToggleSet.drop_toggle = _drop_toggle  # type: ignore[method-assign]
    _ToggleSet.drop_toggles = _drop_toggles  # type: ignore[method-assign]
