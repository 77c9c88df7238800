"""worker.run's exit codes and termination messages, with a fake training module (torch-free, no marker)."""

from __future__ import annotations

import signal
import sys
import types

import pytest

import finetune_contract as c
import finetune_trainer
from finetune_trainer import worker


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = c.TrainerConfig(
        model=str(model), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=5,
        metrics_port=0, metrics_addr="127.0.0.1", termination_log=str(tmp_path / "tl"),
    )  # fmt: skip

    def install(train):
        fake = types.ModuleType("finetune_trainer.training")
        fake.train = train
        monkeypatch.setitem(sys.modules, "finetune_trainer.training", fake)
        monkeypatch.setattr(finetune_trainer, "training", fake, raising=False)

    def message():
        return c.parse_termination_message((tmp_path / "tl").read_text())

    return cfg, install, message


def test_unexpected_error_exits_1_with_message(setup, capsys):
    cfg, install, message = setup
    served = []

    def train(cfg, model_path, examples, stopper, report, metrics):
        served.append(metrics)
        report.step, report.loss = 3, 1.5
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    install(train)
    assert worker.run(cfg) == 1
    assert served[0].server is None  # the metrics server is closed on the error path too
    msg = message()
    assert msg["outcome"] == "error" and msg["step"] == 3 and msg["loss"] == 1.5
    assert msg["message"] == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert "Traceback" in capsys.readouterr().err


def test_config_error_from_training_exits_78(setup):
    cfg, install, message = setup

    def train(*a):
        raise c.ConfigError("unknown LoRA target module(s) foo")

    install(train)
    assert worker.run(cfg) == 78
    assert message()["outcome"] == "config_error"


def test_outcomes_map_to_exit_codes_and_model_path_is_absolute(setup, monkeypatch, tmp_path):
    cfg, install, message = setup
    seen = {}

    def train(cfg, model_path, examples, stopper, report, metrics):
        seen["model_path"], seen["examples"] = model_path, examples
        assert metrics is not None and metrics.port
        report.step = 5
        return c.OUTCOME_COMPLETED, "completed 5/5 steps"

    install(train)
    monkeypatch.chdir(tmp_path)
    assert worker.run(cfg.replace(model="model")) == 0  # relative path resolved (docs/TRAINER.md pitfall 4)
    assert seen["model_path"] == str(tmp_path / "model")
    prepared = seen["examples"]  # rank 0 read the dataset with HF datasets before training
    assert (prepared.format, prepared.columns, prepared.records["text"]) == ("text", ("text",), ["hello world"])
    assert message()["outcome"] == "completed"

    def preempt(cfg, model_path, examples, stopper, report, metrics):
        stopper.request(signal.SIGTERM)
        return c.OUTCOME_PREEMPTED, "stopped"

    install(preempt)
    assert worker.run(cfg) == 143


def test_sigterm_before_training_raises_out_of_loading(setup):
    cfg, install, message = setup

    def train(cfg, model_path, examples, stopper, report, metrics):
        signal.raise_signal(signal.SIGTERM)  # handler raises PreemptedBeforeTraining
        raise AssertionError("not reached")

    install(train)
    before = signal.getsignal(signal.SIGTERM)
    assert worker.run(cfg) == 143
    msg = message()
    assert msg["outcome"] == "preempted" and "before training started" in msg["message"]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored (docs/TRAINER.md pitfall 8)


def test_bad_values_exit_78_before_anything_else(setup):
    cfg, _install, message = setup
    assert worker.run(cfg.replace(batch_size=0, lora_dropout=2.0)) == 78
    m = message()["message"]
    assert "FT_BATCH_SIZE must be >= 1" in m and "FT_LORA_DROPOUT" in m


_HANGS_AFTER_STOP = r"""
import signal, sys, threading, types
import finetune_trainer
import finetune_contract as c
from finetune_trainer import worker

def train(cfg, model_path, examples, stopper, report, metrics):
    report.step = 7
    stopper.training_started = True
    signal.raise_signal(signal.SIGTERM)  # a stop during training: only a flag
    threading.Event().wait()  # then a collective whose peer is gone never returns

fake = types.ModuleType("finetune_trainer.training")
fake.train = train
sys.modules["finetune_trainer.training"] = fake
finetune_trainer.training = fake
sys.exit(worker.run(c.TrainerConfig.from_env()))
"""


def test_stop_deadline_ends_a_hung_shutdown_with_143_and_the_checkpoint(tmp_path):
    """SIGTERM, then something blocks forever: the process still exits 143 on its own within
    FT_STOP_TIMEOUT_SECONDS, says where it hung and reports the latest complete checkpoint."""
    import os
    import subprocess
    import time

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-6"
    ckpt.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt"):
        (ckpt / name).write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_") and k not in ("RANK", "LOCAL_RANK")}
    env.update({
        c.ENV_MODEL: str(model), c.ENV_DATASET: str(data), c.ENV_OUTPUT_DIR: str(tmp_path / "out"),
        c.ENV_TERMINATION_LOG: str(tmp_path / "tl"), c.ENV_METRICS_PORT: "0",
        c.ENV_METRICS_ADDR: "127.0.0.1", c.ENV_STOP_TIMEOUT: "2",
    })  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _HANGS_AFTER_STOP], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 143, proc.stdout + proc.stderr
    assert took < 30, took
    assert "still running 2s after the stop request" in proc.stdout + proc.stderr
    assert "threading.py" in proc.stderr  # the stacks say where it hung
    msg = c.parse_termination_message((tmp_path / "tl").read_text())
    assert msg["outcome"] == "preempted" and "did not finish within 2s" in msg["message"]
    assert msg["checkpoint"] == str(ckpt) and msg["checkpointStep"] == 6 and msg["step"] == 7


def test_stop_deadline_is_cancelled_when_the_run_returns(setup):
    """In-process callers live on after run(): an armed deadline must not end them later."""
    cfg, install, message = setup
    armed = []

    def preempt(cfg, model_path, examples, stopper, report, metrics):
        stopper.request(signal.SIGTERM)
        armed.append(stopper.deadline._thread)
        return c.OUTCOME_PREEMPTED, "stopped"

    install(preempt)
    assert worker.run(cfg.replace(stop_timeout=60)) == 143
    (thread,) = armed
    thread.join(timeout=5)  # cancelled: it returns at once instead of ending the process at 60 s
    assert not thread.is_alive()
    assert message()["outcome"] == "preempted"
