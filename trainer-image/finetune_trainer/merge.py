"""The merged model (FT_MERGE): the base with the trained LoRA folded into its weights, saved
under ``<output dir>/merged`` (imports torch/transformers/peft; rank 0, after training).

The base is loaded again from its path, unquantized, in the training dtype, and the adapter
from the output directory: the same files a user would merge, whatever the run held in memory.
Written to the work directory first and renamed into place, so ``merged/`` is complete or absent.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import finetune_contract as c

from . import checkpoints as ckpts
from .util import LOG


def merged_dir(cfg: c.TrainerConfig) -> str:
    return os.path.join(cfg.output_dir, c.MERGED_SUBDIR)


def merge_adapter(cfg: c.TrainerConfig, model_path: str, dtype: Any) -> str:
    """Merge the adapter in ``cfg.output_dir`` into the base; returns the merged directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    target = merged_dir(cfg)
    tmp = os.path.join(cfg.work_dir, "merging")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)  # docs/TRAINER.md pitfall 6
    merged = PeftModel.from_pretrained(base, cfg.output_dir).merge_and_unload()
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(cfg.output_dir).save_pretrained(tmp)
    ckpts.make_world_readable(tmp)  # docs/TRAINER.md pitfall 7
    shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's
    os.replace(tmp, target)
    LOG.info("merged model saved in %s (%.1fs)", target, time.perf_counter() - started)
    return target
