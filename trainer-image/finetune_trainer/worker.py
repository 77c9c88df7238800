"""One training process (single-process mode, or one torchrun worker).

Torch-free at import time: cheap configuration checks (dataset, model path) run before
torch/transformers are imported, so a bad configuration exits 78 within a second.
Only global rank 0 serves metrics and writes the termination message and checkpoints.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import TYPE_CHECKING, Any

import finetune_contract as c

from . import checkpoints as ckpts
from . import data
from .stop import PreemptedBeforeTraining, StopDeadline, StopSignal
from .util import LOG, env_rank, setup_logging

if TYPE_CHECKING:
    from .metrics import TrainerMetrics


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
        self.pushed: str | None = None  # set once the push finished (docs/TRAINER.md "Push")
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
            pushed=self.pushed if outcome == c.OUTCOME_COMPLETED else None,
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
        outcome = _attempt(cfg, rank, report, stopper)
    except PreemptedBeforeTraining as e:
        # The signal came while an outcome was being reported (a peer rank failed and torchrun
        # stopped this one): an outcome already written stands; otherwise it is a stop.
        written = report.written or report.finish(
            c.OUTCOME_PREEMPTED, f"stopped by {e} before training started; nothing new to save"
        )
        outcome = written["outcome"]
    finally:
        stopper.uninstall()
        deadline.cancel()
    return stopper.exit_code_for(outcome)  # the one place an outcome becomes an exit code


def _attempt(cfg: c.TrainerConfig, rank: int, report: Report, stopper: StopSignal) -> str:
    """Checks, then training; reports the outcome (termination message) and returns it."""
    try:
        outcome, message = _checked_training(cfg, rank, report, stopper)
    except c.ConfigError as e:
        stopper.concluding = True  # a SIGTERM from here on must not replace this outcome
        reason = c.one_line(str(e))
        LOG.error("configuration error: %s", reason)
        report.finish(c.OUTCOME_CONFIG_ERROR, reason)
        return c.OUTCOME_CONFIG_ERROR
    except PreemptedBeforeTraining as e:
        stopper.concluding = True
        report.note_latest_checkpoint()
        msg = f"stopped by {e} before training started; nothing new to save"
        LOG.warning(msg)
        report.finish(c.OUTCOME_PREEMPTED, msg)
        return c.OUTCOME_PREEMPTED
    except Exception as e:  # broad on purpose: every failure must leave a termination message
        stopper.concluding = True
        traceback.print_exc()
        report.refresh_checkpoint()
        msg = f"{type(e).__name__}: {e}"
        LOG.error("training failed: %s", c.one_line(msg))
        report.finish(c.OUTCOME_ERROR, msg)
        return c.OUTCOME_ERROR
    stopper.concluding = True
    report.finish(outcome, message)
    if rank == 0:
        LOG.info("%s: %s", outcome, message)
    return outcome


def _checked_training(cfg: c.TrainerConfig, rank: int, report: Report, stopper: StopSignal) -> tuple[str, str]:
    """Cheap checks, then the training run with rank 0's metrics server around it."""
    model_path, prepared = _check(cfg, rank)
    metrics = _new_metrics(cfg) if rank == 0 else None
    try:
        if metrics is not None:
            port = metrics.serve(cfg.metrics_port, cfg.metrics_addr, port_file_dir=cfg.work_dir)
            LOG.info("metrics on http://%s:%d%s", cfg.metrics_addr, port, c.METRICS_PATH)
        from . import training  # torch, transformers, peft: only after the cheap checks

        return training.train(cfg, model_path, prepared, stopper, report, metrics)
    finally:
        if metrics is not None:
            metrics.close(wait=False)


def _check(cfg: c.TrainerConfig, rank: int) -> tuple[str, data.Prepared | None]:
    """Torch-free configuration checks; returns (model path, rank 0's prepared dataset).

    Only rank 0 reads the dataset (the others read its tokenized cache). Raises ConfigError.
    """
    problems = cfg.problems()
    if problems:
        raise c.ConfigError("; ".join(problems))
    data.dataset_files(cfg.dataset)
    if cfg.eval_dataset:
        data.dataset_files(cfg.eval_dataset)
    model_path = check_model_path(cfg.model)
    if cfg.resume_from:
        ckpts.explicit_start(cfg.resume_from)
    if rank != 0:
        return model_path, None
    check_writable_dir(cfg.output_dir, "output directory")
    check_writable_dir(cfg.effective_checkpoint_dir, "checkpoint directory")
    check_writable_dir(cfg.work_dir, "trainer work directory")
    if cfg.push_uri:
        from . import push

        push.check(cfg)  # wrong credentials fail now, not after the run
    return model_path, data.prepare(cfg)


def _new_metrics(cfg: c.TrainerConfig) -> TrainerMetrics:
    from .metrics import TrainerMetrics

    metrics = TrainerMetrics()
    if cfg.max_steps:
        metrics.total_steps.set(cfg.max_steps)
    return metrics
