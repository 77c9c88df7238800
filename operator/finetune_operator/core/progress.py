"""Folding trainer reports into status.progress and status.checkpoint."""

from __future__ import annotations

import math
import posixpath
from typing import Any

from finetune_contract import checkpoint_name

from ..api.models import CheckpointStatus, Progress, TrainingJobStatus
from .observation import PodObservation, ProgressSample


def _finite(value: float | None, digits: int = 4) -> float | None:
    # NaN/inf cannot be stored (JSON) and mean nothing to a reader; rounding keeps the
    # LOSS column readable and stops noise-level changes from looking like progress.
    return round(value, digits) if value is not None and math.isfinite(value) else None


def display(step: int | None, total: int | None) -> str | None:
    if step is None:
        return None
    return f"{step}/{total}" if total else str(step)


def fold_progress(old: Progress | None, sample: ProgressSample, now: Any) -> Progress:
    """Merge a scraped sample; update_time moves only when the step changes (the stall clock)."""
    old = old or Progress()
    step = sample.step if sample.step is not None else old.step
    stepped = sample.step is not None and sample.step != old.step
    total = sample.total_steps if sample.total_steps else old.total_steps
    return Progress(
        step=step,
        total_steps=total,
        epoch=_finite(sample.epoch) if sample.epoch is not None else old.epoch,
        loss=_finite(sample.loss) if sample.loss is not None else old.loss,
        tokens_per_second=(
            _finite(sample.tokens_per_second, 1) if sample.tokens_per_second is not None else old.tokens_per_second
        ),
        eval_loss=_finite(sample.eval_loss) if _finite(sample.eval_loss) is not None else old.eval_loss,
        display=display(step, total),
        update_time=now if stepped else old.update_time,
        heartbeat_time=sample.heartbeat_time or old.heartbeat_time,
    )


def final_progress(old: Progress | None, report: dict[str, Any] | Any, now: Any) -> Progress | None:
    """Progress from a completed trainer's termination message (step, maxSteps, loss)."""
    if not report:
        return old
    step = report.get("step")
    total = report.get("maxSteps")
    loss = report.get("loss")
    sample = ProgressSample(
        step=step if isinstance(step, int) else None,
        total_steps=total if isinstance(total, int) else None,
        loss=float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None,
    )
    return fold_progress(old, sample, now)


def running_checkpoint(
    old: CheckpointStatus | None, sample: ProgressSample | None, checkpoint_dir: str, now: Any
) -> CheckpointStatus | None:
    """The checkpoint a running trainer reports (finetune_trainer_last_checkpoint_step), so
    status.checkpoint follows training instead of waiting for the pod to exit."""
    step = sample.last_checkpoint_step if sample is not None else None
    if step is None or (old is not None and old.step is not None and step <= old.step):
        return old
    return CheckpointStatus(step=step, path=posixpath.join(checkpoint_dir, checkpoint_name(step)), time=now)


def latest_checkpoint(old: CheckpointStatus | None, pods: tuple[PodObservation, ...]) -> CheckpointStatus | None:
    """The highest-step checkpoint any trainer reported on exit; never moves backwards."""
    best = old
    for pod in pods:
        report = pod.termination_message or {}
        step, path = report.get("checkpointStep"), report.get("checkpoint")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(path, str) or not path:
            continue
        if best is None or best.step is None or step > best.step:
            term = pod.terminated
            best = CheckpointStatus(step=step, path=path, time=term.finished_at if term else None)
    return best


def status_changed_materially(old: TrainingJobStatus, new: TrainingJobStatus) -> bool:
    """True when anything but progress changed: such writes should not be rate-limited."""
    return old.model_copy(update={"progress": None}) != new.model_copy(update={"progress": None})
