"""Checkpoint files (torch-free): discovery, where a run starts, publishing an adapter.

A checkpoint directory ``checkpoint-<step>`` is *complete* when it holds
``trainer_state.json`` (the HF Trainer writes it last) and no
``checkpoint-is-incomplete.txt`` sentinel (written by transformers' JIT checkpointing
while a save is in progress). ``transformers.trainer_utils.get_last_checkpoint`` ignores
both (docs/TRAINER.md pitfall 1), hence this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat

import finetune_contract as contract

from .util import LOG

CHECKPOINT_PREFIX = contract.CHECKPOINT_PREFIX
TRAINER_STATE_NAME = "trainer_state.json"
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"
# Incomplete checkpoints are renamed to this prefix: out of the way of the HF Trainer's
# `checkpoint-*` glob (rotation, a later save of the same step) and of this picker.
QUARANTINE_PREFIX = "incomplete-"

_RE_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str
    step: int


@dataclasses.dataclass(frozen=True)
class Scan:
    """Result of scanning a checkpoint directory."""

    latest: Checkpoint | None
    incomplete: tuple[Checkpoint, ...]  # half-written: skipped


def checkpoint_step(name: str) -> int | None:
    """Step of a ``checkpoint-<step>`` directory name, else None."""
    m = _RE_CHECKPOINT.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)) and not os.path.exists(
        os.path.join(path, INCOMPLETE_SENTINEL)
    )


def scan(directory: str) -> Scan:
    """Classify the ``checkpoint-<step>`` directories under ``directory``.

    A missing directory scans as empty.
    """
    complete: list[Checkpoint] = []
    incomplete: list[Checkpoint] = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        step = checkpoint_step(name)
        path = os.path.join(directory, name)
        if step is None or not os.path.isdir(path):
            continue
        (complete if is_complete(path) else incomplete).append(Checkpoint(path, step))
    complete.sort(key=lambda c: c.step)
    incomplete.sort(key=lambda c: c.step)
    return Scan(complete[-1] if complete else None, tuple(incomplete))


def latest_complete_checkpoint(directory: str) -> Checkpoint | None:
    """The complete checkpoint with the highest step, or None."""
    return scan(directory).latest


def quarantine(checkpoint: Checkpoint) -> str:
    """Rename an incomplete checkpoint to ``incomplete-checkpoint-<step>``; returns the new path.

    An older quarantined copy of the same step is replaced.
    """
    parent, name = os.path.split(checkpoint.path)
    target = os.path.join(parent, QUARANTINE_PREFIX + name)
    if os.path.lexists(target):
        shutil.rmtree(target, ignore_errors=True)
    os.replace(checkpoint.path, target)
    return target


def make_world_readable(path: str, suffix: str = ".safetensors") -> int:
    """chmod 0644 the ``*.safetensors`` files under ``path`` (safetensors 0.8 writes 0600).

    Returns how many files were changed.
    """
    changed = 0
    for root, _dirs, files in os.walk(path):
        for fn in files:
            if not fn.endswith(suffix):
                continue
            fp = os.path.join(root, fn)
            try:
                mode = stat.S_IMODE(os.stat(fp).st_mode)
                if mode & 0o044 != 0o044:
                    os.chmod(fp, mode | 0o644)
                    changed += 1
            except OSError:
                pass
    return changed


def explicit_start(path: str) -> Checkpoint:
    """The checkpoint a run was asked to start from (FT_RESUME_FROM): it must be complete;
    its step comes from its trainer state (the mount point's name carries none)."""
    if not os.path.isdir(path):
        raise contract.ConfigError(f"resume-from checkpoint (spec.checkpoint.resumeFrom) not found: {path}")
    if not is_complete(path):
        raise contract.ConfigError(
            f"resume-from checkpoint (spec.checkpoint.resumeFrom) is not a complete checkpoint: "
            f"no {TRAINER_STATE_NAME} in {path} (name a checkpoint-<step> directory)"
        )
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as fh:
            step = int(json.load(fh).get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise contract.ConfigError(f"resume-from checkpoint has an unreadable {TRAINER_STATE_NAME}: {e}") from None
    return Checkpoint(path=path, step=step)


def choose_start(directory: str, resume_from: str | None = None) -> tuple[Checkpoint | None, list[str]]:
    """Where a run starts: its own latest complete checkpoint in ``directory``, else the
    explicitly requested ``resume_from``, else None (from scratch).

    Incomplete checkpoints are moved aside (docs/TRAINER.md pitfall 1); their names are returned.
    """
    os.makedirs(directory, exist_ok=True)
    found = scan(directory)
    skipped = [_set_aside(bad) for bad in found.incomplete]
    latest = found.latest
    if latest is None and resume_from:
        latest = explicit_start(resume_from)
        LOG.info("no checkpoint of this run yet: starting from %s (step %d), as asked", resume_from, latest.step)
    return latest, skipped


def _set_aside(bad: Checkpoint) -> str:
    name = os.path.basename(bad.path)
    try:
        moved = quarantine(bad)
        LOG.warning("skipping incomplete checkpoint %s (moved to %s)", name, os.path.basename(moved))
    except OSError as e:
        LOG.warning("skipping incomplete checkpoint %s (could not move it: %s)", name, e)
    return name


def already_complete(checkpoint: Checkpoint, max_steps: int | None) -> tuple[int | None, float | None]:
    """(the run's total steps, last logged loss) when ``checkpoint`` already reached them, else (None, None).

    The total is ``max_steps`` (FT_MAX_STEPS), or in epoch mode the total recorded in the checkpoint.
    """
    try:
        with open(os.path.join(checkpoint.path, TRAINER_STATE_NAME), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None, None
    target = max_steps or state.get("max_steps")
    step = state.get("global_step", checkpoint.step)
    if isinstance(target, int) and target > 0 and step >= target:
        losses = [h["loss"] for h in state.get("log_history", []) if isinstance(h.get("loss"), (int, float))]
        return target, (float(losses[-1]) if losses else None)
    return None, None


_NOT_ADAPTER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", TRAINER_STATE_NAME)


def publish_adapter(checkpoint: str, output_dir: str) -> None:
    """Copy a checkpoint's adapter (+ tokenizer files) to the output directory, world-readable."""
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(checkpoint)):
        src = os.path.join(checkpoint, name)
        if not os.path.isfile(src) or name in _NOT_ADAPTER_FILES or name.startswith("rng_state"):
            continue
        tmp = os.path.join(output_dir, f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(output_dir, name))
