"""JSONL dataset reading (torch-free) and tokenization (needs only a tokenizer).

Two record shapes:
- text mode: ``{"<text_field>": "..."}`` — loss on every token;
- prompt/completion mode (both fields configured): loss only on the completion tokens.

Config errors (missing/unreadable/empty dataset, bad JSON, no usable record) raise
:class:`~finetune_contract.ConfigError` with a one-line reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, cast

from finetune_contract import ConfigError, TrainerConfig

IGNORE_INDEX = -100
DATASET_SUFFIXES = (".jsonl", ".json")


def dataset_files(path: str) -> list[str]:
    """The JSONL files of a dataset path: the file itself, or a directory's ``*.jsonl`` files."""
    if not path:
        raise ConfigError("no dataset given")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if n.endswith(DATASET_SUFFIXES) and os.path.isfile(os.path.join(path, n))
        )
        if not files:
            raise ConfigError(f"dataset directory has no .jsonl files: {path}")
        return files
    if not os.path.exists(path):
        raise ConfigError(f"dataset not found: {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"dataset is not a regular file: {path}")
    return [path]


def iter_records(path: str) -> Iterator[Any]:
    """Yield the parsed JSON of every non-blank line."""
    for fp in dataset_files(path):
        try:
            fh = open(fp, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read dataset {fp}: {e.strerror or e}") from None
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except ValueError as e:
                        raise ConfigError(f"dataset {fp} line {lineno}: invalid JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"dataset {fp} is not UTF-8 text: {e}") from None


def load_examples(cfg: TrainerConfig) -> list[str] | list[tuple[str, str]]:
    """Read the dataset into text examples or (prompt, completion) pairs.

    Records without the configured field(s) are skipped; none usable is a config error.
    """
    pc_mode = bool(cfg.prompt_field and cfg.completion_field)
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    total = 0
    for rec in iter_records(cfg.dataset):
        total += 1
        if not isinstance(rec, dict):
            continue
        if pc_mode:
            p, comp = rec.get(cfg.prompt_field), rec.get(cfg.completion_field)
            if isinstance(p, str) and isinstance(comp, str) and comp:
                pairs.append((p, comp))
        else:
            t = rec.get(cfg.text_field)
            if isinstance(t, str) and t.strip():
                texts.append(t)
    if total == 0:
        raise ConfigError(f"dataset is empty: {cfg.dataset}")
    if pc_mode and not pairs:
        raise ConfigError(
            f"dataset {cfg.dataset} has no record with string fields "
            f"{cfg.prompt_field!r} and {cfg.completion_field!r} ({total} records)"
        )
    if not pc_mode and not texts:
        raise ConfigError(
            f"dataset {cfg.dataset} has no record with a non-empty string field "
            f"{cfg.text_field!r} ({total} records)"
        )
    return pairs if pc_mode else texts


def _ids(enc: Any) -> list[list[int]]:
    return enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[str] | Sequence[tuple[str, str]],
    seq_len: int,
    batch: int = 1000,
) -> list[dict[str, list[int]]]:
    """Tokenize to ``{"input_ids", "labels"}`` features, truncated to ``seq_len`` tokens.

    An EOS token is appended when the tokenizer did not add one and there is room.
    Examples that end up empty are dropped; none left (docs/TRAINER.md pitfall 15: a tokenizer that
    encodes everything to nothing) is a config error.
    """
    eos = tokenizer.eos_token_id
    feats: list[dict[str, list[int]]] = []
    pc_mode = bool(examples) and isinstance(examples[0], tuple)
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        if pc_mode:
            feats.extend(_pair_features(tokenizer, cast(Sequence[tuple[str, str]], chunk), seq_len, eos))
        else:
            feats.extend(_text_features(tokenizer, cast(Sequence[str], chunk), seq_len, eos))
    if not feats:
        raise ConfigError(
            f"no example tokenizes to at least 2 tokens with the model's tokenizer "
            f"({type(tokenizer).__name__}); check the dataset fields and the tokenizer files"
        )
    return feats


def _pair_features(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int, eos: int | None
) -> list[dict[str, list[int]]]:
    """Prompt/completion mode: labels only on the completion (and its EOS)."""
    feats = []
    prompts = _ids(tokenizer([p for p, _ in pairs], add_special_tokens=True))
    comps = _ids(tokenizer([c for _, c in pairs], add_special_tokens=False))
    for p_ids, c_ids in zip(prompts, comps, strict=True):  # one encoding per input
        p_ids = list(p_ids)
        # a template that appends EOS to the prompt would end the sequence early
        if eos is not None and len(p_ids) > 1 and p_ids[-1] == eos:
            p_ids = p_ids[:-1]
        c_ids = list(c_ids)
        if eos is not None and (not c_ids or c_ids[-1] != eos):
            c_ids.append(eos)
        ids = (p_ids + c_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:seq_len]
        if any(lab != IGNORE_INDEX for lab in labels):
            feats.append({"input_ids": ids, "labels": labels})
    return feats


def _text_features(tokenizer: Any, texts: Sequence[str], seq_len: int, eos: int | None) -> list[dict[str, list[int]]]:
    """Text mode: labels on every token."""
    feats = []
    for ids in _ids(tokenizer(list(texts), add_special_tokens=True)):
        ids = list(ids)
        if eos is not None and ids and ids[-1] != eos and len(ids) < seq_len:
            ids.append(eos)
        ids = ids[:seq_len]
        if len(ids) >= 2:
            feats.append({"input_ids": ids, "labels": list(ids)})
    return feats


class PadCollator:
    """Right-pad ``input_ids``/``labels`` to the longest example of the batch; build attention_mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
