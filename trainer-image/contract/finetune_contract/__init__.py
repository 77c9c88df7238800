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
ENV_DATASET_FORMAT = "FT_DATASET_FORMAT"
# A JSON object passed through to HF TrainingArguments (spec.trainingArguments).
ENV_TRAINING_ARGUMENTS = "FT_TRAINING_ARGUMENTS"
ENV_MESSAGES_FIELD = "FT_MESSAGES_FIELD"
# An eval split: a dataset of its own, or a fraction held out of the training data (not both),
# evaluated every FT_EVAL_STEPS steps (default FT_SAVE_STEPS) and at the end.
ENV_EVAL_DATASET = "FT_EVAL_DATASET"
ENV_EVAL_FRACTION = "FT_EVAL_FRACTION"
ENV_EVAL_STEPS = "FT_EVAL_STEPS"
ENV_OUTPUT_DIR = "FT_OUTPUT_DIR"
# true: also save the base model with the LoRA merged into it, under <FT_OUTPUT_DIR>/merged.
ENV_MERGE = "FT_MERGE"
# An S3-compatible store the output directory is copied to after training (rank 0, once per
# completed attempt; docs/TRAINER.md "Push"). Credentials are AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN optional), from a Secret; the endpoint is a URL.
ENV_PUSH_S3_BUCKET = "FT_PUSH_S3_BUCKET"
ENV_PUSH_S3_PREFIX = "FT_PUSH_S3_PREFIX"
ENV_PUSH_S3_ENDPOINT = "FT_PUSH_S3_ENDPOINT"
ENV_PUSH_S3_REGION = "FT_PUSH_S3_REGION"
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
# Memory: lora | qlora (a 4-bit base via bitsandbytes; needs a CUDA GPU), the precision,
# gradient checkpointing (docs/TRAINER.md "Memory").
ENV_METHOD = "FT_METHOD"
ENV_PRECISION = "FT_PRECISION"
ENV_GRADIENT_CHECKPOINTING = "FT_GRADIENT_CHECKPOINTING"
# true: concatenate tokenized examples into sequences of FT_SEQ_LEN tokens (docs/TRAINER.md "Packing").
ENV_PACKING = "FT_PACKING"
# ddp (a copy of the model per GPU) | fsdp (parameters sharded across the GPUs; docs/TRAINER.md "FSDP").
ENV_STRATEGY = "FT_STRATEGY"
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

# Multi-node jobs (one pod per node, docs/CONTRACTS.md "Gangs"): torchrun's own options as
# its PET_* variables. Static rendezvous on rank 0's TCP store: the pod of rank r is node r,
# so global rank 0 (checkpoints, adapter, metrics) always runs in the pod of rank 0.
ENV_NNODES = "PET_NNODES"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_MASTER_PORT = "PET_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500  # torchrun's default


def gang_env(nodes: int, node_rank: int, master_addr: str, master_port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
    """torchrun's rendezvous settings for the pod of `node_rank` in a gang of `nodes` pods."""
    return {ENV_NNODES: str(nodes), ENV_NODE_RANK: str(node_rank), ENV_MASTER_ADDR: master_addr,
            ENV_MASTER_PORT: str(master_port)}


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
    "pushed",
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
METRIC_EVAL_LOSS = "finetune_trainer_eval_loss"
METRIC_NAMES = (
    METRIC_STEP,
    METRIC_TOTAL_STEPS,
    METRIC_EPOCH,
    METRIC_LOSS,
    METRIC_TOKENS_PER_SECOND,
    METRIC_LAST_CHECKPOINT_STEP,
    METRIC_HEARTBEAT,
    METRIC_EVAL_LOSS,
)
DEFAULT_METRICS_PORT = 9400
METRICS_PATH = "/metrics"
# Checkpoints are directories named checkpoint-<step> under the checkpoint directory.
CHECKPOINT_PREFIX = "checkpoint"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


# Rank 0 writes the port it serves on here (useful with FT_METRICS_PORT=0).
METRICS_PORT_FILE = "metrics-port"

METHOD_LORA = "lora"
METHOD_QLORA = "qlora"
METHODS = (METHOD_LORA, METHOD_QLORA)
# auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
STRATEGY_DDP = "ddp"
STRATEGY_FSDP = "fsdp"
STRATEGIES = (STRATEGY_DDP, STRATEGY_FSDP)

# Where FT_MERGE puts the merged model, inside the output directory.
MERGED_SUBDIR = "merged"

# The trainer's own files (tokenized dataset cache, TensorBoard logs, the metrics-port file)
# live in this subdirectory of the checkpoint directory, never next to the adapter.
WORK_SUBDIR = "trainer"

# TrainingArguments keys the operator and the trainer set themselves, with what sets them:
# refused in spec.trainingArguments (by the API's validation and again by the trainer, exit 78).
OWNED_TRAINING_ARGUMENTS = {
    "output_dir": "the job's checkpoint directory",
    "overwrite_output_dir": "the job's checkpoint directory",
    "logging_dir": "the trainer (TensorBoard logs go under the checkpoint directory)",
    "resume_from_checkpoint": "the trainer's checkpoint picker (spec.checkpoint.resumeFrom)",
    "save_strategy": "spec.checkpoint.everySteps",
    "save_steps": "spec.checkpoint.everySteps",
    "save_total_limit": "spec.checkpoint.keep",
    "save_on_each_node": "the trainer (rank 0 saves to the shared volume)",
    "save_only_model": "the trainer (resuming needs the optimizer state)",
    "enable_jit_checkpoint": "the trainer's SIGTERM handling",
    "max_steps": "spec.hyperparameters.maxSteps",
    "num_train_epochs": "spec.hyperparameters.epochs",
    "per_device_train_batch_size": "spec.hyperparameters.batchSize",
    "gradient_accumulation_steps": "spec.hyperparameters.gradientAccumulationSteps",
    "learning_rate": "spec.hyperparameters.learningRate",
    "seed": "spec.hyperparameters.seed",
    "data_seed": "spec.hyperparameters.seed",
    "logging_strategy": "the trainer (progress and metrics every step)",
    "logging_steps": "the trainer (progress and metrics every step)",
    "disable_tqdm": "the trainer (one log line per step)",
    "include_num_input_tokens_seen": "the trainer (the tokens-per-second metric)",
    "remove_unused_columns": "the trainer (its tokenized columns)",
    "use_cpu": "the trainer (GPU when one is visible)",
    "bf16": "spec.hyperparameters.precision",
    "fp16": "spec.hyperparameters.precision",
    "gradient_checkpointing": "spec.hyperparameters.gradientCheckpointing",
    "eval_strategy": "spec.evaluation (evaluates when an eval split is set)",
    "do_eval": "spec.evaluation (evaluates when an eval split is set)",
    "eval_steps": "spec.evaluation.everySteps",
    "push_to_hub": "spec.output.push (S3-compatible stores; the HF Hub is not offered yet)",
    "fsdp": "spec.strategy (fsdp_config may still be tuned)",
}


def owned_training_argument_problems(arguments: Mapping[str, Any] | None) -> list[str]:
    """One line per key of ``arguments`` that the operator or trainer sets itself."""
    return [
        f"trainingArguments.{key} is set by {OWNED_TRAINING_ARGUMENTS[key]}, not in trainingArguments"
        for key in sorted(arguments or {})
        if key in OWNED_TRAINING_ARGUMENTS
    ]


# Dataset formats (FT_DATASET_FORMAT; unset: inferred, see docs/TRAINER.md "Data").
FORMAT_TEXT = "text"
FORMAT_PROMPT_COMPLETION = "prompt-completion"
FORMAT_MESSAGES = "messages"
DATASET_FORMATS = (FORMAT_TEXT, FORMAT_PROMPT_COMPLETION, FORMAT_MESSAGES)


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

    model: str = _field(ENV_MODEL, "", help="Base model: a local directory (with config.json) or a hub id.")
    dataset: str = _field(
        ENV_DATASET, "", help="Dataset: a .jsonl, .json or .parquet file, or a directory of files of one kind."
    )
    text_field: str = _field(ENV_TEXT_FIELD, "text", help="Field holding the text (format text).")
    prompt_field: str | None = _field(
        ENV_PROMPT_FIELD, None, help="Field holding the prompt (format prompt-completion; unset: 'prompt')."
    )
    completion_field: str | None = _field(
        ENV_COMPLETION_FIELD,
        None,
        help="Field holding the completion (format prompt-completion; unset: 'completion').",
    )
    dataset_format: str | None = _field(
        ENV_DATASET_FORMAT,
        None,
        help="text | prompt-completion | messages; unset: inferred from the fields and the data's columns.",
    )
    messages_field: str = _field(
        ENV_MESSAGES_FIELD, "messages", help="Field holding a conversation: a list of {role, content} (messages)."
    )
    eval_dataset: str | None = _field(
        ENV_EVAL_DATASET, None, help="Eval split: a dataset (file or directory) in the training data's format."
    )
    eval_fraction: float | None = _field(
        ENV_EVAL_FRACTION, None, help="Eval split: this fraction (0 to 0.5) of the training data, held out."
    )
    eval_steps: int | None = _field(
        ENV_EVAL_STEPS, None, help="Evaluate every N steps and at the end (with an eval split); unset: save-steps."
    )
    training_arguments: dict[str, Any] | None = _field(
        ENV_TRAINING_ARGUMENTS,
        None,
        help="JSON object passed to HF TrainingArguments; keys the trainer sets are refused.",
    )
    output_dir: str = _field(ENV_OUTPUT_DIR, "/checkpoints/output", help="Where the final adapter is written.")
    merge: bool = _field(
        ENV_MERGE, False, help="Also save the base model with the adapter merged into it, under <output-dir>/merged."
    )
    push_s3_bucket: str | None = _field(
        ENV_PUSH_S3_BUCKET, None, help="After training, copy the output directory to this S3 bucket (rank 0)."
    )
    push_s3_prefix: str | None = _field(
        ENV_PUSH_S3_PREFIX, None, help="Key prefix of the pushed files in the bucket; unset: the bucket's root."
    )
    push_s3_endpoint: str | None = _field(
        ENV_PUSH_S3_ENDPOINT,
        None,
        help="S3-compatible endpoint URL (http(s)://host[:port]); unset: AWS S3 (https://s3.amazonaws.com).",
    )
    push_s3_region: str | None = _field(
        ENV_PUSH_S3_REGION, None, help="Region of the bucket; unset: asked of the store."
    )
    checkpoint_dir: str | None = _field(
        ENV_CHECKPOINT_DIR,
        None,
        help="Checkpoints and the trainer's own files (under trainer/); unset: <output-dir>/checkpoints.",
    )
    save_steps: int = _field(ENV_SAVE_STEPS, 100, help="Save a checkpoint every N optimizer steps.")
    save_total_limit: int = _field(ENV_SAVE_TOTAL_LIMIT, 3, help="Checkpoints kept; 0 keeps every one.")
    max_steps: int | None = _field(ENV_MAX_STEPS, None, help="Total optimizer steps (wins over epochs).")
    epochs: float | None = _field(
        ENV_EPOCHS, None, help="Passes over the dataset when max-steps is unset; neither set: one epoch."
    )
    learning_rate: float = _field(ENV_LEARNING_RATE, 2e-4, help="Peak learning rate.")
    batch_size: int = _field(ENV_BATCH_SIZE, 8, help="Examples per process (per GPU) per micro-batch.")
    grad_accum: int = _field(ENV_GRAD_ACCUM, 1, help="Micro-batches accumulated per optimizer step.")
    seq_len: int = _field(ENV_SEQ_LEN, 512, help="Maximum tokens per example (longer ones are truncated).")
    seed: int = _field(ENV_SEED, 42, help="Random seed (also the data order's seed).")
    lora_r: int = _field(ENV_LORA_R, 8, help="LoRA rank.")
    lora_alpha: int = _field(ENV_LORA_ALPHA, 16, help="LoRA scaling factor.")
    lora_dropout: float = _field(ENV_LORA_DROPOUT, 0.05, help="Dropout on the LoRA layers, in [0, 1).")
    lora_target_modules: tuple[str, ...] = _field(
        ENV_LORA_TARGET_MODULES, ("q_proj", "v_proj"), help="Modules to adapt, comma separated, or all-linear."
    )
    method: str = _field(
        ENV_METHOD, METHOD_LORA, help="lora, or qlora: the base model loaded in 4 bits (bitsandbytes; CUDA only)."
    )
    precision: str = _field(
        ENV_PRECISION,
        "auto",
        help="auto | bf16 | fp16 | fp32; auto: bf16 where supported, fp16 on older GPUs, fp32 on CPU.",
    )
    gradient_checkpointing: bool = _field(
        ENV_GRADIENT_CHECKPOINTING, False, help="Recompute activations in the backward pass: less memory, slower steps."
    )
    packing: bool = _field(
        ENV_PACKING, False, help="Pack tokenized examples into sequences of seq-len tokens (fewer, fuller steps)."
    )
    strategy: str = _field(
        ENV_STRATEGY, STRATEGY_DDP, help="ddp | fsdp: with several processes, replicate the model or shard it (FSDP2)."
    )
    metrics_port: int = _field(
        ENV_METRICS_PORT, DEFAULT_METRICS_PORT, help="Prometheus /metrics port on rank 0; 0 picks a free one."
    )
    metrics_addr: str = _field(ENV_METRICS_ADDR, "0.0.0.0", help="Address the metrics server listens on.")
    termination_log: str = _field(
        ENV_TERMINATION_LOG, DEFAULT_TERMINATION_LOG, help="File the JSON termination message is written to."
    )
    nproc_per_node: int = _field(
        ENV_NPROC_PER_NODE, 1, help="Processes per node (torchrun when > 1); auto (0): one per visible GPU."
    )
    stop_timeout: int = _field(
        ENV_STOP_TIMEOUT, DEFAULT_STOP_TIMEOUT_SECONDS, help="Seconds from SIGTERM to the trainer's own exit."
    )
    resume_from: str | None = _field(
        ENV_RESUME_FROM, None, help="A complete checkpoint to start from while the checkpoint dir has none."
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = _split_modules(self.lora_target_modules)
        else:
            self.lora_target_modules = tuple(self.lora_target_modules)

    # -- derived ------------------------------------------------------------------------
    @property
    def effective_checkpoint_dir(self) -> str:
        return self.checkpoint_dir or os.path.join(self.output_dir, "checkpoints")

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_dataset) or self.eval_fraction is not None

    @property
    def push_uri(self) -> str | None:
        """Where the output directory is pushed: s3://<bucket>/<prefix>/, or None."""
        if not self.push_s3_bucket:
            return None
        prefix = (self.push_s3_prefix or "").strip("/")
        return f"s3://{self.push_s3_bucket}/{prefix + '/' if prefix else ''}"

    @property
    def work_dir(self) -> str:
        """The trainer's own files: dataset cache, TensorBoard logs, metrics-port."""
        return os.path.join(self.effective_checkpoint_dir, WORK_SUBDIR)

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
        if self.dataset_format is not None and self.dataset_format not in DATASET_FORMATS:
            formats = ", ".join(DATASET_FORMATS)
            p.append(f"{ENV_DATASET_FORMAT} must be one of {formats}, got {self.dataset_format!r}")
        if self.prompt_field and self.dataset_format in (FORMAT_TEXT, FORMAT_MESSAGES):
            p.append(f"{ENV_PROMPT_FIELD}/{ENV_COMPLETION_FIELD} apply only to {ENV_DATASET_FORMAT}=prompt-completion")
        if not self.messages_field:
            p.append(f"{ENV_MESSAGES_FIELD} is empty")
        p.extend(owned_training_argument_problems(self.training_arguments))
        if self.eval_dataset and self.eval_fraction is not None:
            p.append(f"set {ENV_EVAL_DATASET} or {ENV_EVAL_FRACTION}, not both")
        if self.eval_fraction is not None and not (0 < self.eval_fraction <= 0.5):
            p.append(f"{ENV_EVAL_FRACTION} must be in (0, 0.5], got {self.eval_fraction}")
        if self.eval_steps is not None and self.eval_steps < 1:
            p.append(f"{ENV_EVAL_STEPS} must be >= 1, got {self.eval_steps}")
        if self.method not in METHODS:
            p.append(f"{ENV_METHOD} must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            p.append(f"{ENV_PRECISION} must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        p.extend(strategy_problems(self.strategy, self.method))
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
        if not self.push_s3_bucket and (self.push_s3_prefix or self.push_s3_endpoint or self.push_s3_region):
            p.append(f"{ENV_PUSH_S3_PREFIX}/{ENV_PUSH_S3_ENDPOINT}/{ENV_PUSH_S3_REGION} need {ENV_PUSH_S3_BUCKET}")
        if self.push_s3_endpoint and not self.push_s3_endpoint.startswith(("http://", "https://")):
            p.append(f"{ENV_PUSH_S3_ENDPOINT} must be an http:// or https:// URL, got {self.push_s3_endpoint!r}")
        if not (0 <= self.metrics_port <= 65535):
            p.append(f"{ENV_METRICS_PORT} must be in 0..65535, got {self.metrics_port}")
        return p


def strategy_problems(strategy: str, method: str) -> list[str]:
    """FT_STRATEGY values that can never work (the API refuses the same pair as spec.strategy/spec.method)."""
    if strategy not in STRATEGIES:
        return [f"{ENV_STRATEGY} must be one of {', '.join(STRATEGIES)}, got {strategy!r}"]
    if strategy == STRATEGY_FSDP and method == METHOD_QLORA:
        # FSDP would have to shard bitsandbytes' packed 4-bit weights (docs/TRAINER.md "FSDP")
        return [f"{ENV_STRATEGY}=fsdp with {ENV_METHOD}=qlora is not supported: use strategy ddp with qlora, "
                f"or method lora with fsdp"]
    return []


def _env_of(field_name: str) -> str:
    for f in dataclasses.fields(TrainerConfig):
        if f.name == field_name:
            return f.metadata["env"]
    raise KeyError(field_name)


def _split_modules(raw: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
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
    "eval_steps",
}
_FLOAT_FIELDS = {"epochs", "learning_rate", "lora_dropout", "eval_fraction"}
_BOOL_FIELDS = {"merge", "gradient_checkpointing", "packing"}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def field_type(name: str) -> str:
    """How a field's value is written on the command line or in its variable (for --help)."""
    if name in _INT_FIELDS:
        return "int"
    if name in _FLOAT_FIELDS:
        return "float"
    if name in _BOOL_FIELDS:
        return "bool"
    return {"nproc_per_node": "int or auto", "lora_target_modules": "list", "training_arguments": "JSON"}.get(
        name, "str"
    )


def field_default(name: str) -> str:
    """A field's default as --help shows it."""
    for f in dataclasses.fields(TrainerConfig):
        if f.name == name:
            return "unset" if f.default is None else (_format(f.default) or '""')
    raise KeyError(name)


def parse_field(name: str, raw: str) -> Any:
    """Parse one field's string value (from env or CLI); ConfigError on bad input."""
    raw = raw.strip()
    if name == "training_arguments":
        return _json_object(name, raw)
    if name in _BOOL_FIELDS:
        if raw.lower() not in _BOOLS:
            raise ConfigError(f"{_env_of(name)} must be true or false, got {raw!r}")
        return _BOOLS[raw.lower()]
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


def _json_object(name: str, raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{_env_of(name)} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{_env_of(name)} must be a JSON object, got {type(value).__name__}")
    return value


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
    pushed: str | None = None,
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
        "pushed": pushed,
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
