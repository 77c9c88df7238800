"""bench/gpu_trainer_check.py on a machine without a GPU: its options, its refusal to measure without
one, and its --dry-run, which builds our and TRL's configurations with the tiny model and compares them
(docs/TRAINER.md "GPU check")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_trainer_check.py"


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_options_with_defaults():
    out = _run("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    for needle in ("--model", "Qwen/Qwen2.5-0.5B", "--variants", "--tolerance", "[default: 0.03]", "--dry-run",
                   "--stop-at-step"):  # fmt: skip
        assert needle in out.stdout, needle


def test_without_a_gpu_it_refuses_to_measure(tiny_model):
    import torch

    assert not torch.cuda.is_available()
    out = _run("--model", str(tiny_model), timeout=120)
    assert out.returncode == 2 and "no CUDA device visible: this check needs a GPU" in out.stderr, out.stderr
    bad = _run("--variants", "lora,zero3", "--dry-run", timeout=60)
    assert bad.returncode == 2 and "unknown variant(s) zero3" in bad.stderr


def test_dry_run_builds_both_configurations_with_the_same_settings(tiny_model):
    out = _run("--dry-run", "--model", str(tiny_model), "--steps", "4", "--warmup", "1", "--batch-size", "2",
               "--seq-len", "32")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("DRYRUN ")]
    report = json.loads(line[len("DRYRUN ") :])
    assert set(report) == {"lora", "qlora", "lora-gc"}
    assert all(r["differences"] == [] for r in report.values()), report
    assert report["qlora"]["quantized"] and not report["lora"]["quantized"]
    assert report["lora-gc"]["ours"]["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert report["lora"]["ours"]["per_device_train_batch_size"] == 2 and report["lora"]["ours"]["max_steps"] == 4
    # TRL's trainer was built on the same data with the same LoRA (q_proj, v_proj of the tiny model: 3584)
    assert report["lora"]["trl_trainable_parameters"] == report["lora-gc"]["trl_trainable_parameters"] == 3584
    assert report["lora"]["trl_examples"] == (4 + 2) * 2


def test_the_comparison_notices_a_difference(tmp_path, tiny_model):
    sys.path.insert(0, str(SCRIPT.parent.parent))
    from bench import gpu_trainer_check as g

    a = g.parse_args(["--model", str(tiny_model), "--steps", "4", "--warmup", "1", "--dataset", "unused.jsonl"])
    ours, trl = g.our_setup(a, "lora", str(tmp_path)), g.trl_setup(a, "lora", str(tmp_path))
    assert g.compare_setups(ours, trl) == []
    trl["args"].learning_rate = 1e-3
    ours_gc = g.our_setup(a, "lora-gc", str(tmp_path))
    diffs = g.compare_setups(ours_gc, trl)
    assert "learning_rate: ours 0.0002 vs TRL 0.001" in diffs
    assert any(d.startswith("gradient_checkpointing:") for d in diffs)
