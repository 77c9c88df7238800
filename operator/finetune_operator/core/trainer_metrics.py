"""Read the trainer's Prometheus text exposition into a ProgressSample (docs/CONTRACTS.md names)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import finetune_contract as contract

from .observation import ProgressSample

_METRICS = {  # the trainer contract's names (one definition, torch-free module)
    contract.METRIC_STEP: "step",
    contract.METRIC_TOTAL_STEPS: "total_steps",
    contract.METRIC_EPOCH: "epoch",
    contract.METRIC_LOSS: "loss",
    contract.METRIC_TOKENS_PER_SECOND: "tokens_per_second",
    contract.METRIC_HEARTBEAT: "heartbeat",
    contract.METRIC_LAST_CHECKPOINT_STEP: "last_checkpoint_step",
    contract.METRIC_EVAL_LOSS: "eval_loss",
}


def parse_trainer_metrics(text: str) -> ProgressSample | None:
    """None when the text holds none of the trainer's metrics (wrong target, not started)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_part, _, rest = line.partition(" ")
        name = name_part.split("{", 1)[0]
        if name not in _METRICS or "}" in rest:
            continue
        try:
            values[_METRICS[name]] = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    if not values:
        return None

    def integer(key: str) -> int | None:
        value = values.get(key)
        return int(value) if value is not None and math.isfinite(value) and value >= 0 else None

    heartbeat = values.get("heartbeat")
    return ProgressSample(
        step=integer("step"),
        total_steps=integer("total_steps") or None,
        epoch=values.get("epoch"),
        loss=values.get("loss"),
        tokens_per_second=values.get("tokens_per_second"),
        eval_loss=values.get("eval_loss"),
        last_checkpoint_step=integer("last_checkpoint_step") or None,
        loading=heartbeat == 0,
        heartbeat_time=(
            datetime.fromtimestamp(heartbeat, tz=UTC)
            if heartbeat is not None and math.isfinite(heartbeat) and heartbeat > 0
            else None
        ),
    )
