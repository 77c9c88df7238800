"""What a finished job leaves in its output directory: the adapter (base model recorded by path or
hub id), the merged model when asked (FT_MERGE), nothing of the trainer's own (docs/TRAINER.md "Output")."""

from __future__ import annotations

import json
import shutil

import pytest
from trainerkit import TrainerRun, make_env

import finetune_contract as c

pytestmark = pytest.mark.trainer

ADAPTER_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "README.md",  # peft's adapter and model card
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",  # the tokenizer, as trained with
    "training_args.bin",  # HF's record of the run's arguments
}  # fmt: skip


def test_merged_model_loads_and_output_holds_nothing_else(tmp_path, tiny_model, text_data):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    env = make_env(tmp_path, tiny_model, text_data, max_steps=3, save_steps=100, learning_rate=0.01, merge="true")
    env[c.ENV_CHECKPOINT_DIR] = str(tmp_path / "checkpoints")  # siblings, as the operator sets them
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    out = run.out_dir
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES | {c.MERGED_SUBDIR}
    assert (run.ckpt_dir / c.WORK_SUBDIR / c.METRICS_PORT_FILE).is_file()  # moved out of the output directory
    merged_dir = out / c.MERGED_SUBDIR
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").is_file()
    assert f"merged model in {merged_dir}" in run.termination()["message"]

    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        merged_logits, adapted_logits, auto_logits = merged(ids).logits, adapted(ids).logits, auto(ids).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5)
    assert torch.allclose(auto_logits, adapted_logits, atol=1e-6)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the LoRA changed the model


def test_adapter_records_a_hub_id_as_given(tmp_path, tiny_model, text_data):
    """A model named by hub id (here from an offline hub cache) is recorded by that id; a local
    directory by its absolute path (test_train_produces_adapter; docs/TRAINER.md pitfall 4)."""
    snapshot = tmp_path / "hf" / "hub" / "models--finetune-test--tiny-llama"
    revision = "0" * 40
    shutil.copytree(tiny_model, snapshot / "snapshots" / revision)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(revision)
    env = make_env(tmp_path, tiny_model, text_data, max_steps=1, save_steps=100)
    env.update({c.ENV_MODEL: "finetune-test/tiny-llama", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    adapter_config = json.loads((run.out_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "finetune-test/tiny-llama"
