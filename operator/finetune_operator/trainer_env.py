"""The trainer's environment for a job, through the trainer's own contract module
(torch-free), so the names are defined once."""
from __future__ import annotations

from finetune_contract import DEFAULT_METRICS_PORT, DEFAULT_TERMINATION_LOG, TrainerConfig, stop_timeout_for_grace

from . import storage
from .api import TrainingJobSpec


def trainer_config(spec: TrainingJobSpec) -> TrainerConfig:
    hp, lora, ckpt = spec.hyperparameters, spec.lora, spec.checkpoint
    s3 = spec.output.push.s3 if spec.output.push else None
    return TrainerConfig(
        push_s3_bucket=s3.bucket if s3 else None, push_s3_prefix=s3.prefix if s3 else None,
        push_s3_endpoint=s3.endpoint if s3 else None, push_s3_region=s3.region if s3 else None,
        model=spec.model, dataset=spec.dataset.path, text_field=spec.dataset.text_field,
        prompt_field=spec.dataset.prompt_field, completion_field=spec.dataset.completion_field,
        dataset_format=spec.dataset.format, messages_field=spec.dataset.messages_field,
        training_arguments=spec.training_arguments, merge=spec.output.merge,
        eval_dataset=spec.evaluation.path if spec.evaluation else None,
        eval_fraction=spec.evaluation.fraction if spec.evaluation else None,
        eval_steps=spec.evaluation.every_steps if spec.evaluation else None,
        output_dir=storage.pod_output_dir(ckpt.mount_path),
        checkpoint_dir=storage.pod_checkpoint_dir(ckpt.mount_path),
        resume_from=storage.RESUME_FROM_MOUNT_PATH if ckpt.resume_from else None,
        save_steps=ckpt.every_steps, save_total_limit=ckpt.keep,
        max_steps=hp.max_steps, epochs=hp.epochs, learning_rate=hp.learning_rate,
        batch_size=hp.batch_size, grad_accum=hp.gradient_accumulation_steps,
        seq_len=hp.sequence_length, seed=hp.seed,
        lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        lora_target_modules=tuple(lora.target_modules), method=spec.method.lower(),
        precision=hp.precision, gradient_checkpointing=hp.gradient_checkpointing,
        packing=spec.dataset.packing, strategy=spec.strategy.lower(),
        metrics_port=DEFAULT_METRICS_PORT, metrics_addr="0.0.0.0",
        termination_log=DEFAULT_TERMINATION_LOG, nproc_per_node=max(1, spec.resources.gpus),
        stop_timeout=stop_timeout_for_grace(spec.run_policy.termination_grace_period_seconds),
    )


# The image runs offline (trainer-image/Dockerfile; docs/TRAINER.md pitfall 3); a hub id needs
# the hub. A template env entry of the same name still wins (pods._env).
HUB_ONLINE_ENV = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


def trainer_env(spec: TrainingJobSpec) -> dict[str, str]:
    env = trainer_config(spec).to_env()
    if not spec.model.startswith("/"):  # a hub id (the API takes a hub id or an absolute path)
        env |= HUB_ONLINE_ENV
    return env
