"""What a run trains: precision, tokenizer + model, LoRA, the tokenized dataset (imports torch/transformers).

Kept apart from the run itself (:func:`finetune_trainer.training.train`), as PEFT's examples/sft
keeps model and data preparation apart from ``main``. A model or tokenizer that cannot be loaded,
an unknown target module or a LoRA that does not apply is a ConfigError.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune_contract as c

from .data import tokenize_examples
from .util import LOG


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def precision() -> tuple[torch.dtype, bool, bool]:
    """(model dtype, bf16, fp16): bf16 when the GPU supports it, fp16 AMP on older GPUs, fp32 on CPU."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, True, False
        return torch.float16, False, True
    return torch.float32, False, False


def load(cfg: c.TrainerConfig, model_path: str, dtype: torch.dtype) -> tuple[Any, Any]:
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
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)  # docs/TRAINER.md pitfall 6
    except Exception as e:  # broad on purpose, as for the tokenizer
        raise c.ConfigError(f"cannot load model from {cfg.model}: {type(e).__name__}: {e}") from e
    return tokenizer, model


def train_dataset(tokenizer: Any, examples: Any, seq_len: int) -> ListDataset:
    """The examples tokenized to features (docs/TRAINER.md pitfall 15: none left is a ConfigError)."""
    return ListDataset(tokenize_examples(tokenizer, examples, seq_len))


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
