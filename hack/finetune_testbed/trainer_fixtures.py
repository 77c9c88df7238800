"""Offline fixtures: a tiny random Llama-style model + byte-level BPE tokenizer on disk, and
small JSONL datasets (docs/TRAINER.md). Used by tests/trainer, the benchmarks and e2e tests.

Needs transformers and tokenizers; set HF_HUB_OFFLINE=1 before importing transformers.
"""

from __future__ import annotations

import json
import os
import random

WORDS = (
    "the a model learns from data and tokens every step while loss goes down slowly "
    "checkpoints are saved to disk so training can resume after the pod is preempted "
    "gpu cluster kubernetes operator adapter lora rank alpha dropout batch sequence"
).split()


QUIET_OFFLINE_ENV = (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("OMP_NUM_THREADS", "1"),
)


def quiet_offline_env() -> None:
    """Offline and quiet; call before anything imports transformers (docs/TRAINER.md pitfalls 3, 11)."""
    for key, value in QUIET_OFFLINE_ENV:
        os.environ.setdefault(key, value)


def synthetic_sentences(n: int, seed: int = 0, min_words: int = 6, max_words: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
        for _ in range(n)
    ]


# A small chat template (the tiny tokenizer has none of its own), so messages datasets are
# rendered by the real apply_chat_template path: each assistant turn ends with the EOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def build_tokenizer(directory: str, vocab_size: int = 1000, model_max_length: int = 128):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_sentences(2000, seed=1), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> <s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: str, seed: int = 0) -> str:
    """Write a ~140k-parameter random Llama + tokenizer to ``directory``; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(directory, exist_ok=True)
    tok = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def text_dataset(path: str, n: int = 400, seed: int = 2, field: str = "text") -> str:
    return write_jsonl(path, [{field: s} for s in synthetic_sentences(n, seed=seed)])


def prompt_completion_records(n: int = 200, seed: int = 3) -> list[dict]:
    sents = synthetic_sentences(2 * n, seed=seed)
    return [{"prompt": sents[2 * i], "completion": sents[2 * i + 1]} for i in range(n)]


def prompt_completion_dataset(path: str, n: int = 200, seed: int = 3) -> str:
    return write_jsonl(path, prompt_completion_records(n, seed))


def messages_records(n: int = 100, seed: int = 4) -> list[dict]:
    """Conversations: a system line, then two user/assistant exchanges."""
    sents = synthetic_sentences(5 * n, seed=seed, max_words=10)
    roles = ("system", "user", "assistant", "user", "assistant")
    return [{"messages": [{"role": r, "content": sents[5 * i + j]} for j, r in enumerate(roles)]} for i in range(n)]


def write_json(path: str, records: list[dict]) -> str:
    """One JSON array (not JSON Lines)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(records, fh)
    return path


def write_parquet(path: str, records: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path
