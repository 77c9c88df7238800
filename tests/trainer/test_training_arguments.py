"""spec.trainingArguments: passed through to HF TrainingArguments, owned and unknown keys refused
by name (docs/TRAINER.md "Training arguments"). The runs are the real trainer on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
from trainerkit import TrainerRun, make_env

import finetune_contract as c

pytestmark = pytest.mark.trainer

LR_LINE = re.compile(r"step (\d+)/\d+ loss=\S+ lr=(\S+)")


def _lrs(run: TrainerRun) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LR_LINE.finditer(run.output())}


def test_passthrough_argument_changes_the_run(tmp_path, tiny_model, text_data):
    """The default schedule decays linearly; lr_scheduler_type=constant keeps the learning rate."""
    runs = {}
    for name, arguments in (("default", None), ("constant", {"lr_scheduler_type": "constant"})):
        env = make_env(tmp_path / name, tiny_model, text_data, max_steps=3, save_steps=100, learning_rate=0.001)
        if arguments:
            env[c.ENV_TRAINING_ARGUMENTS] = json.dumps(arguments)
        runs[name] = TrainerRun(tmp_path, env, name=name)
    for run in runs.values():
        assert run.wait(180) == 0, run.output()[-4000:]
    default, constant = _lrs(runs["default"]), _lrs(runs["constant"])
    assert sorted(default) == sorted(constant) == [1, 2, 3]
    assert default[1] > default[2] > default[3]
    assert set(constant.values()) == {0.001}


@pytest.mark.parametrize(
    "arguments, needle",
    [
        ({"save_steps": 3}, "trainingArguments.save_steps is set by spec.checkpoint.everySteps"),
        ({"warmup_steps": 1, "learning_rat": 0.1}, "trainingArguments.learning_rat is not a TrainingArguments field"),
        ({"lr_scheduler_type": "sideways"}, "trainingArguments (lr_scheduler_type) rejected"),
    ],
)
def test_refused_argument_exits_78_naming_the_key(arguments, needle, tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2)
    env[c.ENV_TRAINING_ARGUMENTS] = json.dumps(arguments)
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and needle in msg["message"], msg
    assert "Traceback" not in run.output()
