"""report_to through spec.trainingArguments: TensorBoard event files under the job's directory,
integrations the image lacks refused with exit 78 (docs/TRAINER.md "Tracking")."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from trainerkit import TrainerRun, make_env

import finetune_contract as c

pytestmark = pytest.mark.trainer


def _scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from the TFRecord event files in ``directory`` (length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_events_are_written_under_the_job_directory(tmp_path, tiny_model, text_data):
    env = make_env(tmp_path, tiny_model, text_data, max_steps=3, save_steps=100)
    env[c.ENV_TRAINING_ARGUMENTS] = json.dumps({"report_to": "tensorboard"})
    run = TrainerRun(tmp_path, env)
    assert run.wait(180) == 0, run.output()[-4000:]
    logs = run.ckpt_dir / c.WORK_SUBDIR / "tensorboard"
    assert f"reporting to tensorboard (TensorBoard logs: {logs})" in run.output()
    scalars = _scalars(logs)
    losses = run.losses()
    assert sorted(scalars["train/loss"]) == [1, 2, 3]
    for step, value in scalars["train/loss"].items():
        assert value == pytest.approx(float(losses[step]), abs=1e-5)
    assert not list(run.out_dir.glob("**/runs"))  # not HF's default <output_dir>/runs/<time>


@pytest.mark.parametrize(
    "report_to, needle",
    [
        ("mlflow", "trainingArguments.report_to: mlflow is not installed"),
        (["tensorboard", "wandb"], "trainingArguments.report_to: wandb is not installed"),
        ("nosuchtracker", "trainingArguments.report_to: unknown integration 'nosuchtracker'"),
    ],
)
def test_unavailable_tracking_exits_78(report_to, needle, tmp_path, tiny_model, text_data):
    # The project installs neither tracker (pyproject.toml, constraints.txt): their absence is
    # what this test exercises, so an environment that has one must fail here, not pass quietly.
    for name in ("mlflow", "wandb"):
        if name in needle:
            assert importlib.util.find_spec(name) is None, f"{name} is installed: this test needs it absent"
    env = make_env(tmp_path, tiny_model, text_data, max_steps=2)
    env[c.ENV_TRAINING_ARGUMENTS] = json.dumps({"report_to": report_to})
    run = TrainerRun(tmp_path, env)
    assert run.wait(120) == 78, run.output()[-4000:]
    msg = run.termination()
    assert msg["outcome"] == "config_error" and needle in msg["message"], msg
    assert "Traceback" not in run.output()
