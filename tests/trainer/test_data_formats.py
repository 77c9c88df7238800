"""Datasets through HF ``datasets``: file types, formats, the labels each format trains on,
and the tokenized cache (docs/TRAINER.md "Data"). The runs are the real trainer on the tiny model."""

from __future__ import annotations

import json

import pytest
from trainerkit import TrainerRun, make_env

import finetune_contract as c
from finetune_testbed.trainer_fixtures import (
    messages_records,
    prompt_completion_records,
    write_json,
    write_jsonl,
    write_parquet,
)
from finetune_trainer import data, features

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def _trained_text(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != data.IGNORE_INDEX])


@pytest.mark.parametrize(
    "cfg, columns, expected",
    [
        ({}, ["text"], c.FORMAT_TEXT),
        ({}, ["messages"], c.FORMAT_MESSAGES),
        ({}, ["prompt", "completion"], c.FORMAT_PROMPT_COMPLETION),
        ({}, ["text", "messages"], c.FORMAT_TEXT),  # the text field wins
        ({"prompt_field": "q", "completion_field": "a"}, ["q", "a", "text"], c.FORMAT_PROMPT_COMPLETION),
        ({"messages_field": "conv"}, ["conv"], c.FORMAT_MESSAGES),
        ({"dataset_format": "messages"}, ["text", "messages"], c.FORMAT_MESSAGES),
    ],
)
def test_format_is_configured_or_inferred(cfg, columns, expected):
    assert data.resolve_format(c.TrainerConfig(**cfg), columns) == expected


def test_messages_train_only_on_assistant_turns(tok):
    conversation = messages_records(1)[0]["messages"]
    (ids,), (labels,) = features.message_features(tok, [conversation], 128, [])
    assert len(ids) == len(labels)
    trained = _trained_text(tok, ids, labels)
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    # each answer and the EOS ending its turn; no system or user text, no role prefix
    assert trained == "".join(a + tok.eos_token for a in answers)
    assert labels[0] == data.IGNORE_INDEX and ids[0] == tok.bos_token_id
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode(ids) == rendered  # the whole conversation goes in, rendered by the template


def test_messages_need_a_chat_template(tok):
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(c.ConfigError, match="has no chat template"):
            features.check_chat_template(tok, "tiny")
    finally:
        tok.chat_template = template


def test_malformed_conversations_are_skipped_with_the_first_reason(tok):
    good = messages_records(1)[0]["messages"]
    bad_role = [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]
    no_answer = [{"role": "user", "content": "x"}]
    problems: list[str] = []
    ids, _ = features.message_features(tok, [bad_role, no_answer, "junk", good], 128, problems)
    assert len(ids) == 1
    assert problems and "unknown role robot" in problems[0]


@pytest.mark.parametrize(
    "kind, fmt",
    [("parquet", c.FORMAT_MESSAGES), ("json-dir", c.FORMAT_PROMPT_COMPLETION)],
)
def test_run_on_each_file_type_and_format(kind, fmt, tmp_path, tiny_model):
    """Parquet messages and a directory of JSON arrays with prompt/completion, format inferred;
    a second run reads the tokenized cache instead of tokenizing again."""
    if kind == "parquet":
        dataset = write_parquet(str(tmp_path / "chat.parquet"), messages_records(40))
    else:
        (tmp_path / "pc").mkdir()
        records = prompt_completion_records(40)
        write_json(str(tmp_path / "pc" / "a.json"), records[:20])
        write_json(str(tmp_path / "pc" / "b.json"), records[20:])
        dataset = str(tmp_path / "pc")
    env = make_env(tmp_path, tiny_model, tmp_path, max_steps=3, save_steps=100)
    env[c.ENV_DATASET] = dataset
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    out = run.output()
    assert f"(40 records, format {fmt})" in out
    assert f"tokenized 40 of 40 records ({fmt})" in out
    assert sorted(run.losses()) == [1, 2, 3]
    cache = run.ckpt_dir / c.WORK_SUBDIR / features.CACHE_SUBDIR
    (done,) = cache.glob("tokenized-*.arrow.done")
    assert json.loads(done.read_text()) == {"rows": 40, "format": fmt}
    assert c.WORK_SUBDIR not in {p.name for p in run.out_dir.iterdir()}  # the cache is not next to the adapter

    again = TrainerRun(tmp_path, {**env, c.ENV_MAX_STEPS: "4"}, name="again")
    assert again.wait(180) == 0, again.output()[-4000:]
    assert "tokenized dataset read from the cache" in again.output()
    assert "tokenized 40 of 40" not in again.output()
    assert sorted(again.losses()) == [4]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("messages_without_template", "has no chat template"),
        ("mixed_file_types", "mixes JSON and Parquet"),
        ("bad_json", "cannot read dataset"),
        ("missing_messages_field", "the field(s) 'conv'"),
        ("bad_format", "FT_DATASET_FORMAT must be one of"),
    ],
)
def test_data_configuration_errors_exit_78(case, needle, tmp_path, tiny_model):
    import shutil

    dataset = write_jsonl(str(tmp_path / "chat.jsonl"), messages_records(4))
    env = make_env(tmp_path, tiny_model, tmp_path, max_steps=2)
    env[c.ENV_DATASET] = dataset
    if case == "messages_without_template":
        model = tmp_path / "model"
        shutil.copytree(tiny_model, model)
        (model / "chat_template.jinja").unlink()
        env[c.ENV_MODEL] = str(model)
    elif case == "mixed_file_types":
        (tmp_path / "mixed").mkdir()
        write_jsonl(str(tmp_path / "mixed" / "a.jsonl"), messages_records(2))
        write_parquet(str(tmp_path / "mixed" / "b.parquet"), messages_records(2))
        env[c.ENV_DATASET] = str(tmp_path / "mixed")
    elif case == "bad_json":
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
        env[c.ENV_DATASET] = str(tmp_path / "bad.jsonl")
    elif case == "missing_messages_field":
        env[c.ENV_DATASET_FORMAT] = "messages"
        env[c.ENV_MESSAGES_FIELD] = "conv"
    elif case == "bad_format":
        env[c.ENV_DATASET_FORMAT] = "chat"
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and needle in msg["message"], msg
    assert "Traceback" not in run.output()
