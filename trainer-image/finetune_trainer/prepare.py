"""What a run trains: precision, tokenizer + model, LoRA (imports torch/transformers).

Kept apart from the run itself (:func:`finetune_trainer.training.train`), as PEFT's examples/sft
keeps model and data preparation apart from ``main``. A model or tokenizer that cannot be loaded,
an unknown target module or a LoRA that does not apply is a ConfigError.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune_contract as c

from .util import LOG


def precision(cfg: c.TrainerConfig) -> tuple[torch.dtype, bool, bool]:
    """(model dtype, bf16, fp16) for ``cfg.precision``; auto: bf16 when the GPU supports it, fp16
    AMP on older GPUs, fp32 on CPU. A precision the machine cannot run is a ConfigError."""
    on_gpu = torch.cuda.is_available()
    choice = cfg.precision
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if choice == "bf16":
        if on_gpu and not torch.cuda.is_bf16_supported():
            raise c.ConfigError(f"{c.ENV_PRECISION}=bf16: this GPU does not support bfloat16 (use fp16)")
        return torch.bfloat16, True, False
    if choice == "fp16":
        if not on_gpu:
            raise c.ConfigError(f"{c.ENV_PRECISION}=fp16 needs a CUDA GPU (fp16 AMP); on CPU use bf16 or fp32")
        return torch.float16, False, True
    return torch.float32, False, False


def check_method(cfg: c.TrainerConfig) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes (4-bit weights are placed on the GPU at load)."""
    if cfg.method != c.METHOD_QLORA:
        return
    if not torch.cuda.is_available():
        raise c.ConfigError(
            f"{c.ENV_METHOD}=qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU; "
            f"none is visible (use lora, or request resources.gpus)"
        )
    try:
        import bitsandbytes  # noqa: F401  (only its presence matters here)
    except ImportError as e:
        raise c.ConfigError(f"{c.ENV_METHOD}=qlora needs bitsandbytes, which is not importable: {e}") from e


def model_load_kwargs(cfg: c.TrainerConfig, dtype: torch.dtype, local_rank: int) -> dict[str, Any]:
    """``from_pretrained`` arguments of the base model: the dtype (docs/TRAINER.md pitfall 6), and for
    QLoRA a 4-bit NF4 quantization with double quantization, computing in ``dtype``, on this rank's GPU."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.method == c.METHOD_QLORA:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": local_rank}
    return kwargs


def load(cfg: c.TrainerConfig, model_path: str, dtype: torch.dtype, local_rank: int = 0) -> tuple[Any, Any]:
    """(tokenizer, model); a tokenizer without a pad token pads with its eos token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # broad on purpose: any loader failure is a configuration problem
        raise c.ConfigError(f"cannot load tokenizer from {cfg.model}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise c.ConfigError(f"tokenizer of {cfg.model} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **model_load_kwargs(cfg, dtype, local_rank))
    except Exception as e:  # broad on purpose, as for the tokenizer
        raise c.ConfigError(f"cannot load model from {cfg.model}: {type(e).__name__}: {e}") from e
    return tokenizer, model


def _check_target_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    if "all-linear" in targets:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise c.ConfigError(
            f"unknown LoRA target module(s) {','.join(missing)}; "
            f"linear modules in this model: {','.join(leaves[:30])}"
        )


def apply_lora(model: Any, cfg: c.TrainerConfig) -> Any:
    """The peft model with LoRA adapters on ``cfg.lora_target_modules``."""
    _check_target_modules(model, cfg.lora_target_modules)
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if cfg.method == c.METHOD_QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules)
        if "all-linear" not in cfg.lora_target_modules
        else "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise c.ConfigError(f"cannot apply LoRA: {e}") from e


def log_lora(model: Any, cfg: c.TrainerConfig, n_features: int) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    LOG.info(
        "LoRA r=%d alpha=%d on %s: %d trainable of %d parameters; %d examples tokenized to <= %d tokens",
        cfg.lora_r,
        cfg.lora_alpha,
        ",".join(cfg.lora_target_modules),
        trainable,
        total,
        n_features,
        cfg.seq_len,
    )
