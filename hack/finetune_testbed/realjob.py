"""A TrainingJob that the real node runs for real: the trainer image on a tiny random model
built on disk (no hub, no GPU). Shared by the end-to-end tests and the demo.

The model and dataset reach the container through a claim (`assets`, a hostPath PV made by
RealNode.create_pvc over the directory prepare_assets filled), mounted read-only at /assets."""
from __future__ import annotations

import os
from pathlib import Path

from .pki import REAL_NODE_NAME
from .realnode import TAINT_KEY, TRAINER_IMAGE

ASSETS_CLAIM = "assets"
ASSETS_MOUNT = "/assets"
MODEL_DIR, DATASET_FILE = "tiny-model", "train.jsonl"


def prepare_assets(directory: Path) -> Path:
    """Tiny model + tokenizer and a JSONL dataset under `directory` (built once), readable
    by the trainer image's non-root user. Returns the directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune_testbed.trainer_fixtures import build_tiny_model, text_dataset
    model, data = directory / MODEL_DIR, directory / DATASET_FILE
    if not (model / "config.json").exists():
        build_tiny_model(str(model))
    if not data.exists():
        text_dataset(str(data), n=400)
    for path in (directory, *directory.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


def real_job(name: str, claim: str, *, max_steps: int = 40, every_steps: int = 5,
             step_delay: float = 0.25, node: str = REAL_NODE_NAME,
             run_policy: dict | None = None, env: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": TRAINER_IMAGE,  # built here and imported into the node's containerd
            "model": f"{ASSETS_MOUNT}/{MODEL_DIR}",
            "dataset": {"path": f"{ASSETS_MOUNT}/{DATASET_FILE}"},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {"maxSteps": max_steps, "batchSize": 4, "sequenceLength": 64,
                                "learningRate": 0.001, "seed": 7},
            "resources": {"gpus": 1},
            "checkpoint": {"claimName": claim, "everySteps": every_steps, "keep": 3},
            "runPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 2,
                          "terminationGracePeriodSeconds": 20, **(run_policy or {})},
            "template": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "tolerations": [{"key": TAINT_KEY, "operator": "Exists",
                                 "effect": "NoSchedule"}],
                "volumes": [{"name": "assets", "persistentVolumeClaim": {
                    "claimName": ASSETS_CLAIM, "readOnly": True}}],
                "volumeMounts": [{"name": "assets", "mountPath": ASSETS_MOUNT, "readOnly": True}],
                # Slows the tiny model down so that a run can be watched and interrupted.
                "env": [{"name": "FT_DEBUG_STEP_DELAY", "value": str(step_delay)},
                        {"name": "OMP_NUM_THREADS", "value": "1"},
                        *({"name": k, "value": v} for k, v in (env or {}).items())],
            },
        },
    }
