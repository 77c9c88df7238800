"""The TrainingJob API (finetune.dev/v1alpha1) as pydantic models.

These models are the single definition of the API: the operator validates every spec with
them before acting, and `finetune_operator.api.crd` turns their JSON schema into the CRD's
structural OpenAPI schema. Field descriptions therefore double as `kubectl explain` text.

Conventions: snake_case attributes, camelCase aliases (the YAML names); spec models forbid
unknown fields (a typo in code fails loudly; `parsing.parse_spec` leaves out those of a newer
CRD, which only version skew can deliver); status models ignore them (an older or newer
operator may have written extras).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

import finetune_contract as contract

from ..storage import split_claim_uri

# --- names fixed by docs/CONTRACTS.md -------------------------------------------------------
GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ("tj",)
CATEGORIES = ("training",)

LABEL_JOB_NAME = "finetune.dev/job-name"
LABEL_ATTEMPT = "finetune.dev/attempt"
# Multi-node jobs (docs/CONTRACTS.md "Gangs"): the pod's node rank, and the attempt's gang as
# one label value for a gang scheduler or Kueue pod group to select on.
LABEL_RANK = "finetune.dev/rank"
LABEL_POD_GROUP = "finetune.dev/pod-group"
ANNOTATION_GANG_SIZE = "finetune.dev/gang-size"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
TRAINER_CONTAINER = "trainer"
METRICS_PORT = contract.DEFAULT_METRICS_PORT
# Job names become a pod label value, which Kubernetes caps at 63 characters.
MAX_JOB_NAME_LENGTH = 63
# A Service name (RFC 1035 label): with workers > 1 the job's name names its headless Service.
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# LocalQueue and WorkloadPriorityClass names become pod label values (Kueue's labels), so they
# must be object names (DNS subdomains) that fit a label value (63 characters).
KUEUE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

# Spec fields (YAML names) that define a run: immutable once the job exists (CEL transition
# rules), fingerprinted in status to catch an edit that bypassed them. Of checkpoint, only
# its location and starting point; suspend, runPolicy, failurePolicy and template stay editable.
RUN_FIELDS = (
    "image", "model", "dataset", "method", "lora", "hyperparameters", "resources", "workers", "trainingArguments",
    "strategy",
)
RUN_CHECKPOINT_FIELDS = ("claimName", "mountPath", "resumeFrom")

PHASES = ("Queued", "Starting", "Running", "Resuming", "Suspended", "Succeeded", "Failed")
Phase = Literal["Queued", "Starting", "Running", "Resuming", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# Bounds status counters: a hand-written huge value is refused (and dropped when read back)
# instead of overflowing int64 on the operator's next increment and wedging the job.
MAX_ATTEMPTS = 1_000_000
MAX_WORKERS = 1024

# Kubernetes resource.Quantity, as accepted by the apiserver.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


# --- shared building blocks -----------------------------------------------------------------
class SpecModel(BaseModel):
    """Base of every spec model: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


class StatusModel(BaseModel):
    """Base of every status model: camelCase in YAML, unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="ignore",
        frozen=True,
    )


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _quantity(value: Any) -> Any:
    # YAML users write `cpu: 4`; the apiserver accepts int-or-string, so do we.
    if isinstance(value, bool):
        return value  # let the str validator reject it
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return format(value, "g")
    return value


def _check_quantity(value: str | None) -> str | None:
    if value is not None and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 32Gi)")
    return value


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 with second precision, the way Kubernetes writes metav1.Time."""
    return _as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


NonEmptyStr = Annotated[str, AfterValidator(_not_blank)]
Quantity = Annotated[
    str | None,
    BeforeValidator(_quantity),
    AfterValidator(_check_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
Timestamp = Annotated[datetime, AfterValidator(_as_utc), PlainSerializer(format_time, return_type=str)]
FreeForm = dict[str, Any]


# --- spec -----------------------------------------------------------------------------------
class Dataset(SpecModel):
    """The training data: JSON Lines, JSON or Parquet files the trainer reads with HF datasets."""

    path: NonEmptyStr = Field(
        max_length=4096,
        description="Path of the dataset inside the pod (typically on a mounted volume): a .jsonl, .json or "
        ".parquet file, or a directory of such files (one kind).",
    )
    format: Literal["text", "prompt-completion", "messages"] | None = Field(
        None,
        description="text: loss on every token of textField; prompt-completion: loss on the completion only; "
        "messages: conversations rendered with the tokenizer's chat template, loss on the assistant turns only. "
        "Unset: prompt-completion when promptField is set, else messages when the data has a messagesField "
        "column and no textField column, else prompt-completion when it has prompt and completion columns "
        "and no textField column, else text.",
    )
    messages_field: str = Field(
        "messages",
        min_length=1,
        max_length=256,
        description="Field holding a conversation: a list of {role, content} messages (format messages).",
    )
    text_field: str = Field(
        "text", min_length=1, max_length=256, description="JSON field holding the training text."
    )
    prompt_field: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="JSON field holding the prompt (prompt/completion datasets; used with completionField).",
    )
    completion_field: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="JSON field holding the completion (prompt/completion datasets; used with promptField).",
    )
    packing: bool = Field(
        False,
        description="Pack tokenized examples into sequences of hyperparameters.sequenceLength tokens: fewer, "
        "fuller steps. Each example keeps its own attention and loss mask (docs/TRAINER.md \"Packing\").",
    )

    @model_validator(mode="after")
    def _prompt_and_completion_together(self) -> Dataset:
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ValueError("set promptField and completionField together (or neither, to train on textField)")
        if self.prompt_field is not None and self.format in ("text", "messages"):
            raise ValueError(f"promptField and completionField need format prompt-completion, not {self.format}")
        return self


class LoRA(SpecModel):
    """Low-rank adaptation settings (peft LoraConfig)."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the LoRA update matrices.")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling factor (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout applied to the LoRA layers (0 <= dropout < 1).")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Names of the modules to adapt, e.g. q_proj, v_proj.",
        json_schema_extra={"default": ["q_proj", "v_proj"]},
    )


class Hyperparameters(SpecModel):
    """Optimisation settings. Set maxSteps or epochs (maxSteps wins when both are set)."""

    max_steps: int | None = Field(None, ge=1, le=100_000_000, description="Total optimiser steps.")
    epochs: float | None = Field(
        None, gt=0, le=100_000, description="Passes over the dataset (used when maxSteps is not set)."
    )
    learning_rate: float = Field(2e-4, gt=0, le=10, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, le=65_536, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=65_536, description="Micro-batches accumulated per optimiser step."
    )
    sequence_length: int = Field(512, ge=2, le=1_048_576, description="Maximum tokens per example.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Random seed.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Training precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; "
        "fp16 needs a GPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less GPU memory, slower steps."
    )

    @model_validator(mode="after")
    def _needs_a_length(self) -> Hyperparameters:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set maxSteps or epochs")
        return self


class Resources(SpecModel):
    """Compute per worker."""

    gpus: int = Field(1, ge=0, le=64, description="nvidia.com/gpu per worker (requests = limits).")
    cpu: Quantity = Field(None, description="CPU request per worker, e.g. 8 or 7500m.")
    memory: Quantity = Field(None, description="Memory request and limit per worker, e.g. 64Gi.")


class Checkpoint(SpecModel):
    """Where and how often checkpoints are written."""

    claim_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="PersistentVolumeClaim holding checkpoints; without it an emptyDir is used "
        "(checkpoints then do not survive a new pod).",
    )
    mount_path: str = Field(
        "/checkpoints",
        pattern=r"^/",
        max_length=4096,
        description="Absolute path where the checkpoint volume is mounted in the trainer.",
    )
    every_steps: int = Field(100, ge=1, le=100_000_000, description="Save a checkpoint every N steps.")
    keep: int = Field(3, ge=1, le=1000, description="How many checkpoints to keep on the volume.")
    resume_from: str | None = Field(
        None,
        max_length=4096,
        pattern=r"^pvc://[^/]+/[^/].*$",
        description="Start from this checkpoint of an earlier run, on the same claim: "
        "pvc://<claimName>/<path>, e.g. status.checkpointPath of the earlier job plus /checkpoint-<step>. "
        "Used only while this job has no checkpoint of its own; a job never starts from another "
        "job's files unless asked here.",
    )

    @model_validator(mode="after")
    def _resume_from_same_claim(self) -> Checkpoint:
        if self.resume_from is None:
            return self
        if self.claim_name is None:
            raise ValueError("resumeFrom needs claimName: the checkpoint is read from that claim")
        if ".." in self.resume_from.split("/"):
            raise ValueError("resumeFrom must not contain '..'")
        split = split_claim_uri(self.resume_from)
        if split is None or split[0] != self.claim_name:
            raise ValueError(f"resumeFrom must be on the job's claim: pvc://{self.claim_name}/<path>")
        return self


class Evaluation(SpecModel):
    """An eval split; its loss reaches status.progress.evalLoss and the trainer's metrics."""

    fraction: float | None = Field(
        None, gt=0, le=0.5, description="Hold out this fraction of the training data (a seeded, fixed split)."
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="An eval dataset inside the pod, in the training data's format (file or directory).",
    )
    every_steps: int | None = Field(
        None, ge=1, le=100_000_000, description="Evaluate every N steps and at the end; unset: checkpoint.everySteps."
    )

    @model_validator(mode="after")
    def _one_split(self) -> Evaluation:
        if (self.fraction is None) == (self.path is None):
            raise ValueError("set exactly one of evaluation.fraction or evaluation.path")
        return self


class S3Push(SpecModel):
    """An S3-compatible bucket the output directory is copied to after training (docs/TRAINER.md "Push")."""

    bucket: str = Field(
        min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$", description="Bucket name."
    )
    prefix: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        pattern=r"^[^/].*$",
        description="Key prefix of the pushed files; unset: trainingjobs/<namespace>/<name>/<uid> (the job's "
        "own, like its directory on the claim).",
    )
    endpoint: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^https?://[^/]+/?$",
        description="Endpoint URL of an S3-compatible store (http(s)://host[:port]); unset: AWS S3.",
    )
    region: str | None = Field(None, min_length=1, max_length=64, description="Region of the bucket.")
    secret_name: str = Field(
        min_length=1,
        max_length=253,
        description="Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(AWS_SESSION_TOKEN optional).",
    )


class Push(SpecModel):
    """Where the trained output goes besides the checkpoint claim (the HF Hub is not offered yet)."""

    s3: S3Push = Field(description="An S3-compatible store (AWS S3, MinIO, Ceph RGW, GCS's XML API, ...).")


class Output(SpecModel):
    """What the trainer leaves in the job's output directory besides the adapter, and where it is pushed."""

    merge: bool = Field(
        False,
        description="Also save the base model with the LoRA merged into its weights, under <output>/merged "
        "(a full copy of the base model's size on the checkpoint volume).",
    )
    push: Push | None = Field(
        None,
        description="After training, rank 0 copies the output directory (adapter, and merged/ with merge) to "
        "this store, once; a failed push fails the attempt and the files stay on the claim.",
    )


class ModelCache(SpecModel):
    """A claim for the Hugging Face cache (HF_HOME), so hub models are downloaded once, not per attempt."""

    claim_name: str = Field(
        min_length=1, max_length=253, description="PersistentVolumeClaim mounted as HF_HOME (/var/cache/huggingface)."
    )
    sub_path: str | None = Field(
        None, min_length=1, max_length=4096, pattern=r"^[^/]", description="Directory of the claim to mount."
    )


class RunPolicy(SpecModel):
    """Retries, resumes and time limits."""

    backoff_limit: int = Field(
        3, ge=0, le=100, description="Real failures (non-zero exits, OOM) allowed before the job fails."
    )
    max_resumes: int = Field(
        10,
        ge=0,
        le=10_000,
        description="Interruptions (eviction, preemption, node loss, pod deletion, stall) resumed "
        "before the job fails.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job when it has been active this long (counted from status.startTime)."
    )
    stall_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="Restart a running trainer that completed no step for this long. The clock starts at "
        "the trainer's first step: model download and loading count against firstStepTimeoutSeconds.",
    )
    first_step_timeout_seconds: int | None = Field(
        None,
        ge=1,
        description="Restart a trainer that has not completed its first step this long after its container "
        "started (model download and loading). Unset: no limit besides activeDeadlineSeconds.",
    )
    start_timeout_seconds: int = Field(
        600,
        ge=1,
        description="Fail when the container is stuck on an image pull or container configuration "
        "error this long after the attempt started.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it succeeded or failed."
    )
    auto_resume: bool = Field(
        True, description="Resume from the latest checkpoint after an interruption; false fails the job instead."
    )
    backoff_seconds: int = Field(
        10, ge=0, le=86_400, description="First delay before a new attempt; doubles with every restart."
    )
    max_backoff_seconds: int = Field(
        300, ge=0, le=86_400, description="Upper bound of the delay before a new attempt."
    )
    termination_grace_period_seconds: int = Field(
        120, ge=0, le=86_400, description="Time the trainer gets to save a checkpoint after SIGTERM."
    )

    @model_validator(mode="after")
    def _backoff_ordered(self) -> RunPolicy:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError("maxBackoffSeconds must be >= backoffSeconds")
        return self


class ExitCodeRequirement(SpecModel):
    """Matches the trainer container's exit code."""

    operator: Literal["In", "NotIn"] = Field(description="In: the code is one of values; NotIn: it is none of them.")
    values: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        min_length=1, max_length=255, description="Exit codes."
    )


class PodConditionRequirement(SpecModel):
    """Matches a pod condition whose status is True (e.g. DisruptionTarget)."""

    type: str = Field(min_length=1, max_length=316, description="Pod condition type.")


class FailurePolicyRule(SpecModel):
    """A rule deciding what an ended attempt means; the first matching rule wins."""

    action: Literal["Resume", "Fail", "Count"] = Field(
        description="Resume: count as an interruption (maxResumes); Fail: fail the job now; "
        "Count: count as a failure (backoffLimit)."
    )
    on_exit_codes: ExitCodeRequirement | None = Field(None, description="Match on the exit code.")
    on_pod_conditions: list[PodConditionRequirement] | None = Field(
        None, min_length=1, max_length=16, description="Match when any of these pod conditions is True."
    )

    @model_validator(mode="after")
    def _exactly_one_matcher(self) -> FailurePolicyRule:
        if (self.on_exit_codes is None) == (self.on_pod_conditions is None):
            raise ValueError("set exactly one of onExitCodes or onPodConditions")
        return self


class FailurePolicy(SpecModel):
    """Ordered rules overriding how ended attempts are counted (like batch/v1 podFailurePolicy)."""

    rules: list[FailurePolicyRule] = Field(default_factory=list, max_length=20, description="Rules, first match wins.")


class TemplateMetadata(SpecModel):
    """Labels and annotations added to the pods."""

    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")


class LocalObjectReference(SpecModel):
    """A reference to an object in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Object name.")


class EnvVar(SpecModel):
    """An extra environment variable for the trainer container."""

    name: str = Field(min_length=1, max_length=256, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: FreeForm | None = Field(
        None, description="Source of the value (core/v1 EnvVarSource: secretKeyRef, configMapKeyRef, ...)."
    )


class VolumeMount(SpecModel):
    """An extra volume mount for the trainer container."""

    name: str = Field(min_length=1, max_length=63, description="Name of a volume in template.volumes.")
    mount_path: str = Field(pattern=r"^/", max_length=4096, description="Absolute path in the container.")
    read_only: bool | None = Field(None, description="Mount read-only.")
    sub_path: str | None = Field(None, max_length=4096, description="Path inside the volume to mount.")


class PodTemplate(SpecModel):
    """Pod-level overrides. Privileged settings are refused unless the operator allows them."""

    metadata: TemplateMetadata | None = Field(None, description="Pod labels and annotations.")
    node_selector: dict[str, str] | None = Field(None, description="Pod nodeSelector.")
    tolerations: list[FreeForm] | None = Field(None, max_length=64, description="Pod tolerations (core/v1 Toleration).")
    affinity: FreeForm | None = Field(None, description="Pod affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, max_length=253, description="Pod priorityClassName.")
    scheduler_name: str | None = Field(None, max_length=253, description="Pod schedulerName.")
    service_account_name: str | None = Field(
        None, max_length=253, description="Service account of the pod (its token is not mounted)."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="Secrets used to pull the image."
    )
    env: list[EnvVar] | None = Field(None, max_length=256, description="Extra trainer environment variables.")
    volumes: list[FreeForm] | None = Field(None, max_length=64, description="Extra pod volumes (core/v1 Volume).")
    volume_mounts: list[VolumeMount] | None = Field(None, max_length=64, description="Extra trainer volume mounts.")
    host_network: bool | None = Field(None, description="Use the node's network namespace (privileged).")
    security_context: FreeForm | None = Field(
        None, description="Pod securityContext; keys given here replace the restricted defaults."
    )
    container_security_context: FreeForm | None = Field(
        None, description="Trainer container securityContext; keys given here replace the restricted defaults."
    )


class TrainingJobSpec(SpecModel):
    """Desired state of a LoRA fine-tuning job."""

    image: NonEmptyStr = Field(max_length=1024, description="Trainer container image.")
    model: NonEmptyStr = Field(max_length=1024, description="Base model: a hub id or an absolute path on a volume.")
    dataset: Dataset = Field(description="Training data.")
    method: Literal["LoRA", "QLoRA"] = Field(
        "LoRA",
        description="Fine-tuning method. QLoRA loads the base model in 4 bits (bitsandbytes NF4) and trains LoRA "
        "on it: needs GPUs (resources.gpus >= 1); without one the trainer exits with a configuration error.",
    )
    lora: LoRA = Field(default_factory=LoRA, description="LoRA settings.", json_schema_extra={"default": {}})
    strategy: Literal["DDP", "FSDP"] = Field(
        "DDP",
        description="How the GPUs of a job share the work. DDP: a full model copy per GPU; FSDP: the model's "
        "parameters sharded across all the job's GPUs (FSDP2 wrapping each decoder layer), so a base model larger "
        "than one GPU trains. FSDP needs more than one GPU in all (resources.gpus x workers) and method LoRA.",
    )
    hyperparameters: Hyperparameters = Field(description="Optimisation settings.")
    training_arguments: FreeForm | None = Field(
        None,
        description="Passed through to Hugging Face TrainingArguments (transformers 5.x names), e.g. "
        "{warmup_ratio: 0.03, lr_scheduler_type: cosine, weight_decay: 0.01, max_grad_norm: 1.0, "
        "report_to: tensorboard}. Keys the operator sets (output_dir, save_steps, max_steps, learning_rate, "
        "per_device_train_batch_size, ...: docs/CONTRACTS.md) are refused; unknown keys make the trainer "
        "exit 78 naming the key.",
    )

    @model_validator(mode="after")
    def _training_arguments_not_owned(self) -> TrainingJobSpec:
        problems = contract.owned_training_argument_problems(self.training_arguments)
        if problems:
            raise ValueError("; ".join(problems))
        return self
    resources: Resources = Field(
        default_factory=Resources, description="Compute per worker.", json_schema_extra={"default": {}}
    )
    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Number of nodes: one pod per node, each with resources.gpus GPUs, started and restarted "
        "together (one gang per attempt). More than 1 needs a checkpoint claim every node can mount "
        "(ReadWriteMany) and a job name that is a DNS label (it names the headless Service).",
    )
    checkpoint: Checkpoint = Field(
        default_factory=Checkpoint, description="Checkpoint storage.", json_schema_extra={"default": {}}
    )
    evaluation: Evaluation | None = Field(None, description="An eval split and how often to evaluate it.")
    output: Output = Field(
        default_factory=Output, description="Extra outputs (a merged model, a push to S3).",
        json_schema_extra={"default": {}},
    )
    model_cache: ModelCache | None = Field(
        None,
        description="A claim for the Hugging Face cache (HF_HOME) where hub models are downloaded; a model "
        "given by hub id is fetched online (HF_HUB_OFFLINE=0) whether or not it is set.",
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Retries, resumes and time limits.", json_schema_extra={"default": {}}
    )
    failure_policy: FailurePolicy | None = Field(None, description="Rules overriding how ended attempts count.")
    suspend: bool = Field(
        False, description="True stops the pods (after a checkpoint) and frees the GPUs; false resumes."
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=KUEUE_NAME_PATTERN,
        description="Kueue LocalQueue (in the job's namespace) that admits the job's pods: they wait, gated, "
        "until Kueue admits them (phase Queued, reason QueuedByKueue); a Kueue preemption is an interruption "
        "(reason Preempted). Needs Kueue with its pod integration; applies from the next attempt when edited.",
    )
    workload_priority_class_name: str | None = Field(
        None,
        max_length=63,
        pattern=KUEUE_NAME_PATTERN,
        description="Kueue WorkloadPriorityClass of the job's Workloads (their admission order and which "
        "preempts which); only with queueName. Not template.priorityClassName, the pods' scheduling PriorityClass.",
    )
    template: PodTemplate | None = Field(None, description="Pod-level overrides.")

    @model_validator(mode="after")
    def _fsdp_needs_lora_and_gpus(self) -> TrainingJobSpec:
        if self.strategy == "FSDP" and self.method == "QLoRA":
            raise ValueError("strategy FSDP does not support method QLoRA (4-bit weights are not sharded): use "
                             "strategy DDP with QLoRA, or method LoRA with FSDP")
        if self.strategy == "FSDP" and self.resources.gpus * self.workers < 2:
            raise ValueError("strategy FSDP shards the model across GPUs: it needs resources.gpus x workers >= 2")
        return self

    @model_validator(mode="after")
    def _priority_needs_queue(self) -> TrainingJobSpec:
        if self.workload_priority_class_name is not None and self.queue_name is None:
            raise ValueError("workloadPriorityClassName needs queueName: it is the priority of the job's "
                             "Kueue Workloads")
        return self


# --- status ---------------------------------------------------------------------------------
class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Running or Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, max_length=1024, description="CamelCase reason for the last change.")
    message: str | None = Field(None, max_length=32768, description="Human-readable detail.")
    last_transition_time: Timestamp | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this was computed from.")


class Progress(StatusModel):
    """Training progress as reported by the trainer."""

    step: int | None = Field(None, description="Optimiser steps completed.")
    total_steps: int | None = Field(None, description="Steps the run will take.")
    epoch: float | None = Field(None, description="Fractional epoch.")
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Recent training throughput.")
    eval_loss: float | None = Field(
        None, description="Loss on the eval split at the latest evaluation (spec.evaluation; absent without one)."
    )
    display: str | None = Field(None, description="step/totalSteps, shown by kubectl get.")
    update_time: Timestamp | None = Field(None, description="When the operator last saw step advance.")
    heartbeat_time: Timestamp | None = Field(None, description="The trainer's last step-completion heartbeat.")


class Ranks(StatusModel):
    """The current attempt's gang: how many of its pods run their trainer."""

    ready: int = Field(0, ge=0, le=MAX_WORKERS, description="Pods of the current attempt whose trainer is running.")
    total: int = Field(1, ge=1, le=MAX_WORKERS, description="Pods in the gang (spec.workers).")
    display: str | None = Field(None, max_length=16, description="ready/total, shown by kubectl get.")


class CheckpointStatus(StatusModel):
    """The latest checkpoint the operator knows about."""

    step: int | None = Field(None, description="Step of the checkpoint.")
    path: str | None = Field(None, description="Path of the checkpoint on the checkpoint volume.")
    time: Timestamp | None = Field(None, description="When the operator learnt about it.")


class Interruption(StatusModel):
    """Why the last attempt ended without success."""

    reason: str | None = Field(None, description="e.g. Evicted, Preempted, NodeLost, PodDeleted, Stalled, OOMKilled.")
    message: str | None = Field(None, description="One-line detail.")
    exit_code: int | None = Field(None, description="Exit code of the trainer, when it exited.")
    pod: str | None = Field(None, description="Name of the pod.")
    attempt: int | None = Field(None, description="Attempt number of the pod.")
    time: Timestamp | None = Field(None, description="When the operator recorded it; backoff counts from here.")


class TrainingJobStatus(StatusModel):
    """Observed state, computed by the operator from the job, its pods and the clock."""

    phase: Phase | None = Field(
        None, description="Queued, Starting, Running, Resuming, Suspended, Succeeded or Failed."
    )
    reason: str | None = Field(None, description="CamelCase reason for the current phase.")
    message: str | None = Field(None, description="One-line explanation of the current phase.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling, Stalled (kstatus), Admitted, Running, Progressing, Resumable, Suspended, "
        "Succeeded, Failed.",
    )
    attempt: int = Field(
        0,
        ge=0,
        le=MAX_ATTEMPTS,
        description="Current attempt; its pod is <job>-<attempt> (<job>-<attempt>-<rank> with workers > 1).",
    )
    failures: int = Field(0, ge=0, le=MAX_ATTEMPTS, description="Attempts that failed (count against backoffLimit).")
    resumes: int = Field(
        0, ge=0, le=MAX_ATTEMPTS, description="Attempts that were interrupted (count against maxResumes)."
    )
    restarts: int = Field(0, ge=0, le=2 * MAX_ATTEMPTS, description="failures + resumes.")
    progress: Progress | None = Field(None, description="Training progress.")
    ranks: Ranks | None = Field(None, description="Ready pods of the current attempt's gang.")
    checkpoint: CheckpointStatus | None = Field(None, description="Latest known checkpoint.")
    output_path: str | None = Field(
        None,
        description="Where the final adapter is written: pvc://<claim>/trainingjobs/<namespace>/<name>/<uid>/output.",
    )
    checkpoint_path: str | None = Field(
        None,
        description="This job's checkpoint directory: pvc://<claim>/trainingjobs/<namespace>/<name>/<uid>/checkpoints.",
    )
    run_fingerprint: str | None = Field(
        None, max_length=64, description="Hash of the fields that define the run, taken when the job was first seen."
    )
    last_interruption: Interruption | None = Field(None, description="Why the last attempt ended without success.")
    start_time: Timestamp | None = Field(None, description="When the first attempt was started.")
    attempt_start_time: Timestamp | None = Field(None, description="When the current attempt was started.")
    completion_time: Timestamp | None = Field(None, description="When the job succeeded or failed.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status reflects.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class TrainingJob(StatusModel):
    """A TrainingJob: LoRA fine-tuning of a causal language model."""

    spec: TrainingJobSpec = Field(description="Desired state.")
    status: TrainingJobStatus | None = Field(None, description="Observed state, written by the operator.")
