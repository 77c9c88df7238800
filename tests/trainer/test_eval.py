"""An eval split (a held-out fraction or a dataset of its own): its loss is logged, served as a
metric, and read by the operator into status.progress.evalLoss (docs/TRAINER.md "Evaluation")."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime

import pytest
from trainerkit import TrainerRun, make_env, scrape, wait_until

import finetune_contract as c
from finetune_operator.core.progress import fold_progress
from finetune_operator.core.trainer_metrics import parse_trainer_metrics
from finetune_testbed.trainer_fixtures import text_dataset

pytestmark = pytest.mark.trainer

EVAL_LINE = re.compile(r"eval step (\d+)/\d+ eval_loss=(\S+)")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _evals(run: TrainerRun) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in EVAL_LINE.finditer(run.output())}


def test_held_out_fraction_is_evaluated_and_reaches_status_progress(tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=6, save_steps=100, eval_fraction=0.1, eval_steps=2)
    run = TrainerRun(tmp_path, {**env, c.ENV_DEBUG_STEP_DELAY: "0.2"})
    port = wait_until(run.metrics_port, 60, "metrics-port file", proc=run)
    assert math.isnan(scrape(port)[c.METRIC_EVAL_LOSS])  # no evaluation yet: NaN, not 0

    def evaluated():
        m = scrape(port)
        return m if math.isfinite(m[c.METRIC_EVAL_LOSS]) else None

    metrics = wait_until(evaluated, 120, "an eval loss on /metrics", proc=run, interval=0.05)
    assert run.wait(180) == 0, run.output()[-4000:]
    assert "eval split: 40 examples (training on 360), every 2 steps" in run.output()
    evals = _evals(run)
    assert sorted(evals) == [2, 4, 6]
    assert any(metrics[c.METRIC_EVAL_LOSS] == pytest.approx(v, abs=1e-5) for v in evals.values())
    history = json.loads((run.ckpt_dir / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4, 6]

    # the operator's side: the scraped samples into status.progress
    text = "\n".join(f"{name} {value}" for name, value in metrics.items())
    sample = parse_trainer_metrics(text)
    assert sample is not None and sample.eval_loss == metrics[c.METRIC_EVAL_LOSS]
    progress = fold_progress(None, sample, NOW)
    assert progress.eval_loss == round(metrics[c.METRIC_EVAL_LOSS], 4)
    before = parse_trainer_metrics(f"{c.METRIC_STEP} 3\n{c.METRIC_EVAL_LOSS} NaN")
    assert before is not None and fold_progress(progress, before, NOW).eval_loss == progress.eval_loss  # kept


def test_eval_dataset_of_its_own_is_evaluated_at_the_end(tmp_path, tiny_model, text_data):
    eval_data = text_dataset(str(tmp_path / "eval.jsonl"), n=12, seed=9)
    env = make_env(tmp_path, tiny_model, text_data, max_steps=3, save_steps=100, eval_dataset=eval_data)
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    assert "eval split: 12 examples (training on 400), every 100 steps" in run.output()
    assert sorted(_evals(run)) == [3]  # not an eval step: evaluated once, at the end
    cache = run.ckpt_dir / c.WORK_SUBDIR / "datasets"
    assert len(list(cache.glob("tokenized-*.arrow.done"))) == 2  # train and eval, each cached


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"eval_fraction": "0.1", "eval_dataset": "/x.jsonl"}, "set FT_EVAL_DATASET or FT_EVAL_FRACTION, not both"),
        ({"eval_fraction": "0.9"}, "FT_EVAL_FRACTION must be in (0, 0.5]"),
        ({"eval_dataset": "{tmp}/missing.jsonl"}, "dataset not found"),
    ],
)
def test_bad_eval_settings_exit_78(settings, needle, tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2)
    env.update({f"FT_{k.upper()}": v.format(tmp=tmp_path) for k, v in settings.items()})
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and needle in msg["message"], msg


def test_evaluation_in_the_spec_reaches_the_trainer():
    from pydantic import ValidationError

    from finetune_operator.api import TrainingJobSpec
    from finetune_operator.trainer_env import trainer_env

    base = {"image": "i", "model": "/m", "dataset": {"path": "/d"}, "hyperparameters": {"maxSteps": 1}}
    spec = TrainingJobSpec.model_validate({**base, "evaluation": {"fraction": 0.05, "everySteps": 50}})
    cfg = c.TrainerConfig.from_env(trainer_env(spec))
    assert (cfg.eval_fraction, cfg.eval_dataset, cfg.eval_steps) == (0.05, None, 50)
    spec = TrainingJobSpec.model_validate({**base, "evaluation": {"path": "/data/eval.jsonl"}})
    assert c.TrainerConfig.from_env(trainer_env(spec)).eval_dataset == "/data/eval.jsonl"
    for bad in ({}, {"fraction": 0.1, "path": "/e"}):
        with pytest.raises(ValidationError, match="exactly one of evaluation.fraction or evaluation.path"):
            TrainingJobSpec.model_validate({**base, "evaluation": bad})
