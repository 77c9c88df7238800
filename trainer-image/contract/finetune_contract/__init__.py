"""The trainer contract shared by the operator and the trainer (docs/CONTRACTS.md).

This module must stay importable without torch, transformers or peft: the operator
imports it to build the trainer pod's environment and to parse the termination message.

- Environment variable names (``ENV_*``) and :class:`TrainerConfig` with
  :meth:`TrainerConfig.to_env` / :meth:`TrainerConfig.from_env`.
- Exit codes (``EXIT_*``).
- Termination message schema helpers (:func:`termination_message`, :func:`parse_termination_message`).
- Metric names (``METRIC_*``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

# --------------------------------------------------------------------------------------
# Environment variables (the operator sets them; the trainer reads them; CLI flags override)
# --------------------------------------------------------------------------------------
ENV_MODEL = "FT_MODEL"
ENV_DATASET = "FT_DATASET"
ENV_TEXT_FIELD = "FT_TEXT_FIELD"
ENV_PROMPT_FIELD = "FT_PROMPT_FIELD"
ENV_COMPLETION_FIELD = "FT_COMPLETION_FIELD"
ENV_OUTPUT_DIR = "FT_OUTPUT_DIR"
ENV_CHECKPOINT_DIR = "FT_CHECKPOINT_DIR"
ENV_SAVE_STEPS = "FT_SAVE_STEPS"
ENV_SAVE_TOTAL_LIMIT = "FT_SAVE_TOTAL_LIMIT"
ENV_MAX_STEPS = "FT_MAX_STEPS"
ENV_EPOCHS = "FT_EPOCHS"
ENV_LEARNING_RATE = "FT_LEARNING_RATE"
ENV_BATCH_SIZE = "FT_BATCH_SIZE"
ENV_GRAD_ACCUM = "FT_GRAD_ACCUM"
ENV_SEQ_LEN = "FT_SEQ_LEN"
ENV_SEED = "FT_SEED"
ENV_LORA_R = "FT_LORA_R"
ENV_LORA_ALPHA = "FT_LORA_ALPHA"
ENV_LORA_DROPOUT = "FT_LORA_DROPOUT"
ENV_LORA_TARGET_MODULES = "FT_LORA_TARGET_MODULES"
ENV_METRICS_PORT = "FT_METRICS_PORT"
ENV_METRICS_ADDR = "FT_METRICS_ADDR"
ENV_TERMINATION_LOG = "FT_TERMINATION_LOG"
ENV_NPROC_PER_NODE = "FT_NPROC_PER_NODE"
# A complete checkpoint of an earlier run to start from while the checkpoint directory has
# none of this run's own (set only when the user asked for it: spec.checkpoint.resumeFrom).
ENV_RESUME_FROM = "FT_RESUME_FROM"
# Seconds between SIGTERM and the trainer's own exit (save, then stop); the operator sets it a
# margin below the pod's terminationGracePeriodSeconds so the exit code and termination
# message are the trainer's, never the kubelet's SIGKILL.
ENV_STOP_TIMEOUT = "FT_STOP_TIMEOUT_SECONDS"

# Between the torchrun launcher and its workers only (not set by the operator): the
# launcher's pid (workers die with it) and a directory where every rank leaves its
# termination message, so the launcher can report the rank that failed first.
ENV_LAUNCHER_PID = "FT_LAUNCHER_PID"
ENV_RANK_REPORT_DIR = "FT_RANK_REPORT_DIR"

# Debug/test only (not part of the operator contract): sleep this many seconds after each
# optimizer step, so tests can observe and interrupt a run of a tiny model.
ENV_DEBUG_STEP_DELAY = "FT_DEBUG_STEP_DELAY"
# Debug/test only: sleep this many seconds before loading the model (a big model's load).
ENV_DEBUG_LOAD_DELAY = "FT_DEBUG_LOAD_DELAY"

# --------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------
EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_CONFIG_ERROR = 78  # EX_CONFIG: non-retryable
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after a checkpoint was saved

# --------------------------------------------------------------------------------------
# Termination message
# --------------------------------------------------------------------------------------
OUTCOME_COMPLETED = "completed"
OUTCOME_PREEMPTED = "preempted"
OUTCOME_CONFIG_ERROR = "config_error"
OUTCOME_ERROR = "error"
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_PREEMPTED, OUTCOME_CONFIG_ERROR, OUTCOME_ERROR)
OUTCOME_EXIT_CODES = {
    OUTCOME_COMPLETED: EXIT_COMPLETED,
    OUTCOME_PREEMPTED: EXIT_PREEMPTED,
    OUTCOME_CONFIG_ERROR: EXIT_CONFIG_ERROR,
    OUTCOME_ERROR: EXIT_ERROR,
}
TERMINATION_MESSAGE_MAX_BYTES = 4096
TERMINATION_MESSAGE_KEYS = (
    "outcome",
    "step",
    "maxSteps",
    "checkpoint",
    "checkpointStep",
    "loss",
    "resumedFrom",
    "message",
)
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
_MESSAGE_MAX_CHARS = 1024

# --------------------------------------------------------------------------------------
# Metrics (Prometheus text on FT_METRICS_PORT, path /metrics)
# --------------------------------------------------------------------------------------
METRIC_STEP = "finetune_trainer_step"
METRIC_TOTAL_STEPS = "finetune_trainer_total_steps"
METRIC_EPOCH = "finetune_trainer_epoch"
METRIC_LOSS = "finetune_trainer_loss"
METRIC_TOKENS_PER_SECOND = "finetune_trainer_tokens_per_second"
METRIC_LAST_CHECKPOINT_STEP = "finetune_trainer_last_checkpoint_step"
METRIC_HEARTBEAT = "finetune_trainer_heartbeat_timestamp_seconds"
METRIC_NAMES = (
    METRIC_STEP,
    METRIC_TOTAL_STEPS,
    METRIC_EPOCH,
    METRIC_LOSS,
    METRIC_TOKENS_PER_SECOND,
    METRIC_LAST_CHECKPOINT_STEP,
    METRIC_HEARTBEAT,
)
DEFAULT_METRICS_PORT = 9400
METRICS_PATH = "/metrics"
# Checkpoints are directories named checkpoint-<step> under the checkpoint directory.
CHECKPOINT_PREFIX = "checkpoint"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


# Rank 0 writes the port it serves on here (useful with FT_METRICS_PORT=0).
METRICS_PORT_FILE = "metrics-port"


# SIGTERM → exit when FT_STOP_TIMEOUT_SECONDS is unset (a pod's default grace period is 30 s).
DEFAULT_STOP_TIMEOUT_SECONDS = 25


def stop_timeout_for_grace(grace_seconds: int) -> int:
    """The trainer's stop deadline for a pod grace period: a margin (a quarter, 1 to 10 s)
    below it, for the launcher to collect the workers and write the termination message."""
    margin = max(1, min(10, grace_seconds // 4))
    return max(1, grace_seconds - margin)


class ConfigError(ValueError):
    """A bad configuration: the trainer exits with EXIT_CONFIG_ERROR (non-retryable)."""


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------
def _field(env: str, default: Any = None, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"env": env, **kw})


@dataclasses.dataclass
class TrainerConfig:
    """Everything the trainer needs; one field per FT_* variable.

    ``batch_size`` is per process (per GPU), as in HF ``per_device_train_batch_size``.
    ``max_steps`` wins over ``epochs``; when neither is set the trainer runs one epoch.
    ``checkpoint_dir`` defaults to ``<output_dir>/checkpoints``.
    ``save_total_limit`` 0 keeps every checkpoint.
    ``nproc_per_node`` 0 means "auto" (one process per visible GPU, at least one).
    ``stop_timeout`` bounds SIGTERM → exit, whatever blocks (a collective, a hung peer).
    """

    model: str = _field(ENV_MODEL, "")
    dataset: str = _field(ENV_DATASET, "")
    text_field: str = _field(ENV_TEXT_FIELD, "text")
    prompt_field: str | None = _field(ENV_PROMPT_FIELD, None)
    completion_field: str | None = _field(ENV_COMPLETION_FIELD, None)
    output_dir: str = _field(ENV_OUTPUT_DIR, "/checkpoints/output")
    checkpoint_dir: str | None = _field(ENV_CHECKPOINT_DIR, None)
    save_steps: int = _field(ENV_SAVE_STEPS, 100)
    save_total_limit: int = _field(ENV_SAVE_TOTAL_LIMIT, 3)
    max_steps: int | None = _field(ENV_MAX_STEPS, None)
    epochs: float | None = _field(ENV_EPOCHS, None)
    learning_rate: float = _field(ENV_LEARNING_RATE, 2e-4)
    batch_size: int = _field(ENV_BATCH_SIZE, 8)
    grad_accum: int = _field(ENV_GRAD_ACCUM, 1)
    seq_len: int = _field(ENV_SEQ_LEN, 512)
    seed: int = _field(ENV_SEED, 42)
    lora_r: int = _field(ENV_LORA_R, 8)
    lora_alpha: int = _field(ENV_LORA_ALPHA, 16)
    lora_dropout: float = _field(ENV_LORA_DROPOUT, 0.05)
    lora_target_modules: tuple[str, ...] = _field(ENV_LORA_TARGET_MODULES, ("q_proj", "v_proj"))
    metrics_port: int = _field(ENV_METRICS_PORT, DEFAULT_METRICS_PORT)
    metrics_addr: str = _field(ENV_METRICS_ADDR, "0.0.0.0")
    termination_log: str = _field(ENV_TERMINATION_LOG, DEFAULT_TERMINATION_LOG)
    nproc_per_node: int = _field(ENV_NPROC_PER_NODE, 1)
    stop_timeout: int = _field(ENV_STOP_TIMEOUT, DEFAULT_STOP_TIMEOUT_SECONDS)
    resume_from: str | None = _field(ENV_RESUME_FROM, None)

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = _split_modules(self.lora_target_modules)
        else:
            self.lora_target_modules = tuple(self.lora_target_modules)

    # -- derived ------------------------------------------------------------------------
    @property
    def effective_checkpoint_dir(self) -> str:
        return self.checkpoint_dir or os.path.join(self.output_dir, "checkpoints")

    # -- env round trip -----------------------------------------------------------------
    def to_env(self) -> dict[str, str]:
        """FT_* variables for this config; fields that are None are left out."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.metadata["env"]] = _format(value)
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerConfig:
        """Build a config from FT_* variables (``os.environ`` when ``env`` is None).

        Unset or empty variables take the default. Raises :class:`ConfigError` with a
        one-line reason when a value does not parse.
        """
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            kwargs[f.name] = parse_field(f.name, raw)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TrainerConfig:
        return dataclasses.replace(self, **changes)

    # -- validation ---------------------------------------------------------------------
    def problems(self) -> list[str]:
        """One-line descriptions of values that can never work (empty when fine)."""
        p: list[str] = []
        if not self.model:
            p.append(f"no model given ({ENV_MODEL})")
        if not self.dataset:
            p.append(f"no dataset given ({ENV_DATASET})")
        if not self.output_dir:
            p.append(f"no output directory given ({ENV_OUTPUT_DIR})")
        if bool(self.prompt_field) != bool(self.completion_field):
            p.append(f"{ENV_PROMPT_FIELD} and {ENV_COMPLETION_FIELD} must be set together")
        if not self.prompt_field and not self.text_field:
            p.append(f"{ENV_TEXT_FIELD} is empty")
        for name, minimum in (
            ("save_steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("seq_len", 2),
            ("lora_r", 1),
            ("lora_alpha", 1),
            ("save_total_limit", 0),
            ("nproc_per_node", 0),
            ("stop_timeout", 1),
        ):
            if getattr(self, name) < minimum:
                p.append(f"{_env_of(name)} must be >= {minimum}, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"{ENV_MAX_STEPS} must be >= 1, got {self.max_steps}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            p.append(f"{ENV_EPOCHS} must be > 0, got {self.epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            p.append(f"{ENV_LEARNING_RATE} must be > 0, got {self.learning_rate}")
        if not (0.0 <= self.lora_dropout < 1.0):
            p.append(f"{ENV_LORA_DROPOUT} must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            p.append(f"{ENV_LORA_TARGET_MODULES} is empty")
        if not (0 <= self.metrics_port <= 65535):
            p.append(f"{ENV_METRICS_PORT} must be in 0..65535, got {self.metrics_port}")
        return p


def _env_of(field_name: str) -> str:
    for f in dataclasses.fields(TrainerConfig):
        if f.name == field_name:
            return f.metadata["env"]
    raise KeyError(field_name)


def _split_modules(raw: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def _format(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


_INT_FIELDS = {
    "save_steps",
    "save_total_limit",
    "max_steps",
    "batch_size",
    "grad_accum",
    "seq_len",
    "seed",
    "lora_r",
    "lora_alpha",
    "metrics_port",
    "stop_timeout",
}
_FLOAT_FIELDS = {"epochs", "learning_rate", "lora_dropout"}


def parse_field(name: str, raw: str) -> Any:
    """Parse one field's string value (from env or CLI); ConfigError on bad input."""
    raw = raw.strip()
    try:
        if name in _INT_FIELDS:
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
        if name == "nproc_per_node":
            return 0 if raw.lower() == "auto" else int(raw)
        if name == "lora_target_modules":
            return _split_modules(raw)
    except ValueError:
        kind = "an integer" if name in _INT_FIELDS else "a number"
        raise ConfigError(f"{_env_of(name)} must be {kind}, got {raw!r}") from None
    return raw


# --------------------------------------------------------------------------------------
# Termination message helpers
# --------------------------------------------------------------------------------------
def one_line(text: str, limit: int = _MESSAGE_MAX_CHARS) -> str:
    """Collapse whitespace to single spaces and cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def termination_message(
    outcome: str,
    *,
    step: int = 0,
    max_steps: int | None = None,
    checkpoint: str | None = None,
    checkpoint_step: int | None = None,
    loss: float | None = None,
    resumed_from: int | None = None,
    message: str = "",
) -> dict[str, Any]:
    """Build a termination message dict with exactly the contract's keys."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    if loss is not None:
        loss = float(loss)
        if not math.isfinite(loss):
            loss = None  # JSON has no NaN/inf
    return {
        "outcome": outcome,
        "step": int(step or 0),
        "maxSteps": None if max_steps is None or max_steps < 0 else int(max_steps),
        "checkpoint": checkpoint,
        "checkpointStep": None if checkpoint_step is None else int(checkpoint_step),
        "loss": loss,
        "resumedFrom": None if resumed_from is None else int(resumed_from),
        "message": one_line(message),
    }


def encode_termination_message(msg: Mapping[str, Any]) -> str:
    """Serialize to compact JSON, guaranteed below TERMINATION_MESSAGE_MAX_BYTES."""
    data = dict(msg)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    limit = _MESSAGE_MAX_CHARS
    while len(text.encode()) >= TERMINATION_MESSAGE_MAX_BYTES and limit > 16:
        limit //= 2
        data["message"] = one_line(data.get("message", ""), limit)
        if data.get("checkpoint") and len(data["checkpoint"]) > limit:
            data["checkpoint"] = "..." + data["checkpoint"][-limit:]
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text


def parse_termination_message(text: object) -> dict[str, Any] | None:
    """Parse a termination message; None when it is empty or not ours (logs written by
    FallbackToLogsOnError, junk, an unknown outcome). Only the schema's keys, only those present."""
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("outcome") not in OUTCOMES:
        return None
    return {k: data[k] for k in TERMINATION_MESSAGE_KEYS if k in data}


def write_termination_message(path: str, msg: Mapping[str, Any]) -> bool:
    """Write the message to ``path`` (truncating it). Returns False when not writable.

    Written in place, not via rename: /dev/termination-log is a bind-mounted file.
    """
    if not path:
        return False
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(encode_termination_message(msg))
            fh.flush()
            try:
                os.fsync(fh.fileno())
            except OSError:
                pass
        return True
    except OSError:
        return False
