"""Data-parallel strategy: DDP (a model copy per process) or FSDP (parameters sharded), as the
TrainingArguments ``fsdp``/``fsdp_config`` the HF Trainer understands (docs/TRAINER.md "FSDP").

transformers 5.18 drives FSDP2 (``fully_shard``) through accelerate. FSDP2 shards every parameter on
its own (DTensor), so frozen base weights and trainable LoRA weights may share a wrapped layer: what
FSDP1 needed ``use_orig_params: true`` for. The layers wrapped are the model class's
``_no_split_modules`` (its decoder layer class, e.g. ``LlamaDecoderLayer``), read from the model's
config without loading weights. transformers itself hands peft's trainable-parameter wrapping to
accelerate (``update_fsdp_plugin_peft``).
"""

from __future__ import annotations

from typing import Any

import finetune_contract as c


def check(cfg: c.TrainerConfig, on_gpu: bool, world_size: int) -> None:
    """Combinations that cannot work, as a ConfigError naming the fields (exit 78).

    accelerate 1.15 turns its FSDP plugin on only for multi-GPU runs (``AcceleratorState`` sets
    ``DistributedType.FSDP`` for MULTI_GPU and other accelerators, never for MULTI_CPU or a single
    process): elsewhere ``fsdp=True`` would silently train unsharded, so it is refused instead.
    """
    problems = c.strategy_problems(cfg.strategy, cfg.method)
    if cfg.strategy == c.STRATEGY_FSDP and not problems:
        if not on_gpu:
            problems.append(f"{c.ENV_STRATEGY}=fsdp shards the model across CUDA GPUs; none is visible "
                            f"(use strategy ddp, or request resources.gpus)")  # fmt: skip
        elif world_size < 2:
            problems.append(f"{c.ENV_STRATEGY}=fsdp needs more than one process (one GPU per process); this run "
                            f"has {world_size} (request resources.gpus > 1 or workers > 1)")  # fmt: skip
    if problems:
        raise c.ConfigError("; ".join(problems))


def decoder_layer_classes(model_path: str) -> list[str]:
    """The class names FSDP wraps one unit each: the causal-LM class's ``_no_split_modules``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_path)
        model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception as e:  # broad on purpose: an unreadable config is reported when the model loads
        raise c.ConfigError(f"{c.ENV_STRATEGY}=fsdp: cannot find the decoder layer class of {model_path}: {e}") from e
    classes = list(getattr(model_class, "_no_split_modules", None) or [])
    if not classes:
        raise c.ConfigError(
            f"{c.ENV_STRATEGY}=fsdp: {model_class.__name__} names no decoder layer class (_no_split_modules); "
            f"set trainingArguments.fsdp_config.transformer_layer_cls_to_wrap"
        )
    return classes


def fsdp_arguments(cfg: c.TrainerConfig, model_path: str | None, user_config: Any) -> dict[str, Any]:
    """The TrainingArguments entries of the strategy: none for DDP; ``fsdp`` and ``fsdp_config`` for
    FSDP, with ``trainingArguments.fsdp_config`` (a dict) laid over the trainer's defaults."""
    if cfg.strategy != c.STRATEGY_FSDP:
        return {}
    if user_config is not None and not isinstance(user_config, dict):
        raise c.ConfigError("trainingArguments.fsdp_config must be an object (a JSON config file path is not read)")
    user = dict(user_config or {})
    config: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
        # one HF-loadable file, written by rank 0: the checkpoint picker and the adapter
        # publishing expect what DDP writes (docs/TRAINER.md "FSDP")
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    }
    if "transformer_layer_cls_to_wrap" not in user:
        config["transformer_layer_cls_to_wrap"] = decoder_layer_classes(model_path or cfg.model)
    arguments: dict[str, Any] = {"fsdp": True}
    if cfg.gradient_checkpointing:
        # FSDP's own activation checkpointing of the wrapped layers: the Trainer's gradient
        # checkpointing would all-gather each layer once more in the backward (docs/TRAINER.md "FSDP")
        config["activation_checkpointing"] = True
        arguments["gradient_checkpointing"] = False
    config.update(user)
    return {**arguments, "fsdp_config": config}
