"""The HF Trainer callback that steers a running training (imports torch/transformers).

A stop agreed by every rank, one progress line per logged step, the metrics, world-readable
checkpoints. :func:`distributed` is also used by :mod:`finetune_trainer.training`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback

import finetune_contract as c

from . import checkpoints as ckpts
from .util import LOG


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class TrainerControlCallback(TrainerCallback):
    """Preemption (flag → all-reduce → save + stop), progress log lines, metrics, chmod."""

    def __init__(self, stopper: Any, report: Any, metrics: Any, is_main: bool, step_delay: float = 0.0):
        self.stopper = stopper
        self.report = report
        self.metrics = metrics
        self.is_main = is_main
        self.step_delay = step_delay
        self.preempted = False
        self.last_eval_step: int | None = None
        self._last_log_time = 0.0
        self._last_log_tokens = 0
        self._flag: torch.Tensor | None = None

    # -- helpers ------------------------------------------------------------------------
    def _stop_requested(self, device: torch.device) -> bool:
        local = self.stopper.is_set()
        if not distributed() or torch.distributed.get_world_size() < 2:
            return local
        # Every rank must stop at the same step (docs/TRAINER.md pitfall 10): agree on the flag each step.
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._flag.fill_(1 if local else 0)
        torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        return bool(self._flag.item())

    # -- events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.stopper.training_started = True
        self._last_log_time = time.perf_counter()
        self._last_log_tokens = state.num_input_tokens_seen
        self.report.max_steps = state.max_steps
        self.report.step = state.global_step
        if self.metrics is not None:
            self.metrics.total_steps.set(state.max_steps)
            self.metrics.step.set(state.global_step)
        if self.is_main:
            LOG.info("training: step %d/%d", state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_delay > 0:
            time.sleep(self.step_delay)
        self.report.step = state.global_step
        if self.metrics is not None:
            self.metrics.on_step(state.global_step, state.epoch)
        if self._stop_requested(args.device) and state.global_step < state.max_steps:
            if not self.preempted and self.is_main:
                LOG.warning("stop requested: saving a checkpoint at step %d", state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        dt = now - self._last_log_time
        tps = (tokens - self._last_log_tokens) / dt if dt > 0 else 0.0
        self._last_log_time, self._last_log_tokens = now, tokens
        loss = float(logs["loss"])
        self.report.loss = loss
        if self.metrics is not None:
            if math.isfinite(loss):
                self.metrics.loss.set(loss)
            self.metrics.tokens_per_second.set(tps)
            if state.epoch is not None:
                self.metrics.epoch.set(state.epoch)
        if self.is_main:
            LOG.info(
                "step %d/%d loss=%.6f lr=%.3e grad_norm=%s tokens/s=%.0f epoch=%.3f",
                state.global_step,
                state.max_steps,
                loss,
                float(logs.get("learning_rate", 0.0)),
                f"{logs['grad_norm']:.4f}" if isinstance(logs.get("grad_norm"), (int, float)) else "n/a",
                tps,
                state.epoch or 0.0,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        self.last_eval_step = state.global_step
        if loss is None:
            return
        if self.metrics is not None and math.isfinite(loss):
            self.metrics.eval_loss.set(loss)
        if self.is_main:
            LOG.info("eval step %d/%d eval_loss=%.6f", state.global_step, state.max_steps, loss)

    def on_save(self, args, state, control, **kwargs):
        if not self.is_main:
            return
        path = os.path.join(args.output_dir, c.checkpoint_name(state.global_step))
        ckpts.make_world_readable(path)  # docs/TRAINER.md pitfall 7: safetensors 0.8 writes 0600
        if ckpts.is_complete(path):
            self.report.checkpoint, self.report.checkpoint_step = path, state.global_step
            if self.metrics is not None:
                self.metrics.last_checkpoint_step.set(state.global_step)
            LOG.info("checkpoint saved: %s", path)
        else:
            LOG.warning("checkpoint %s looks incomplete after saving", path)
