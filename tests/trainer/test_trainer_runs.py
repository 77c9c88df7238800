"""The real trainer (torch + transformers + peft, CPU) on a tiny random Llama, as subprocesses.

Waits are on conditions with deadlines (a file appearing, a log line, a metrics value);
FT_DEBUG_STEP_DELAY slows the tiny model's steps so a run can be observed and interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
from trainerkit import TrainerRun, make_env, scrape, wait_until

import finetune_contract as c
from finetune_trainer import checkpoints as ck

pytestmark = pytest.mark.trainer

REF_STEPS, REF_SAVE = 16, 5


def _complete(path: Path) -> bool:
    return ck.is_complete(str(path))


def _log_losses(checkpoint: Path) -> list[tuple[int, float]]:
    state = json.loads((checkpoint / ck.TRAINER_STATE_NAME).read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model, text_data) -> TrainerRun:
    """An uninterrupted run: 16 steps, a checkpoint every 5 (kept: 10, 15, 16)."""
    tmp = tmp_path_factory.mktemp("reference")
    run = TrainerRun(tmp, make_env(tmp, tiny_model, text_data, max_steps=REF_STEPS, save_steps=REF_SAVE))
    rc = run.wait(180)
    assert rc == 0, run.output()[-4000:]
    return run


def test_train_produces_adapter(reference_run, tiny_model):
    run = reference_run
    out = run.out_dir
    adapter = out / "adapter_model.safetensors"
    assert adapter.is_file() and (out / "adapter_config.json").is_file()
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o644  # docs/TRAINER.md pitfall 7
    for p in run.ckpt_dir.glob("checkpoint-*/*.safetensors"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)  # absolute (docs/TRAINER.md pitfall 4)
    assert sorted(p.name for p in run.ckpt_dir.glob("checkpoint-*")) == [
        "checkpoint-10", "checkpoint-15", "checkpoint-16",
    ]  # fmt: skip  (save_total_limit 3)
    # one readable progress line per step
    losses = run.losses()
    assert sorted(losses) == list(range(1, REF_STEPS + 1))
    assert "tokens/s=" in run.output()
    msg = run.termination()
    assert msg["outcome"] == "completed"
    assert (msg["step"], msg["maxSteps"], msg["checkpointStep"], msg["resumedFrom"]) == (16, 16, 16, None)
    assert msg["checkpoint"] == str(run.ckpt_dir / "checkpoint-16")
    assert msg["loss"] == pytest.approx(float(losses[16]), abs=1e-6)
    assert "PrinterCallback" not in run.output() and "{'loss'" not in run.output()

    # The adapter loads onto the base model offline.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    lora_a = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_a and any("q_proj" in n for n in lora_a) and any("v_proj" in n for n in lora_a)


def test_sigkill_then_resume_matches_uninterrupted_losses(tmp_path, tiny_model, text_data, reference_run):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=REF_STEPS, save_steps=REF_SAVE)
    killed = TrainerRun(tmp_path, {**env, c.ENV_DEBUG_STEP_DELAY: "0.1"}, name="killed")
    ckpt10 = killed.ckpt_dir / "checkpoint-10"
    wait_until(lambda: _complete(ckpt10), 120, "checkpoint-10", proc=killed, interval=0.005)
    killed.kill(signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    latest = ck.latest_complete_checkpoint(str(killed.ckpt_dir))
    assert latest is not None and 10 <= latest.step < REF_STEPS, "the run finished before it could be killed"
    assert killed.last_step() < REF_STEPS

    resumed = TrainerRun(tmp_path, env, name="resumed")
    assert resumed.wait(180) == 0, resumed.output()[-4000:]
    assert f"resuming from {latest.path}" in resumed.output()
    ref = reference_run.losses()
    got = resumed.losses()
    assert sorted(got) == list(range(latest.step + 1, REF_STEPS + 1))
    assert got == {s: ref[s] for s in got}  # the logged per-step losses after resume
    # bit-exact: the full loss history in the final checkpoint equals the uninterrupted run's
    final = "checkpoint-16"
    assert _log_losses(resumed.ckpt_dir / final) == _log_losses(reference_run.ckpt_dir / final)
    msg = resumed.termination()
    assert (msg["outcome"], msg["step"], msg["resumedFrom"]) == ("completed", 16, latest.step)

    # Started again after completion (e.g. killed before it could exit): no extra step
    # (HF would train step 17/16), the final checkpoint's adapter is published as is.
    adapter = resumed.out_dir / "adapter_model.safetensors"
    adapter.unlink()
    again = TrainerRun(tmp_path, env, name="again")
    assert again.wait(180) == 0, again.output()[-4000:]
    assert again.losses() == {}
    assert adapter.read_bytes() == (resumed.ckpt_dir / final / "adapter_model.safetensors").read_bytes()
    msg = again.termination()
    assert (msg["outcome"], msg["step"], msg["maxSteps"]) == ("completed", 16, 16)
    assert "already complete" in msg["message"] and msg["loss"] == pytest.approx(float(ref[16]), abs=1e-6)
    assert not (resumed.ckpt_dir / "checkpoint-17").exists()


def test_sigterm_saves_checkpoint_and_exits_143(trainer_env):
    env = trainer_env(max_steps=500, save_steps=1000)
    run = TrainerRun(Path(env[c.ENV_OUTPUT_DIR]).parent, {**env, c.ENV_DEBUG_STEP_DELAY: "0.05"})
    wait_until(lambda: run.last_step() >= 3, 120, "step 3", proc=run)
    t0 = time.monotonic()
    run.signal(signal.SIGTERM)
    rc = run.wait(60)
    took = time.monotonic() - t0
    assert rc == 143, run.output()[-4000:]
    assert took < 30
    msg = run.termination()
    step = msg["step"]
    assert msg["outcome"] == "preempted"
    assert 3 <= step < 500
    assert msg["checkpointStep"] == step and msg["maxSteps"] == 500
    assert msg["checkpoint"] == str(run.ckpt_dir / f"checkpoint-{step}")
    assert _complete(Path(msg["checkpoint"]))
    assert "stop requested" in run.output()
    assert not (run.out_dir / "adapter_model.safetensors").exists()  # not finished: no final adapter

    # the next attempt resumes from it
    again = TrainerRun(run.workdir, {**env, c.ENV_MAX_STEPS: str(step + 2)}, name="again")
    assert again.wait(180) == 0, again.output()[-4000:]
    msg2 = again.termination()
    assert (msg2["outcome"], msg2["resumedFrom"], msg2["step"]) == ("completed", step, step + 2)
    assert sorted(again.losses()) == [step + 1, step + 2]


def test_sigterm_before_training_exits_143_quickly(tmp_path, tiny_model, text_data, reference_run):
    """SIGTERM while loading: nothing new to save, exit 143 at once, existing checkpoint reported."""
    env = make_env(tmp_path, tiny_model, text_data, max_steps=REF_STEPS, save_steps=REF_SAVE)
    ckdir = tmp_path / "out" / "checkpoints"
    ckdir.mkdir(parents=True)
    shutil.copytree(reference_run.ckpt_dir / "checkpoint-10", ckdir / "checkpoint-10")
    run = TrainerRun(tmp_path, env)
    wait_until(lambda: "metrics on" in run.output(), 60, "the metrics line", proc=run)
    assert "training: step" not in run.output()
    run.signal(signal.SIGTERM)
    assert run.wait(60) == 143, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "preempted" and "before training started" in msg["message"]
    assert (msg["step"], msg["checkpointStep"]) == (10, 10)
    assert sorted(p.name for p in ckdir.iterdir()) == ["checkpoint-10", c.WORK_SUBDIR]


def test_half_written_checkpoint_is_ignored_and_reported(tmp_path, tiny_model, text_data, reference_run):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=12, save_steps=100)
    ckdir = tmp_path / "out" / "checkpoints"
    ckdir.mkdir(parents=True)
    good = reference_run.ckpt_dir / "checkpoint-10"
    shutil.copytree(good, ckdir / "checkpoint-10")
    # crashed in the middle of a save: weights written, trainer_state.json not yet
    half = ckdir / "checkpoint-15"
    half.mkdir()
    shutil.copy(good / "adapter_model.safetensors", half)
    # JIT checkpoint sentinel still present
    shutil.copytree(good, ckdir / "checkpoint-12")
    (ckdir / "checkpoint-12" / ck.INCOMPLETE_SENTINEL).write_text("")

    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    out = run.output()
    assert "skipping incomplete checkpoint checkpoint-12" in out
    assert "skipping incomplete checkpoint checkpoint-15" in out
    assert f"resuming from {ckdir / 'checkpoint-10'}" in out
    msg = run.termination()
    assert msg["resumedFrom"] == 10 and msg["step"] == 12
    assert "skipped incomplete checkpoint-12,checkpoint-15" in msg["message"]
    assert (ckdir / "incomplete-checkpoint-15").is_dir() and (ckdir / "incomplete-checkpoint-12").is_dir()
    assert _complete(ckdir / "checkpoint-12")  # a fresh, complete save of step 12
    assert sorted(run.losses()) == [11, 12]


def test_metrics_endpoint_shows_steps_advancing(trainer_env):
    env = trainer_env(max_steps=40, save_steps=3)
    run = TrainerRun(Path(env[c.ENV_OUTPUT_DIR]).parent, {**env, c.ENV_DEBUG_STEP_DELAY: "0.15"})
    port = wait_until(run.metrics_port, 60, "metrics-port file", proc=run)
    assert f"metrics on http://127.0.0.1:{port}/metrics" in run.output()
    samples = []

    def advanced():
        m = scrape(port)
        samples.append(m)
        return m[c.METRIC_STEP] >= 5

    wait_until(advanced, 120, "step 5 on /metrics", proc=run, interval=0.05)
    run.signal(signal.SIGTERM)  # no need to run all 40 steps
    assert run.wait(60) == 143

    last = samples[-1]
    for name in c.METRIC_NAMES:
        assert name in last, name
    assert last[c.METRIC_TOTAL_STEPS] == 40
    assert last[c.METRIC_LOSS] > 0 and last[c.METRIC_TOKENS_PER_SECOND] > 0
    assert last[c.METRIC_EPOCH] > 0
    # checkpoints every 3 steps (a scrape can land between a step's end and its save)
    ckpt_step, step = last[c.METRIC_LAST_CHECKPOINT_STEP], last[c.METRIC_STEP]
    assert ckpt_step % 3 == 0 and step - 3 <= ckpt_step <= step
    steps = [s[c.METRIC_STEP] for s in samples]
    beats = [s[c.METRIC_HEARTBEAT] for s in samples]
    assert steps == sorted(steps) and beats == sorted(beats)
    assert len(set(steps)) >= 3  # watched it move
    # the heartbeat advances only when the step advances: about 3 scrapes per step, yet one
    # heartbeat value per step seen (+2 for scrapes landing between the two gauge updates)
    assert len(samples) > 2 * len(set(steps))
    assert len(set(b for b in beats if b > 0)) <= len(set(s for s in steps if s > 0)) + 2
    assert beats[-1] > 0


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_dataset", "dataset not found"),
        ("empty_dataset", "dataset is empty"),
        ("no_text_field", "no record with a non-empty string field 'text'"),
        ("unreadable_model", "model path is not a directory"),
        ("unknown_target_module", "unknown LoRA target module(s) qkv_fused"),
        ("bad_flag", "bad command line"),
        ("output_not_writable", "cannot create output directory"),
        ("torchrun_missing_dataset", "dataset not found"),
        ("torchrun_empty_dataset", "dataset is empty"),
    ],
)
def test_bad_configuration_exits_78(case, needle, tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2)
    args: list[str] = []
    if case == "missing_dataset":
        env[c.ENV_DATASET] = str(tmp_path / "nope.jsonl")
    elif case == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        env[c.ENV_DATASET] = str(tmp_path / "empty.jsonl")
    elif case == "no_text_field":
        (tmp_path / "other.jsonl").write_text('{"body": "hello"}\n')
        env[c.ENV_DATASET] = str(tmp_path / "other.jsonl")
    elif case == "unreadable_model":
        env[c.ENV_MODEL] = str(tmp_path / "no-such-model")
    elif case == "unknown_target_module":
        env[c.ENV_LORA_TARGET_MODULES] = "q_proj,qkv_fused"
    elif case == "bad_flag":
        args = ["--max-stepz", "3"]
    elif case == "output_not_writable":
        (tmp_path / "a-file").write_text("")
        env[c.ENV_OUTPUT_DIR] = str(tmp_path / "a-file" / "out")
    elif case == "torchrun_missing_dataset":  # caught by the launcher before spawning
        env[c.ENV_NPROC_PER_NODE] = "2"
        env[c.ENV_DATASET] = str(tmp_path / "nope.jsonl")
    elif case == "torchrun_empty_dataset":  # caught by the workers; 78 passed through
        env[c.ENV_NPROC_PER_NODE] = "2"
        (tmp_path / "empty.jsonl").write_text("")
        env[c.ENV_DATASET] = str(tmp_path / "empty.jsonl")
    run = TrainerRun(tmp_path, env, args)
    rc = run.wait(120)
    assert rc == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error"
    assert needle in msg["message"], msg
    assert msg["message"].strip() and "\n" not in msg["message"]
    assert "Traceback" not in run.output()


def test_prompt_completion_dataset(tmp_path, tiny_model, pc_data):
    # 100 records / batch 4 = 25 steps per epoch; 0.1 epoch = 3 steps
    env = make_env(
        tmp_path, tiny_model, pc_data, epochs=0.1, save_steps=100, prompt_field="prompt", completion_field="completion"
    )
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    assert sorted(run.losses()) == [1, 2, 3]
    assert run.termination()["maxSteps"] == 3

    # loss only on the completion: the prompt's labels are masked
    from transformers import AutoTokenizer

    from finetune_trainer.data import IGNORE_INDEX
    from finetune_trainer.features import pair_features

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    (ids,), (labels,) = pair_features(tok, ["the model learns"], ["from data"], seq_len=64)
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert n_prompt > 0 and labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_torchrun_two_processes_trains_and_checkpoints_once(trainer_env):
    env = trainer_env(max_steps=4, save_steps=4, nproc_per_node=2)
    run = TrainerRun(Path(env[c.ENV_OUTPUT_DIR]).parent, env)
    assert run.wait(240) == 0, run.output()[-4000:]
    out = run.output()
    assert "launching torchrun" in out and "world_size=2" in out
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["checkpoint-4", c.WORK_SUBDIR]
    ckpt = run.ckpt_dir / "checkpoint-4"
    assert _complete(ckpt)
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert out.count("checkpoint saved:") == 1  # rank 0 only
    assert out.count("tokenized 400 of 400 records") == 1  # rank 0 tokenized, rank 1 read its cache
    assert sorted(run.losses()) == [1, 2, 3, 4] and len(run.losses()) == out.count(" loss=")
    assert (run.out_dir / "adapter_model.safetensors").is_file()
    msg = run.termination()
    assert (msg["outcome"], msg["step"], msg["checkpointStep"]) == ("completed", 4, 4)


def test_torchrun_sigterm_exits_143_with_checkpoint(trainer_env):
    env = trainer_env(max_steps=500, save_steps=1000, nproc_per_node=2)
    run = TrainerRun(Path(env[c.ENV_OUTPUT_DIR]).parent, {**env, c.ENV_DEBUG_STEP_DELAY: "0.05"})
    wait_until(lambda: run.last_step() >= 2, 180, "step 2", proc=run)
    run.signal(signal.SIGTERM)  # to the launcher (PID 1 in a pod), like the kubelet
    rc = run.wait(90)
    assert rc == 143, run.output()[-4000:]  # not torchrun's 1 (docs/TRAINER.md pitfall 9)
    msg = run.termination()
    step = msg["step"]
    assert msg["outcome"] == "preempted" and msg["checkpointStep"] == step >= 2
    ckpt = Path(msg["checkpoint"])
    assert _complete(ckpt) and (ckpt / "rng_state_1.pth").is_file()
    assert "Traceback" not in run.output()
    assert os.path.basename(ckpt) == f"checkpoint-{step}"


def test_torchrun_workers_die_with_their_launcher(trainer_env):
    """SIGKILL to the launcher alone (a container's PID 1 killed, a test giving up): no worker
    lives on as an orphan holding CPU and memory."""
    import psutil

    env = trainer_env(max_steps=500, save_steps=1000, nproc_per_node=2)
    run = TrainerRun(Path(env[c.ENV_OUTPUT_DIR]).parent, {**env, c.ENV_DEBUG_STEP_DELAY: "0.05"})
    wait_until(lambda: run.last_step() >= 1, 180, "step 1", proc=run)
    workers = [p for p in run.workers() if "finetune_trainer" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in run.workers()]
    os.kill(run.popen.pid, signal.SIGKILL)
    run.popen.wait(10)

    def alive():
        out = []
        for p in workers:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    try:
        wait_until(lambda: not alive(), 20, "the workers to exit after their launcher died")
    finally:
        for p in alive():  # never leave an orphan behind, even when the test fails
            p.kill()
