"""Tokenizing the dataset once: rank 0 writes it to a cache on the job's volume, the other
ranks wait for it and read it (torch-free; needs a tokenizer and ``datasets``).

The cache is one Arrow file per key under ``<checkpoint dir>/trainer/datasets/``; the key
hashes what the features depend on (the data files' names, sizes and mtimes, the format
settings, the sequence length, the tokenizer and its chat template), so a resumed attempt
reads it instead of tokenizing again, and a changed input gets a new file. A ``.done``
marker, written after the file, tells the other ranks it is complete (docs/TRAINER.md "Data").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import finetune_contract as c
from finetune_contract import ConfigError, TrainerConfig

from . import packing
from .data import IGNORE_INDEX, Prepared, columns_of, dataset_files, eval_config
from .util import LOG, atomic_write_text

# Bump when the features computed from the same inputs change (the cache key includes it).
FEATURES_VERSION = 2
CACHE_SUBDIR = "datasets"
WAIT_POLL_SECONDS = 0.2

Features = tuple[list[list[int]], list[list[int]]]


# -- features of one batch --------------------------------------------------------------------


def text_features(tokenizer: Any, texts: Sequence[Any], seq_len: int) -> Features:
    """Text: labels on every token; an EOS is appended when the tokenizer added none and there is room."""
    eos = tokenizer.eos_token_id
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    ids_out, labels_out = [], []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
        ids = list(ids)
        if eos is not None and ids and ids[-1] != eos and len(ids) < seq_len:
            ids.append(eos)
        ids = ids[:seq_len]
        if len(ids) >= 2:
            ids_out.append(ids)
            labels_out.append(list(ids))
    return ids_out, labels_out


def pair_features(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any], seq_len: int) -> Features:
    """Prompt/completion: labels only on the completion (and its EOS)."""
    eos = tokenizer.eos_token_id
    pairs = [(p, x) for p, x in zip(prompts, completions, strict=True) if isinstance(p, str) and _non_empty(x)]
    if not pairs:
        return [], []
    p_enc = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    c_enc = tokenizer([x for _, x in pairs], add_special_tokens=False)["input_ids"]
    ids_out, labels_out = [], []
    for p_ids, c_ids in zip(p_enc, c_enc, strict=True):
        p_ids, c_ids = list(p_ids), list(c_ids)
        # a template that appends EOS to the prompt would end the sequence early
        if eos is not None and len(p_ids) > 1 and p_ids[-1] == eos:
            p_ids = p_ids[:-1]
        if eos is not None and (not c_ids or c_ids[-1] != eos):
            c_ids.append(eos)
        ids = (p_ids + c_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:seq_len]
        if any(lab != IGNORE_INDEX for lab in labels):
            ids_out.append(ids)
            labels_out.append(labels)
    return ids_out, labels_out


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the conversation before it, rendered with the
    generation prompt, to the end of the conversation up to it: the assistant's text and
    whatever the template closes the turn with (its end-of-turn token). This needs a
    template whose renders of shorter conversations are prefixes of longer ones; works
    without ``{% generation %}`` markers in the template.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template's render of a shorter conversation is not a prefix of a longer one")
        spans.append((len(before), len(upto)))
    return text, spans


def message_features(tokenizer: Any, conversations: Sequence[Any], seq_len: int, problems: list[str]) -> Features:
    """Messages: the chat template's rendering, labels only on the assistant turns.

    Conversations that do not render (a malformed record, a template that refuses it) are
    skipped; the first reason goes to ``problems``.
    """
    ids_out, labels_out = [], []
    for conversation in conversations:
        messages = _clean_messages(conversation)
        if not messages or not any(m.get("role") == "assistant" for m in messages):
            continue
        try:
            text, spans = assistant_spans(tokenizer, messages)
        except Exception as e:  # broad on purpose: jinja's errors are the template's or the record's
            if not problems:
                problems.append(f"{type(e).__name__}: {e}")
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])[:seq_len]
        labels = [
            tok if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE_INDEX
            for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=False)
        ]
        if len(ids) >= 2 and any(lab != IGNORE_INDEX for lab in labels):
            ids_out.append(ids)
            labels_out.append(labels)
    return ids_out, labels_out


def _clean_messages(conversation: Any) -> list[dict[str, Any]]:
    """Arrow fills keys a message lacks with None; templates test for presence, so drop them."""
    if not isinstance(conversation, list):
        return []
    out = []
    for m in conversation:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return []
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def check_chat_template(tokenizer: Any, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {model} has no chat template: a messages dataset needs one "
            f"(or use {c.ENV_DATASET_FORMAT}=text or prompt-completion)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer of {model} is not a fast tokenizer: messages datasets need its offsets")


# -- the cache --------------------------------------------------------------------------------


def split_for_eval(cfg: TrainerConfig, features: Any) -> tuple[Any, Any]:
    """(train, eval) with FT_EVAL_FRACTION of the features held out: a seeded permutation, so every
    rank and every attempt gets the same split; index mappings in memory (no file on the volume)."""
    import random

    n = features.num_rows
    n_eval = max(1, round(n * (cfg.eval_fraction or 0)))
    if n_eval >= n:
        raise ConfigError(f"{c.ENV_EVAL_FRACTION}={cfg.eval_fraction} leaves nothing to train on ({n} examples)")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held_out = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return features.select(train, keep_in_memory=True), features.select(held_out, keep_in_memory=True)


def cache_key(cfg: TrainerConfig, tokenizer: Any, eval_split: bool = False) -> str:
    """What the features depend on, hashed (every rank computes the same key). The eval
    dataset's key also covers the training files: their columns settle the format."""
    paths = dataset_files(cfg.dataset) + (dataset_files(cfg.eval_dataset or "") if eval_split else [])
    files = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in paths]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                FEATURES_VERSION,
                eval_split,
                files,
                cfg.dataset_format,
                cfg.text_field,
                cfg.prompt_field,
                cfg.completion_field,
                cfg.messages_field,
                cfg.seq_len,
                cfg.packing,
                getattr(tokenizer, "chat_template", None),
                tokenizer.eos_token_id,
                type(tokenizer).__name__,
            ]
        ).encode()
    )
    h.update(backend.to_str().encode() if backend is not None else cfg.model.encode())
    return h.hexdigest()[:32]


def tokenized(
    cfg: TrainerConfig, tokenizer: Any, prepared: Prepared | None, is_main: bool, eval_split: bool = False
) -> Any:
    """The tokenized dataset (``eval_split``: the eval dataset's): rank 0 (``prepared`` given)
    tokenizes unless the cache has it; the other ranks wait for rank 0's ``.done`` marker and
    read the same file."""
    import datasets

    directory = os.path.join(cfg.work_dir, CACHE_SUBDIR)
    key = cache_key(cfg, tokenizer, eval_split)
    path = os.path.join(directory, f"tokenized-{key}.arrow")
    done = path + ".done"
    if is_main and not os.path.exists(done):
        if prepared is None:
            raise RuntimeError("rank 0 has no prepared dataset to tokenize")
        os.makedirs(directory, exist_ok=True)
        started = time.perf_counter()
        features = _tokenize(eval_config(cfg) if eval_split else cfg, tokenizer, prepared, path, key)
        if cfg.packing:  # docs/TRAINER.md "Packing"; the unpacked file is only the packer's input
            unpacked = features
            features = packing.pack_features(unpacked, cfg.seq_len, path)
            LOG.info("packed %d examples into %d rows of <= %d tokens", unpacked.num_rows, features.num_rows,
                     cfg.seq_len)  # fmt: skip
            os.remove(unpacked.cache_files[0]["filename"])
        atomic_write_text(done, json.dumps({"rows": features.num_rows, "format": prepared.format}) + "\n")
        LOG.info(
            "tokenized %d of %d records (%s) in %.1fs; cached in %s",
            features.num_rows, len(prepared), prepared.format, time.perf_counter() - started, path,
        )  # fmt: skip
        return features
    if not is_main:
        while not os.path.exists(done):  # rank 0 tokenizes; a SIGTERM here raises out of the sleep
            time.sleep(WAIT_POLL_SECONDS)
    elif prepared is not None:
        LOG.info("tokenized dataset read from the cache %s", path)
    return datasets.Dataset.from_file(path)


def _tokenize(cfg: TrainerConfig, tokenizer: Any, prepared: Prepared, path: str, key: str) -> Any:
    fmt, columns = prepared.format, columns_of(cfg, prepared.format)
    if fmt == c.FORMAT_MESSAGES:
        check_chat_template(tokenizer, cfg.model)
    problems: list[str] = []

    def batch_features(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        if fmt == c.FORMAT_PROMPT_COMPLETION:
            ids, labels = pair_features(tokenizer, batch[columns[0]], batch[columns[1]], cfg.seq_len)
        elif fmt == c.FORMAT_MESSAGES:
            ids, labels = message_features(tokenizer, batch[columns[0]], cfg.seq_len, problems)
        else:
            ids, labels = text_features(tokenizer, batch[columns[0]], cfg.seq_len)
        return {"input_ids": ids, "labels": labels}

    features = prepared.records.map(
        batch_features,
        batched=True,
        remove_columns=prepared.records.column_names,
        cache_file_name=path + ".unpacked" if cfg.packing else path,
        load_from_cache_file=False,
        new_fingerprint=key,  # no hashing of the function (the tokenizer) by datasets
    )
    if features.num_rows == 0:
        why = f" (first problem: {problems[0]})" if problems else ""
        raise ConfigError(
            f"no example of {cfg.dataset} (format {fmt}) tokenizes to at least 2 tokens with a trained token "
            f"with the model's tokenizer ({type(tokenizer).__name__}){why}; check the dataset fields and the "
            f"tokenizer files"
        )
    return features
