"""FSDP (docs/TRAINER.md "FSDP"): the TrainingArguments the trainer builds for ``strategy: fsdp``, what
accelerate makes of them, and the combinations refused with exit 78. A sharded run needs CUDA GPUs
(accelerate 1.15 turns FSDP on for multi-GPU runs only), so on CPU it is a configuration error."""

from __future__ import annotations

import pytest
from trainerkit import TrainerRun, make_env

import finetune_contract as c
from finetune_trainer import strategy, training

pytestmark = pytest.mark.trainer


def _fsdp_args(tmp_path, tiny_model, **changes):
    cfg = c.TrainerConfig(output_dir=str(tmp_path), max_steps=1, strategy="fsdp", **changes)
    return training.training_arguments(cfg, bf16=False, fp16=False, model_path=str(tiny_model))


def test_fsdp_reaches_the_training_arguments_and_accelerate(tmp_path, tiny_model):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = _fsdp_args(tmp_path, tiny_model)
    assert args.fsdp is True
    config = args.fsdp_config
    assert config["version"] == 2 and config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]  # the tiny Llama's decoder layer
    assert config["state_dict_type"] == "FULL_STATE_DICT" and config["reshard_after_forward"] is True
    assert "activation_checkpointing" not in config and not args.gradient_checkpointing
    # what the Trainer hands accelerate (Trainer.create_accelerator_and_postprocess builds this plugin)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
    }  # fmt: skip
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]

    ddp = training.training_arguments(c.TrainerConfig(output_dir=str(tmp_path), max_steps=1), False, False)
    assert not ddp.fsdp and not ddp.fsdp_plugin_args


def test_fsdp_takes_gradient_checkpointing_as_activation_checkpointing(tmp_path, tiny_model):
    args = _fsdp_args(tmp_path, tiny_model, gradient_checkpointing=True)
    assert args.fsdp_config["activation_checkpointing"] is True and not args.gradient_checkpointing
    assert args.fsdp_plugin_args["activation_checkpointing"] is True


def test_fsdp_config_from_training_arguments_is_laid_over_the_defaults(tmp_path, tiny_model):
    args = _fsdp_args(
        tmp_path, tiny_model,
        training_arguments={"fsdp_config": {"reshard_after_forward": False, "transformer_layer_cls_to_wrap": "X"}},
    )  # fmt: skip
    assert args.fsdp_config["reshard_after_forward"] is False and args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["X"]
    with pytest.raises(c.ConfigError, match="trainingArguments.fsdp is set by spec.strategy"):
        _fsdp_args(tmp_path, tiny_model, training_arguments={"fsdp": True})
    with pytest.raises(c.ConfigError, match="trainingArguments.fsdp_config must be an object"):
        _fsdp_args(tmp_path, tiny_model, training_arguments={"fsdp_config": "fsdp.json"})


def test_refused_combinations_name_the_fields():
    lora = c.TrainerConfig(strategy="fsdp")
    with pytest.raises(c.ConfigError, match="FT_STRATEGY=fsdp shards the model across CUDA GPUs; none is visible"):
        strategy.check(lora, on_gpu=False, world_size=2)
    with pytest.raises(c.ConfigError, match="FT_STRATEGY=fsdp needs more than one process"):
        strategy.check(lora, on_gpu=True, world_size=1)
    strategy.check(lora, on_gpu=True, world_size=2)  # accepted
    strategy.check(c.TrainerConfig(), on_gpu=False, world_size=1)  # ddp: anywhere
    qlora = lora.replace(method="qlora")
    with pytest.raises(c.ConfigError, match="FT_STRATEGY=fsdp with FT_METHOD=qlora is not supported"):
        strategy.check(qlora, on_gpu=True, world_size=8)
    problems = " ".join(c.TrainerConfig(model="m", dataset="d", strategy="zero3").problems())
    assert "FT_STRATEGY must be one of ddp, fsdp, got 'zero3'" in problems
    assert "FT_METHOD=qlora" in " ".join(qlora.replace(model="m", dataset="d").problems())


def test_fsdp_with_qlora_exits_78_before_loading(tmp_path, tiny_model, text_data):
    run = TrainerRun(tmp_path, make_env(tmp_path, tiny_model, text_data, max_steps=2, method="qlora", strategy="fsdp"))
    assert run.wait(60) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and "FT_STRATEGY=fsdp with FT_METHOD=qlora" in msg["message"], msg
    assert "Traceback" not in run.output()


def test_a_two_process_fsdp_run_on_cpu_is_a_configuration_error(tmp_path, tiny_model, text_data):
    """Under torchrun with gloo, as a 2-GPU run would start; accelerate would train it unsharded."""
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2, strategy="fsdp", nproc_per_node=2)
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error", msg
    assert "FT_STRATEGY=fsdp shards the model across CUDA GPUs; none is visible" in msg["message"], msg
