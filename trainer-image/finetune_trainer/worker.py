"""One training process (single-process mode, or one torchrun worker).

Torch-free at import time: cheap configuration checks (dataset, model path) run before
torch/transformers are imported, so a bad configuration exits 78 within a second.
Only global rank 0 serves metrics and writes the termination message and checkpoints.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from typing import Any

from . import checkpoints as ckpts
import finetune_contract as c
from .util import LOG, env_rank, exit_with_stacks, setup_logging


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


class Report:
    """What the termination message will say; filled in as training goes."""

    def __init__(self, cfg: c.TrainerConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.step = 0
        self.max_steps: int | None = cfg.max_steps
        self.checkpoint: str | None = None
        self.checkpoint_step: int | None = None
        self.loss: float | None = None
        self.resumed_from: int | None = None
        self.skipped: list[str] = []
        self.written: dict[str, Any] | None = None
        self._lock = threading.Lock()  # the stop deadline may finish from its own thread

    def refresh_checkpoint(self) -> None:
        """Latest complete checkpoint on disk (cheap; rank 0 only)."""
        if not self.enabled:
            return
        try:
            latest = ckpts.latest_complete_checkpoint(self.cfg.effective_checkpoint_dir)
        except OSError:
            return
        if latest is not None:
            self.checkpoint, self.checkpoint_step = latest.path, latest.step

    def finish(self, outcome: str, message: str) -> dict[str, Any]:
        msg = c.termination_message(
            outcome,
            step=self.step,
            max_steps=self.max_steps,
            checkpoint=self.checkpoint,
            checkpoint_step=self.checkpoint_step,
            loss=self.loss,
            resumed_from=self.resumed_from,
            message=message,
        )
        with self._lock:
            if self.written is not None:
                return self.written  # first writer wins: the deadline or the normal exit
            self.written = msg
            if self.enabled:
                if not c.write_termination_message(self.cfg.termination_log, msg):
                    LOG.warning("could not write the termination message to %s", self.cfg.termination_log)
            write_rank_report(msg)
        return msg

    def note_latest_checkpoint(self) -> None:
        """After a stop: the latest complete checkpoint is where the next attempt resumes."""
        self.refresh_checkpoint()
        if self.checkpoint_step is not None:
            self.step = max(self.step, self.checkpoint_step)

    def finish_after_deadline(self, seconds: float) -> None:
        """Termination message when the stop deadline expires."""
        self.note_latest_checkpoint()
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint yet"
        self.finish(c.OUTCOME_PREEMPTED, f"stopped by signal; shutdown did not finish within {seconds:.0f}s; {where}")


def write_rank_report(msg: dict[str, Any]) -> None:
    """Under torchrun every rank leaves its message for the launcher (ENV_RANK_REPORT_DIR)."""
    directory = os.environ.get(c.ENV_RANK_REPORT_DIR)
    if not directory:
        return
    try:
        with open(os.path.join(directory, f"rank-{env_rank()}.json"), "w", encoding="utf-8") as fh:
            fh.write(c.encode_termination_message(msg))
    except OSError as e:
        LOG.warning("could not leave this rank's report in %s: %s", directory, e)

def check_model_path(model: str) -> str:
    """Resolve a local model directory to an absolute path (docs/TRAINER.md pitfall 4), else keep the hub id.

    A string that looks like a path but is not a readable directory with a config.json is a
    config error (from_pretrained would report a misleading "Repo id must be..." error).
    """
    if not model:
        raise c.ConfigError("no model given")
    expanded = os.path.expanduser(model)
    looks_local = expanded.startswith(("/", "./", "../")) or os.path.exists(expanded)
    if not looks_local:
        return model
    path = os.path.abspath(expanded)
    if not os.path.isdir(path):
        raise c.ConfigError(f"model path is not a directory: {model}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise c.ConfigError(f"model directory is not readable: {model}")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file) or not os.access(cfg_file, os.R_OK):
        raise c.ConfigError(f"model directory has no readable config.json: {model}")
    return path


def check_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed; a directory we cannot write is a config error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise c.ConfigError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise c.ConfigError(f"{what} is not writable: {path}")


def run(cfg: c.TrainerConfig) -> int:
    """Train according to ``cfg``; returns the process exit code. Never raises."""
    rank = env_rank()
    setup_logging(rank)
    report = Report(cfg, enabled=(rank == 0))
    deadline = StopDeadline(cfg.stop_timeout, report.finish_after_deadline)
    stopper = StopSignal(deadline)
    stopper.install()
    try:
        return _attempt(cfg, rank, report, stopper)
    except PreemptedBeforeTraining as e:
        # The signal came while an outcome was being reported (a peer rank failed and torchrun
        # stopped this one): an outcome already written stands; otherwise it is a stop.
        written = report.written or report.finish(
            c.OUTCOME_PREEMPTED, f"stopped by {e} before training started; nothing new to save"
        )
        return stopper.exit_code_for(written["outcome"])
    finally:
        stopper.uninstall()
        deadline.cancel()


def _attempt(cfg: c.TrainerConfig, rank: int, report: Report, stopper: StopSignal) -> int:
    """Checks, then training; reports the outcome and returns the exit code."""
    metrics = None
    try:
        problems = cfg.problems()
        if problems:
            raise c.ConfigError("; ".join(problems))
        from . import data

        examples = data.load_examples(cfg)
        model_path = check_model_path(cfg.model)
        if cfg.resume_from:
            ckpts.explicit_start(cfg.resume_from)
        if rank == 0:
            check_writable_dir(cfg.output_dir, "output directory")
            check_writable_dir(cfg.effective_checkpoint_dir, "checkpoint directory")
            from .metrics import TrainerMetrics

            metrics = TrainerMetrics()
            if cfg.max_steps:
                metrics.total_steps.set(cfg.max_steps)
            port = metrics.serve(cfg.metrics_port, cfg.metrics_addr, port_file_dir=cfg.output_dir)
            LOG.info("metrics on http://%s:%d%s", cfg.metrics_addr, port, c.METRICS_PATH)
        from . import training

        outcome, message = training.train(cfg, model_path, examples, stopper, report, metrics)
    except c.ConfigError as e:
        stopper.concluding = True  # a SIGTERM from here on must not replace this outcome
        reason = c.one_line(str(e))
        LOG.error("configuration error: %s", reason)
        report.finish(c.OUTCOME_CONFIG_ERROR, reason)
        return c.EXIT_CONFIG_ERROR
    except PreemptedBeforeTraining as e:
        stopper.concluding = True
        report.note_latest_checkpoint()
        msg = f"stopped by {e} before training started; nothing new to save"
        LOG.warning(msg)
        report.finish(c.OUTCOME_PREEMPTED, msg)
        return stopper.exit_code
    except Exception as e:  # noqa: BLE001 - every failure must leave a termination message
        stopper.concluding = True
        traceback.print_exc()
        report.refresh_checkpoint()
        msg = f"{type(e).__name__}: {e}"
        LOG.error("training failed: %s", c.one_line(msg))
        report.finish(c.OUTCOME_ERROR, msg)
        return c.EXIT_ERROR
    finally:
        if metrics is not None:
            metrics.close(wait=False)
    stopper.concluding = True
    report.finish(outcome, message)
    if rank == 0:
        LOG.info("%s: %s", outcome, message)
    return stopper.exit_code_for(outcome)
