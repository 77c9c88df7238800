"""A TrainingJob that the local node agent runs for real: the trainer on a tiny random
model built on disk (no hub, no GPU). Shared by the end-to-end tests and the demo."""
from __future__ import annotations

import os
from pathlib import Path

LOCAL_TAINT_KEY = "finetune.dev/local-node"
LOCAL_NODE_ARGS = ["--taint", f"{LOCAL_TAINT_KEY}=true:NoSchedule"]


def prepare_assets(directory: Path) -> tuple[Path, Path]:
    """Tiny model + tokenizer and a JSONL dataset under `directory` (built once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune_trainer.testing import build_tiny_model, text_dataset
    model, data = directory / "tiny-model", directory / "train.jsonl"
    if not (model / "config.json").exists():
        build_tiny_model(str(model))
    if not data.exists():
        text_dataset(str(data), n=400)
    return model, data


def real_job(name: str, model: Path, dataset: Path, claim: str, *, max_steps: int = 40,
             every_steps: int = 5, step_delay: float = 0.25, node: str = "local-0",
             run_policy: dict | None = None, env: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "local/finetune-trainer:dev",  # the local node runs the venv's trainer
            "model": str(model),
            "dataset": {"path": str(dataset)},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {"maxSteps": max_steps, "batchSize": 4, "sequenceLength": 64,
                                "learningRate": 0.001, "seed": 7},
            "resources": {"gpus": 1},
            "checkpoint": {"claimName": claim, "everySteps": every_steps, "keep": 3},
            "runPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 2,
                          "terminationGracePeriodSeconds": 20, **(run_policy or {})},
            "template": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "tolerations": [{"key": LOCAL_TAINT_KEY, "operator": "Exists",
                                 "effect": "NoSchedule"}],
                # Slows the tiny model down so that a run can be watched and interrupted.
                "env": [{"name": "FT_DEBUG_STEP_DELAY", "value": str(step_delay)},
                        {"name": "OMP_NUM_THREADS", "value": "1"},
                        *({"name": k, "value": v} for k, v in (env or {}).items())],
            },
        },
    }
