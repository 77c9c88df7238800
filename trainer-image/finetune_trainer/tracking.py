"""Experiment tracking through HF's ``report_to`` integrations (imports transformers).

``report_to`` comes from spec.trainingArguments. Where the files go is the trainer's: TensorBoard
event files under ``<checkpoint dir>/trainer/tensorboard`` (one directory across attempts, so a
resumed run continues the same curves), W&B's local files under the work directory. An unknown
integration, or one whose library the image lacks, is a configuration error (docs/TRAINER.md
"Tracking"); credentials (MLFLOW_TRACKING_URI, WANDB_API_KEY, ...) come from the pod's env.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.integrations import integration_utils

import finetune_contract as c

TENSORBOARD_SUBDIR = "tensorboard"
# The library each integration needs, where its name differs from the integration's.
_AVAILABILITY = {
    "comet_ml": "is_comet_available",
    "azure_ml": "is_azureml_available",
    "flyte": "is_flytekit_available",
}


def tensorboard_dir(cfg: c.TrainerConfig) -> str:
    return os.path.join(cfg.work_dir, TENSORBOARD_SUBDIR)


def configure(args: Any, cfg: c.TrainerConfig) -> list[str]:
    """Check ``args.report_to`` and point the integrations' files at the job's directory;
    returns the integrations. Call before the Trainer (its callbacks read the environment)."""
    report_to = list(args.report_to or [])
    for name in report_to:
        if name not in integration_utils.INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(integration_utils.INTEGRATION_TO_CALLBACK))
            raise c.ConfigError(f"trainingArguments.report_to: unknown integration {name!r} (known: {known})")
        available = getattr(integration_utils, _AVAILABILITY.get(name, f"is_{name}_available"), None)
        if available is not None and not available():
            raise c.ConfigError(
                f"trainingArguments.report_to: {name} is not installed in the trainer image "
                f"(add its library to an image built on this one)"
            )
    # HF's TensorBoard callback writes here when the variable is set, else under output_dir/runs/<time>.
    os.environ["TENSORBOARD_LOGGING_DIR"] = tensorboard_dir(cfg)
    os.environ.setdefault("WANDB_DIR", cfg.work_dir)  # W&B's local files; the default is the working directory
    return report_to
