"""Pure unit tests of the torch-free trainer contract, CLI parsing and launcher helpers.

No marker on purpose: these need neither torch nor a model, so `make test-unit` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import finetune_contract as c
from finetune_trainer.__main__ import parse_config
from finetune_trainer.launch import exit_code_for_failures, needs_torchrun, torchrun_args


def test_contract_module_imports_without_torch():
    code = (
        "import sys, finetune_contract, finetune_operator.__main__;"
        "import finetune_trainer.checkpoints, finetune_trainer.metrics;"
        "import finetune_trainer.worker, finetune_trainer.stop, finetune_trainer.data, finetune_trainer.launch;"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_round_trip():
    cfg = c.TrainerConfig()
    assert c.TrainerConfig.from_env(cfg.to_env()) == cfg


def test_full_round_trip_and_env_names():
    cfg = c.TrainerConfig(
        model="/models/qwen",
        dataset="/data/train.jsonl",
        text_field="body",
        prompt_field="q",
        completion_field="a",
        dataset_format="prompt-completion",
        messages_field="conv",
        training_arguments={"warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "report_to": ["tensorboard"]},
        merge=True,
        eval_dataset="/data/eval.jsonl",
        eval_steps=50,
        method="qlora",
        precision="bf16",
        gradient_checkpointing=True,
        output_dir="/checkpoints/out",
        checkpoint_dir="/checkpoints",
        save_steps=25,
        save_total_limit=2,
        max_steps=1000,
        epochs=2.5,
        learning_rate=1e-4,
        batch_size=4,
        grad_accum=8,
        seq_len=1024,
        seed=1234,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        metrics_port=0,
        metrics_addr="127.0.0.1",
        termination_log="/tmp/tl",
        nproc_per_node=4,
        stop_timeout=50,
    )
    env = cfg.to_env()
    assert env["FT_LORA_TARGET_MODULES"] == "q_proj,k_proj,v_proj,o_proj"
    assert env["FT_METRICS_PORT"] == "0"
    assert env["FT_LEARNING_RATE"] == "0.0001"
    contract_names = {
        "FT_MODEL", "FT_DATASET", "FT_TEXT_FIELD", "FT_PROMPT_FIELD", "FT_COMPLETION_FIELD",
        "FT_DATASET_FORMAT", "FT_MESSAGES_FIELD", "FT_TRAINING_ARGUMENTS", "FT_MERGE", "FT_METHOD", "FT_PRECISION",
        "FT_GRADIENT_CHECKPOINTING", "FT_EVAL_DATASET", "FT_EVAL_STEPS",
        "FT_OUTPUT_DIR", "FT_CHECKPOINT_DIR", "FT_SAVE_STEPS", "FT_SAVE_TOTAL_LIMIT", "FT_MAX_STEPS",
        "FT_EPOCHS", "FT_LEARNING_RATE", "FT_BATCH_SIZE", "FT_GRAD_ACCUM", "FT_SEQ_LEN", "FT_SEED",
        "FT_LORA_R", "FT_LORA_ALPHA", "FT_LORA_DROPOUT", "FT_LORA_TARGET_MODULES", "FT_METRICS_PORT",
        "FT_METRICS_ADDR", "FT_TERMINATION_LOG", "FT_NPROC_PER_NODE", "FT_STOP_TIMEOUT_SECONDS",
        "FT_PACKING", "FT_STRATEGY",
    }  # fmt: skip
    assert set(env) == contract_names
    assert all(isinstance(v, str) for v in env.values())
    back = c.TrainerConfig.from_env(env)
    assert back == cfg
    assert back.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert back.problems() == []
    assert (env["FT_MERGE"], env["FT_GRADIENT_CHECKPOINTING"]) == ("true", "true")


def test_none_fields_are_left_out_and_empty_env_means_default():
    env = c.TrainerConfig(model="m", dataset="d").to_env()
    for name in ("FT_PROMPT_FIELD", "FT_COMPLETION_FIELD", "FT_CHECKPOINT_DIR", "FT_MAX_STEPS", "FT_EPOCHS"):
        assert name not in env
    cfg = c.TrainerConfig.from_env(
        {"FT_MAX_STEPS": "", "FT_MODEL": "m", "FT_LORA_TARGET_MODULES": " q_proj , v_proj ,"}
    )
    assert cfg.max_steps is None
    assert cfg.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.effective_checkpoint_dir == "/checkpoints/output/checkpoints"
    assert c.TrainerConfig.from_env({"FT_NPROC_PER_NODE": "auto"}).nproc_per_node == 0


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"FT_MAX_STEPS": "ten"}, "FT_MAX_STEPS must be an integer"),
        ({"FT_LEARNING_RATE": "fast"}, "FT_LEARNING_RATE must be a number"),
    ],
)
def test_unparsable_values_are_config_errors(env, needle):
    with pytest.raises(c.ConfigError, match=needle):
        c.TrainerConfig.from_env(env)


def test_problems():
    cfg = c.TrainerConfig(model="", dataset="d", batch_size=0, lora_dropout=1.5, prompt_field="p", max_steps=0)
    text = " | ".join(cfg.problems())
    for needle in ("no model", "FT_BATCH_SIZE must be >= 1", "FT_LORA_DROPOUT", "FT_COMPLETION_FIELD", "FT_MAX_STEPS"):
        assert needle in text


def test_dataset_format_from_the_spec_reaches_the_trainer():
    from pydantic import ValidationError

    from finetune_operator.api import TrainingJobSpec
    from finetune_operator.trainer_env import trainer_env

    base = {"image": "i", "model": "/m", "hyperparameters": {"maxSteps": 1}}
    chat = {"path": "/d", "format": "messages", "messagesField": "conv"}
    spec = TrainingJobSpec.model_validate({**base, "dataset": chat})
    cfg = c.TrainerConfig.from_env(trainer_env(spec))
    assert (cfg.dataset_format, cfg.messages_field) == ("messages", "conv")
    unset = c.TrainerConfig.from_env(trainer_env(TrainingJobSpec.model_validate({**base, "dataset": {"path": "/d"}})))
    assert (unset.dataset_format, unset.messages_field) == (None, "messages")  # inferred by the trainer
    bad = {"path": "/d", "format": "text", "promptField": "q", "completionField": "a"}
    with pytest.raises(ValidationError, match="need format prompt-completion"):
        TrainingJobSpec.model_validate({**base, "dataset": bad})
    problems = c.TrainerConfig(model="m", dataset="d", dataset_format="chat").problems()
    assert "FT_DATASET_FORMAT must be one of" in " ".join(problems)


def test_training_arguments_owned_keys_are_refused_at_apply_and_by_the_trainer():
    from pydantic import ValidationError

    from finetune_operator.api import TrainingJobSpec
    from finetune_operator.trainer_env import trainer_env

    base = {"image": "i", "model": "/m", "dataset": {"path": "/d"}, "hyperparameters": {"maxSteps": 1}}
    spec = TrainingJobSpec.model_validate({**base, "trainingArguments": {"weight_decay": 0.1, "optim": "adamw_torch"}})
    cfg = c.TrainerConfig.from_env(trainer_env(spec))
    assert cfg.training_arguments == {"weight_decay": 0.1, "optim": "adamw_torch"}
    assert cfg.problems() == []
    for key in ("output_dir", "save_steps", "per_device_train_batch_size", "resume_from_checkpoint", "logging_dir"):
        assert key in c.OWNED_TRAINING_ARGUMENTS
        with pytest.raises(ValidationError, match=f"trainingArguments.{key} is set by"):
            TrainingJobSpec.model_validate({**base, "trainingArguments": {key: 1}})
        owned = c.TrainerConfig(model="m", dataset="d", training_arguments={key: 1})
        assert any(f"trainingArguments.{key} is set by" in p for p in owned.problems())
    with pytest.raises(c.ConfigError, match="FT_TRAINING_ARGUMENTS must be a JSON object"):
        c.TrainerConfig.from_env({"FT_TRAINING_ARGUMENTS": "[1]"})


def test_help_documents_every_option_with_type_default_and_variable():
    """`python -m finetune_trainer --help`: one option per contract field, each with its help text,
    type, FT_* variable and default; no termination message written, exit 0."""
    import dataclasses
    import os
    import re

    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "--help"], env={**env, "COLUMNS": "1000"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  --([a-z0-9-]+) \S+\s+(.*)$", done.stdout, re.M)}
    fields = dataclasses.fields(c.TrainerConfig)
    assert set(lines) == {f.name.replace("_", "-") for f in fields}
    for f in fields:
        text = lines[f.name.replace("_", "-")]
        assert f.metadata["help"] in text
        assert f"[{c.field_type(f.name)}; env {f.metadata['env']}; default: {c.field_default(f.name)}]" in text
    assert "default: 100]" in lines["save-steps"] and "default: q_proj,v_proj]" in lines["lora-target-modules"]
    assert "[JSON; env FT_TRAINING_ARGUMENTS; default: unset]" in lines["training-arguments"]
    assert "[bool; env FT_PACKING; default: false]" in lines["packing"] and "seq-len tokens" in lines["packing"]
    assert "ddp | fsdp" in lines["strategy"] and "[str; env FT_STRATEGY; default: ddp]" in lines["strategy"]
    assert "78 bad configuration" in done.stdout


def test_memory_and_output_settings_from_the_spec_reach_the_trainer():
    from finetune_operator.api import TrainingJobSpec
    from finetune_operator.trainer_env import trainer_env

    base = {"image": "i", "model": "/m", "dataset": {"path": "/d"}}
    spec = TrainingJobSpec.model_validate({
        **base, "method": "QLoRA", "output": {"merge": True},
        "hyperparameters": {"maxSteps": 1, "precision": "bf16", "gradientCheckpointing": True},
    })  # fmt: skip
    cfg = c.TrainerConfig.from_env(trainer_env(spec))
    assert (cfg.method, cfg.precision, cfg.gradient_checkpointing, cfg.merge) == ("qlora", "bf16", True, True)
    plain = TrainingJobSpec.model_validate({**base, "hyperparameters": {"epochs": 1}})
    default = c.TrainerConfig.from_env(trainer_env(plain))
    assert (default.method, default.precision, default.gradient_checkpointing) == ("lora", "auto", False)
    assert not default.merge


def test_cli_overrides_env():
    env = {"FT_MODEL": "/m", "FT_DATASET": "/d", "FT_MAX_STEPS": "10", "FT_LORA_TARGET_MODULES": "q_proj"}
    cfg = parse_config(["--max-steps", "20", "--lora-target-modules", "q_proj,o_proj", "--seed", "3"], env)
    assert (cfg.model, cfg.max_steps, cfg.seed) == ("/m", 20, 3)
    assert cfg.lora_target_modules == ("q_proj", "o_proj")
    with pytest.raises(c.ConfigError, match="bad command line"):
        parse_config(["--no-such-flag"], env)
    with pytest.raises(c.ConfigError, match="FT_SEED must be an integer"):
        parse_config(["--seed", "x"], env)


def test_termination_message_schema_and_size():
    msg = c.termination_message(
        c.OUTCOME_PREEMPTED,
        step=21,
        max_steps=40,
        checkpoint="/ck/checkpoint-21",
        checkpoint_step=21,
        loss=6.9,
        resumed_from=10,
        message="line one\nline two\t" + "x" * 10000,
    )
    assert tuple(msg) == c.TERMINATION_MESSAGE_KEYS
    text = c.encode_termination_message(msg)
    assert len(text.encode()) < c.TERMINATION_MESSAGE_MAX_BYTES
    back = c.parse_termination_message(text)
    assert back["step"] == 21 and back["checkpointStep"] == 21 and back["resumedFrom"] == 10
    assert "\n" not in back["message"] and back["message"].startswith("line one line two x")
    # NaN loss becomes null (JSON has no NaN); a huge checkpoint path still fits
    huge = c.termination_message(c.OUTCOME_ERROR, loss=float("nan"), checkpoint="/" + "p" * 9000, message="é" * 5000)
    text = c.encode_termination_message(huge)
    assert len(text.encode()) < c.TERMINATION_MESSAGE_MAX_BYTES
    assert json.loads(text)["loss"] is None
    assert c.parse_termination_message("") is None
    assert c.parse_termination_message('{"outcome": "weird"}') is None
    with pytest.raises(ValueError):
        c.termination_message("weird")


def test_write_termination_message(tmp_path):
    p = tmp_path / "tl"
    p.write_text("old content that is longer than the new one" * 200)
    assert c.write_termination_message(str(p), c.termination_message(c.OUTCOME_COMPLETED, step=3))
    assert c.parse_termination_message(p.read_text())["step"] == 3
    assert not c.write_termination_message(str(tmp_path / "missing-dir" / "tl"), {"outcome": "completed"})


def test_exit_code_constants():
    assert (c.EXIT_COMPLETED, c.EXIT_ERROR, c.EXIT_CONFIG_ERROR, c.EXIT_PREEMPTED) == (0, 1, 78, 143)
    assert c.OUTCOME_EXIT_CODES[c.OUTCOME_PREEMPTED] == 143


def test_launcher_exit_code_mapping():
    assert exit_code_for_failures({0: 78, 1: 78}) == 78
    assert exit_code_for_failures({1: 78, 0: -15}) == 78
    assert exit_code_for_failures({0: 143, 1: 143}) == 143
    assert exit_code_for_failures({0: 1, 1: 143}) == 1
    assert exit_code_for_failures({0: -9}) == 1
    assert exit_code_for_failures({}) == 1


def test_torchrun_mode_selection():
    one = c.TrainerConfig(nproc_per_node=1)
    two = c.TrainerConfig(nproc_per_node=2)
    assert not needs_torchrun(one, {})
    assert needs_torchrun(two, {})
    assert needs_torchrun(one, {"PET_NNODES": "2"})
    assert not needs_torchrun(two, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"})  # already a worker
    assert torchrun_args(2, ["--seed", "1"], {}) == [
        "--nproc-per-node", "2", "--standalone", "--module", "finetune_trainer", "--seed", "1",
    ]  # fmt: skip
    assert "--standalone" not in torchrun_args(2, [], {"PET_MASTER_ADDR": "job-0", "PET_NNODES": "1"})


_name = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="_./-"), min_size=1, max_size=30
)
_module = st.from_regex(r"[a-z_][a-z0-9_.]{0,20}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    cfg=st.builds(
        c.TrainerConfig,
        model=_name,
        dataset=_name,
        text_field=_name,
        prompt_field=st.none() | _name,
        completion_field=st.none() | _name,
        output_dir=_name,
        checkpoint_dir=st.none() | _name,
        save_steps=st.integers(1, 10**6),
        save_total_limit=st.integers(0, 100),
        max_steps=st.none() | st.integers(1, 10**7),
        epochs=st.none() | st.floats(min_value=1e-3, max_value=1e3, allow_nan=False),
        learning_rate=st.floats(min_value=1e-9, max_value=1.0, allow_nan=False),
        batch_size=st.integers(1, 4096),
        grad_accum=st.integers(1, 1024),
        seq_len=st.integers(2, 1 << 20),
        seed=st.integers(0, 2**32 - 1),
        lora_r=st.integers(1, 1024),
        lora_alpha=st.integers(1, 4096),
        lora_dropout=st.floats(min_value=0.0, max_value=0.99, allow_nan=False),
        lora_target_modules=st.lists(_module, min_size=1, max_size=8).map(tuple),
        metrics_port=st.integers(0, 65535),
        metrics_addr=st.sampled_from(["0.0.0.0", "127.0.0.1", "::"]),
        termination_log=_name,
        nproc_per_node=st.integers(0, 64),
        stop_timeout=st.integers(1, 86_400),
    )
)
def test_round_trip_property(cfg):
    env = cfg.to_env()
    assert all(k.startswith("FT_") and isinstance(v, str) for k, v in env.items())
    assert c.TrainerConfig.from_env(env) == cfg


@given(st.integers(0, 86_400))
def test_stop_timeout_leaves_a_margin_below_the_grace_period(grace):
    t = c.stop_timeout_for_grace(grace)
    assert t >= 1
    if grace >= 2:
        assert t < grace and grace - t <= 10
