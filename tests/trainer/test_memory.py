"""Memory knobs: precision, gradient checkpointing, QLoRA (docs/TRAINER.md "Memory"). On CPU the
tests check the configuration that reaches the Trainer and the model, and that QLoRA without a
GPU is a configuration error; a real 4-bit run needs a GPU (bench/gpu_trainer_check.py)."""

from __future__ import annotations

import pytest
import torch
from trainerkit import TrainerRun, make_env

import finetune_contract as c
from finetune_trainer import prepare, training

pytestmark = pytest.mark.trainer


def test_precision_choices_on_cpu():
    assert not torch.cuda.is_available()
    assert prepare.precision(c.TrainerConfig()) == (torch.float32, False, False)  # auto on CPU
    assert prepare.precision(c.TrainerConfig(precision="fp32")) == (torch.float32, False, False)
    assert prepare.precision(c.TrainerConfig(precision="bf16")) == (torch.bfloat16, True, False)
    with pytest.raises(c.ConfigError, match="FT_PRECISION=fp16 needs a CUDA GPU"):
        prepare.precision(c.TrainerConfig(precision="fp16"))
    problems = c.TrainerConfig(model="m", dataset="d", precision="fp8").problems()
    assert "FT_PRECISION must be one of" in " ".join(problems)


def test_gradient_checkpointing_reaches_the_training_arguments(tmp_path):
    cfg = c.TrainerConfig(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=1)
    args = training.training_arguments(cfg, bf16=True, fp16=False)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.bf16 and not args.fp16
    user = cfg.replace(training_arguments={"gradient_checkpointing_kwargs": {"use_reentrant": True}})
    assert training.training_arguments(user, False, False).gradient_checkpointing_kwargs == {"use_reentrant": True}
    plain = training.training_arguments(cfg.replace(gradient_checkpointing=False), False, False)
    assert not plain.gradient_checkpointing
    with pytest.raises(c.ConfigError, match="trainingArguments.gradient_checkpointing is set by"):
        training.training_arguments(cfg.replace(training_arguments={"gradient_checkpointing": True}), False, False)


def test_qlora_loads_the_base_in_4_bits_on_this_ranks_gpu():
    kwargs = prepare.model_load_kwargs(c.TrainerConfig(method="qlora"), torch.bfloat16, local_rank=3)
    q = kwargs["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["dtype"] == torch.bfloat16
    assert kwargs["device_map"] == {"": 3}
    assert prepare.model_load_kwargs(c.TrainerConfig(), torch.float32, 0) == {"dtype": torch.float32}


def test_qlora_without_a_gpu_exits_78(tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2, method="qlora")
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and "FT_METHOD=qlora" in msg["message"], msg
    assert "needs a CUDA GPU" in msg["message"] and "Traceback" not in run.output()


def test_bf16_with_gradient_checkpointing_trains_and_reaches_the_trainer(tmp_path, tiny_model, text_data):
    """In process, so a callback sees the arguments and the model the Trainer got."""
    from transformers import TrainerCallback

    from finetune_trainer import data
    from finetune_trainer.stop import StopSignal
    from finetune_trainer.worker import Report

    seen: dict = {}

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["args"], seen["model"] = args, model

    cfg = c.TrainerConfig(
        model=str(tiny_model), dataset=str(text_data), output_dir=str(tmp_path / "out"), max_steps=2,
        save_steps=100, batch_size=4, seq_len=32, precision="bf16", gradient_checkpointing=True, termination_log="",
    )  # fmt: skip
    report = Report(cfg, enabled=False)
    outcome, _ = training.train(cfg, str(tiny_model), data.prepare(cfg), StopSignal(), report, None, [Seen()])
    assert outcome == c.OUTCOME_COMPLETED and report.step == 2 and report.loss is not None
    args, model = seen["args"], seen["model"]
    assert args.bf16 and args.gradient_checkpointing
    assert model.base_model.model.is_gradient_checkpointing
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16} and lora_dtypes == {torch.float32}  # peft keeps the adapter in fp32
