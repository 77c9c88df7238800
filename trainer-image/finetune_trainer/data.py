"""Reading the dataset with HF ``datasets`` (torch-free; ``datasets`` is imported when used).

Files: JSON Lines / JSON (``.jsonl``, ``.json``) or Parquet (``.parquet``); a file, or a
directory of files of one kind. Formats (docs/TRAINER.md "Data"):
- ``text``: ``{"<text_field>": "..."}``, loss on every token;
- ``prompt-completion``: loss only on the completion tokens;
- ``messages``: a conversation rendered with the tokenizer's chat template, loss only on
  the assistant turns.

Config errors (missing/unreadable/empty dataset, a missing column, no usable record) raise
:class:`~finetune_contract.ConfigError` with a one-line reason. Tokenization is in
:mod:`finetune_trainer.features`.
"""

from __future__ import annotations

import os
from typing import Any

import finetune_contract as c
from finetune_contract import ConfigError, TrainerConfig

IGNORE_INDEX = -100
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def dataset_files(path: str) -> list[str]:
    """The data files of a dataset path: the file itself, or a directory's data files."""
    if not path:
        raise ConfigError("no dataset given")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.endswith(tuple(BUILDERS)) and os.path.isfile(os.path.join(path, n))
        )
        if not files:
            raise ConfigError(f"dataset directory has no {', '.join(BUILDERS)} files: {path}")
        builder_for(files)
        return files
    if not os.path.exists(path):
        raise ConfigError(f"dataset not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"dataset is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"cannot read dataset {path}: permission denied")
    builder_for([path])
    return [path]


def builder_for(files: list[str]) -> str:
    """The ``datasets`` builder reading these files (one kind per dataset)."""
    kinds = set()
    for f in files:
        suffix = os.path.splitext(f)[1]
        if suffix not in BUILDERS:
            raise ConfigError(f"dataset {f}: unknown file type {suffix!r} (use {', '.join(BUILDERS)})")
        kinds.add(BUILDERS[suffix])
    if len(kinds) > 1:
        raise ConfigError(f"dataset mixes JSON and Parquet files: {', '.join(files)}")
    return kinds.pop()


def load_records(cfg: TrainerConfig, cache_dir: str) -> Any:
    """The dataset as a ``datasets.Dataset`` (Arrow cache under ``cache_dir``)."""
    import datasets

    files = dataset_files(cfg.dataset)
    if all(_blank(f) for f in files):  # datasets would say 'Instruction "train" corresponds to no data'
        raise ConfigError(f"dataset is empty: {cfg.dataset}")
    datasets.disable_progress_bars()  # docs/TRAINER.md pitfall 11
    try:
        records = datasets.load_dataset(builder_for(files), data_files=files, split="train", cache_dir=cache_dir)
    except Exception as e:  # broad on purpose: any reader failure (bad JSON, not UTF-8, bad Parquet) is the data's
        raise ConfigError(f"cannot read dataset {cfg.dataset}: {_root_cause(e)}") from None
    if records.num_rows == 0:
        raise ConfigError(f"dataset is empty: {cfg.dataset}")
    return records


def _root_cause(e: BaseException) -> str:
    """The reader's error that ``datasets`` wrapped (raised ``from`` it)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def _blank(path: str) -> bool:
    """A file with nothing but whitespace (only small files are read to tell)."""
    size = os.path.getsize(path)
    if size == 0:
        return True
    if size > 65536 or not path.endswith((".json", ".jsonl")):
        return False
    with open(path, "rb") as fh:
        return not fh.read().strip()


def resolve_format(cfg: TrainerConfig, columns: list[str]) -> str:
    """The configured format, else inferred: prompt/completion fields configured →
    prompt-completion; a messages column and no text column → messages; ``prompt`` and
    ``completion`` columns and no text column → prompt-completion; else text."""
    if cfg.dataset_format:
        return cfg.dataset_format
    if cfg.prompt_field and cfg.completion_field:
        return c.FORMAT_PROMPT_COMPLETION
    if cfg.text_field not in columns:
        if cfg.messages_field in columns:
            return c.FORMAT_MESSAGES
        if "prompt" in columns and "completion" in columns:
            return c.FORMAT_PROMPT_COMPLETION
    return c.FORMAT_TEXT


def columns_of(cfg: TrainerConfig, fmt: str) -> tuple[str, ...]:
    """The columns a format reads."""
    if fmt == c.FORMAT_PROMPT_COMPLETION:
        return (cfg.prompt_field or "prompt", cfg.completion_field or "completion")
    if fmt == c.FORMAT_MESSAGES:
        return (cfg.messages_field,)
    return (cfg.text_field,)


def check_columns(cfg: TrainerConfig, fmt: str, records: Any) -> tuple[str, ...]:
    """The format's columns, each present in the dataset; else a ConfigError naming them."""
    wanted = columns_of(cfg, fmt)
    missing = [col for col in wanted if col not in records.column_names]
    if missing:
        kind = "a non-empty string field" if fmt == c.FORMAT_TEXT else "the field(s)"
        raise ConfigError(
            f"dataset {cfg.dataset} has no record with {kind} {', '.join(repr(m) for m in missing)} "
            f"(format {fmt}; {records.num_rows} records; columns: {', '.join(records.column_names)})"
        )
    return wanted


class Prepared:
    """The records of rank 0's check, their format, the columns that format reads, and the
    eval dataset's records when FT_EVAL_DATASET names one."""

    def __init__(self, records: Any, fmt: str, columns: tuple[str, ...], eval: Prepared | None = None) -> None:
        self.records, self.format, self.columns, self.eval = records, fmt, columns, eval

    def __len__(self) -> int:
        return int(self.records.num_rows)


def prepare(cfg: TrainerConfig) -> Prepared:
    """Load the dataset, settle its format and check its columns (rank 0, before torch).
    ``datasets`` keeps its Arrow copy of the files under the work directory."""
    raw_cache = os.path.join(cfg.work_dir, "datasets", "raw")
    records = load_records(cfg, raw_cache)
    fmt = resolve_format(cfg, records.column_names)
    columns = check_columns(cfg, fmt, records)
    evaluation = None
    if cfg.eval_dataset:  # read and checked as the training data is, in its format
        eval_cfg = eval_config(cfg)
        eval_records = load_records(eval_cfg, raw_cache)
        evaluation = Prepared(eval_records, fmt, check_columns(eval_cfg, fmt, eval_records))
    return Prepared(records, fmt, columns, evaluation)


def eval_config(cfg: TrainerConfig) -> TrainerConfig:
    """The configuration that reads the eval dataset (its errors name that path)."""
    return cfg.replace(dataset=cfg.eval_dataset or "")


class PadCollator:
    """Right-pad ``input_ids``/``labels`` to the longest example of the batch; build attention_mask.

    Packed rows (with ``position_ids``) get no attention_mask: transformers then masks attention
    per packed example from the position ids (docs/TRAINER.md "Packing"); the padding continues
    as a segment of its own (positions from 0, labels -100).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        ids, labels, mask, positions = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
            if packed:
                positions.append(list(f["position_ids"]) + list(range(pad)))
        if packed:
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "position_ids": torch.tensor(positions, dtype=torch.long),
            }
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
