"""Stopping a run (torch-free): SIGTERM/SIGINT → a flag, and a deadline on the shutdown.

Shared by :mod:`finetune_trainer.worker` (installs the handler, reports the outcome) and
:mod:`finetune_trainer.training` (services the flag), so neither imports the other.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import finetune_contract as c

from .util import LOG, exit_with_stacks


class PreemptedBeforeTraining(BaseException):
    """SIGTERM arrived before the training loop began: nothing new to save.

    A BaseException (like KeyboardInterrupt) so library code catching Exception while
    loading the model does not swallow it.
    """


class StopSignal:
    """SIGTERM/SIGINT → a flag, serviced at the next step boundary.

    Before the training loop starts there is nothing to save, so the handler raises
    :class:`PreemptedBeforeTraining` instead (model loading can take minutes).
    Signal handlers can only be installed from the main thread (docs/TRAINER.md pitfall 8); elsewhere
    this is a no-op apart from :meth:`request`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, deadline: StopDeadline | None = None) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.training_started = False
        self.concluding = False  # an outcome is being reported: a signal only sets the flag
        self.deadline = deadline
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            LOG.warning("not on the main thread: SIGTERM handling disabled")
            return False
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return True

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            try:
                signal.signal(s, prev)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        first = not self.event.is_set()
        self.request(signum)
        if first and not self.training_started and not self.concluding:
            raise PreemptedBeforeTraining(signal.Signals(signum).name)

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()
        if self.deadline is not None:
            self.deadline.arm(self.exit_code)

    def is_set(self) -> bool:
        return self.event.is_set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def exit_code_for(self, outcome: str) -> int:
        """A stop exits 128 + the signal that caused it; other outcomes by the contract."""
        return self.exit_code if outcome == c.OUTCOME_PREEMPTED else c.OUTCOME_EXIT_CODES[outcome]


class StopDeadline:
    """Once a stop is requested, the process exits within ``seconds`` whatever blocks it.

    A collective whose peer is gone, a wedged process-group teardown or a slow save must
    not turn SIGTERM into the kubelet's SIGKILL (exit 137, no termination message). A
    daemon thread waits; on expiry it dumps every thread's stack (where it hung), has
    ``on_expiry`` write the termination message, and ends the process with ``os._exit``.
    """

    def __init__(self, seconds: float, on_expiry: Any) -> None:
        self.seconds = seconds
        self.on_expiry = on_expiry
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def arm(self, exit_code: int) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, args=(exit_code,), name="stop-deadline", daemon=True
            )
            self._thread.start()

    def cancel(self) -> None:
        """The run returned on its own (in-process callers live on after it)."""
        self._cancelled.set()

    def _run(self, exit_code: int) -> None:
        if self._cancelled.wait(self.seconds):
            return
        exit_with_stacks(
            exit_code,
            f"still running {self.seconds:.0f}s after the stop request: exiting now",
            lambda: self.on_expiry(self.seconds),
        )
