"""GPU check (docs/TRAINER.md "GPU check"): our trainer against plain TRL ``SFTTrainer`` with the same
settings, for LoRA, QLoRA and LoRA with gradient checkpointing: tokens/s and peak GPU memory, then
SIGTERM -> checkpoint -> exit of our trainer. Prints a table; exits 1 when ours is more than
``--tolerance`` (3 %) below TRL's throughput in any variant, or a stop did not end in a checkpoint.

The model: ``Qwen/Qwen2.5-0.5B`` by default (0.49B parameters, a Llama-like decoder; any ~0.5-1B causal LM
works), a local directory (read offline) or a hub id (downloaded: needs the hub, HF_HUB_OFFLINE unset).

    python bench/gpu_trainer_check.py [--model /models/qwen2.5-0.5b] [--variants lora,qlora,lora-gc] \
        [--steps 40] [--warmup 5] [--batch-size 8] [--seq-len 1024] [--dataset train.jsonl]
    python bench/gpu_trainer_check.py --dry-run --model <tiny model dir>   # CPU: builds both configurations

Both sides: the same texts (synthetic, longer than --seq-len, so every example is exactly --seq-len
tokens), batch size, learning rate, seed, LoRA (r, alpha, dropout, q_proj/v_proj), precision (bf16 where
supported), quantization (4-bit NF4, double quantization) and gradient checkpointing (non-reentrant), no
packing, logging every step, no checkpoint in the timed window. Each run is a subprocess of its own (clean
GPU memory, its own peak); the timed window starts after ``--warmup`` steps, with a CUDA sync at each step
end. Without a CUDA GPU it exits 2 at once, except ``--dry-run`` (and ``--allow-cpu``, which runs the
LoRA variants on CPU to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, TypedDict

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B"
VARIANTS: dict[str, dict[str, Any]] = {  # our TrainerConfig's method and gradient checkpointing
    "lora": {"method": "lora", "gradient_checkpointing": False},
    "qlora": {"method": "qlora", "gradient_checkpointing": False},
    "lora-gc": {"method": "lora", "gradient_checkpointing": True},
}


class LoraSettings(TypedDict):
    """The peft.LoraConfig keyword arguments both sides use."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]


LORA: LoraSettings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
LR, SEED = 2e-4, 42
# Training arguments that must be equal on both sides (the dry run compares them).
COMPARED_ARGUMENTS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps", "seed", "data_seed",
    "bf16", "fp16", "gradient_checkpointing", "gradient_checkpointing_kwargs", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "max_grad_norm", "optim", "logging_steps", "include_num_input_tokens_seen", "use_cpu",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="tokens/s and peak memory: our trainer vs plain TRL SFTTrainer (LoRA, QLoRA, gradient "
        "checkpointing), and SIGTERM -> checkpoint -> exit timing; needs a CUDA GPU unless --dry-run"
    )
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"local directory or hub id [default: {DEFAULT_MODEL}]")
    ap.add_argument("--dataset", help="JSONL with a 'text' field [default: synthetic texts longer than --seq-len]")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run [default: 40]")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the timed window [default: 5]")
    ap.add_argument("--batch-size", type=int, default=8, help="per-device batch size [default: 8]")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per example [default: 1024]")
    ap.add_argument("--tolerance", type=float, default=0.03, help="ours may be this much slower [default: 0.03]")
    ap.add_argument("--stop-at-step", type=int, default=10, help="SIGTERM after this step [default: 10]")
    ap.add_argument("--dry-run", action="store_true", help="build both configurations (CPU is fine), train nothing")
    ap.add_argument("--allow-cpu", action="store_true", help="run the LoRA variants on CPU (checks the script only)")
    ap.add_argument("--mode", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variant_list if v not in VARIANTS]
    if unknown or not a.variant_list:
        ap.error(f"unknown variant(s) {','.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if not 1 <= a.warmup < a.steps:
        ap.error("need 1 <= --warmup < --steps")
    return a


def _local(model: str) -> bool:
    return os.path.isdir(os.path.expanduser(model))


def _quiet_env(model: str) -> None:
    """Before transformers is imported: quiet, and offline for a local model (a hub id needs the hub)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if _local(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- the two configurations ------------------------------------------------------------------


def our_config(a: argparse.Namespace, variant: str, workdir: str) -> Any:
    import finetune_contract as c

    return c.TrainerConfig(
        model=a.model, dataset=a.dataset, output_dir=os.path.join(workdir, f"ours-{variant}"),
        max_steps=a.steps, save_steps=100 * a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
        learning_rate=LR, seed=SEED, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"], lora_target_modules=tuple(LORA["target_modules"]),
        metrics_port=0, metrics_addr="127.0.0.1", termination_log="", **VARIANTS[variant],
    )  # fmt: skip


def our_setup(a: argparse.Namespace, variant: str, workdir: str) -> dict[str, Any]:
    """What our trainer hands the HF Trainer and from_pretrained for this variant (no model loaded)."""
    from finetune_trainer import prepare, training

    cfg = our_config(a, variant, workdir)
    dtype, bf16, fp16 = prepare.precision(cfg)
    return {
        "cfg": cfg,
        "dtype": dtype,
        "args": training.training_arguments(cfg, bf16, fp16, a.model),
        "load": prepare.model_load_kwargs(cfg, dtype, 0),
    }


def trl_setup(a: argparse.Namespace, variant: str, workdir: str) -> dict[str, Any]:
    """Plain TRL: SFTConfig, the LoRA config and from_pretrained arguments with the same settings."""
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from finetune_trainer import prepare

    ours = our_config(a, variant, workdir)
    dtype, bf16, fp16 = prepare.precision(ours)
    gc = VARIANTS[variant]["gradient_checkpointing"]
    args = SFTConfig(
        output_dir=os.path.join(workdir, f"trl-{variant}"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        learning_rate=LR, seed=SEED, data_seed=SEED, bf16=bf16, fp16=fp16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", max_length=a.seq_len, packing=False,
        dataset_text_field="text", ddp_find_unused_parameters=False, log_level="warning",
        dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    load: dict[str, Any] = {"dtype": dtype}
    if VARIANTS[variant]["method"] == "qlora":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        load["device_map"] = {"": 0}
    return {"args": args, "dtype": dtype, "lora": LoraConfig(task_type="CAUSAL_LM", **LORA), "load": load}


def compare_setups(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """Differences between the two sides that would make the comparison unfair (empty: none)."""
    diffs = [
        f"{k}: ours {getattr(ours['args'], k)!r} vs TRL {getattr(trl['args'], k)!r}"
        for k in COMPARED_ARGUMENTS
        if getattr(ours["args"], k) != getattr(trl["args"], k)
    ]
    cfg = ours["cfg"]
    mine = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": set(cfg.lora_target_modules)}  # fmt: skip
    theirs = {k: getattr(trl["lora"], k) for k in ("r", "lora_alpha", "lora_dropout")}
    theirs["target_modules"] = set(trl["lora"].target_modules)
    if mine != theirs:
        diffs.append(f"LoRA: ours {mine} vs TRL {theirs}")
    if cfg.seq_len != trl["args"].max_length:
        diffs.append(f"sequence length: ours {cfg.seq_len} vs TRL {trl['args'].max_length}")
    q_ours, q_trl = ours["load"].get("quantization_config"), trl["load"].get("quantization_config")
    if (q_ours is None) != (q_trl is None) or (q_ours is not None and q_ours.to_dict() != q_trl.to_dict()):
        diffs.append("quantization configs differ")
    if ours["load"]["dtype"] != trl["load"]["dtype"] or ours["load"].get("device_map") != trl["load"].get("device_map"):
        diffs.append("from_pretrained dtype or device map differ")
    return diffs


# -- timed runs (children) -------------------------------------------------------------------


def _timer():
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def result(self, warmup: int) -> dict:
            (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
            steps = len(self.marks) - warmup
            return {
                "tokens_per_second": (n1 - n0) / (t1 - t0),
                "step_seconds": (t1 - t0) / steps,
                "timed_steps": steps,
                "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else 0.0,
            }

    return Timer()


def run_ours(a: argparse.Namespace, variant: str, workdir: str) -> dict:
    from finetune_trainer import data as d
    from finetune_trainer import training
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.worker import Report, StopSignal, check_model_path

    cfg = our_config(a, variant, workdir)
    metrics = TrainerMetrics()  # served, as in production
    metrics.serve(0, "127.0.0.1")
    timer = _timer()
    try:
        training.train(
            cfg, check_model_path(a.model), d.prepare(cfg), StopSignal(), Report(cfg, False), metrics, [timer]
        )
    finally:
        metrics.close()
    return timer.result(a.warmup)


def _texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def build_trl_trainer(a: argparse.Namespace, variant: str, workdir: str, callbacks: list[Any]) -> Any:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    setup = trl_setup(a, variant, workdir)
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(a.model, **setup["load"])
    model.config.use_cache = False
    trainer = SFTTrainer(
        model=model,
        args=setup["args"],
        train_dataset=datasets.Dataset.from_dict({"text": _texts(a.dataset)}),
        processing_class=tok,
        peft_config=setup["lora"],
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_trl(a: argparse.Namespace, variant: str, workdir: str) -> dict:
    timer = _timer()
    build_trl_trainer(a, variant, workdir, [timer]).train()
    return timer.result(a.warmup)


def stop_timing(a: argparse.Namespace, workdir: str) -> dict:
    """Our trainer as a subprocess (LoRA): SIGTERM after --stop-at-step, seconds until it exits."""
    import finetune_contract as c

    out = os.path.join(workdir, "stop")
    env = {
        **os.environ,
        c.ENV_MODEL: a.model, c.ENV_DATASET: a.dataset, c.ENV_OUTPUT_DIR: out,
        c.ENV_TERMINATION_LOG: os.path.join(workdir, "stop-termination-log"), c.ENV_METRICS_PORT: "0",
        c.ENV_METRICS_ADDR: "127.0.0.1", c.ENV_MAX_STEPS: str(100 * a.steps), c.ENV_SAVE_STEPS: str(100 * a.steps),
        c.ENV_BATCH_SIZE: str(a.batch_size), c.ENV_SEQ_LEN: str(a.seq_len), c.ENV_NPROC_PER_NODE: "1",
    }  # fmt: skip
    log_path = os.path.join(workdir, "stop.log")
    marker = f"step {a.stop_at_step}/"
    with open(log_path, "wb") as fh:
        p = subprocess.Popen([sys.executable, "-m", "finetune_trainer"], env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800
        while True:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                if marker in log.read():
                    break
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                with open(log_path, encoding="utf-8", errors="replace") as log:
                    raise RuntimeError(f"trainer did not reach {marker!r}:\n{log.read()[-3000:]}")
            time.sleep(0.01)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(600)
        took = time.perf_counter() - t0
    with open(os.path.join(workdir, "stop-termination-log"), encoding="utf-8") as fh:
        msg = json.load(fh)
    return {"seconds": took, "exit_code": rc, "step": msg.get("step"), "checkpoint_step": msg.get("checkpointStep")}


def synthetic_dataset(path: str, n: int, seq_len: int) -> None:
    """Texts longer than seq_len tokens, so every example is exactly seq_len tokens on both sides."""
    from finetune_testbed.trainer_fixtures import WORDS

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(int(seq_len * 1.3)))}) + "\n")


# -- the parent ------------------------------------------------------------------------------


def dry_run(a: argparse.Namespace, workdir: str) -> int:
    """Both configurations of every variant, compared; the TRL trainer built for the LoRA variants."""
    import torch

    report: dict[str, Any] = {}
    for variant in a.variant_list:
        ours, trl = our_setup(a, variant, workdir), trl_setup(a, variant, workdir)
        diffs = compare_setups(ours, trl)
        report[variant] = {
            "differences": diffs,
            "ours": {k: _plain(getattr(ours["args"], k)) for k in COMPARED_ARGUMENTS},
            "quantized": "quantization_config" in ours["load"],
        }
        if VARIANTS[variant]["method"] == "lora" or torch.cuda.is_available():
            trainer = build_trl_trainer(a, variant, workdir, [])
            report[variant]["trl_trainable_parameters"] = sum(
                p.numel() for p in trainer.model.parameters() if p.requires_grad
            )
            report[variant]["trl_examples"] = len(trainer.train_dataset)
        status = "same settings" if not diffs else "DIFFERENT: " + "; ".join(diffs)
        print(f"{variant:8s} {status}", flush=True)
    print("DRYRUN " + json.dumps(report, sort_keys=True))
    return 1 if any(r["differences"] for r in report.values()) else 0


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None), dict, list)) else str(value)


def _child(a: argparse.Namespace, mode: str, variant: str, workdir: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--mode", mode, "--variant", variant, "--workdir", workdir,
        "--model", a.model, "--dataset", a.dataset, "--steps", str(a.steps), "--warmup", str(a.warmup),
        "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{mode} {variant} run failed (rc={out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def print_table(rows: list[dict], tolerance: float) -> None:
    print(f"{'variant':8s} | {'ours tok/s':>10s} | {'TRL tok/s':>10s} | {'ratio':>5s} | {'ours GiB':>8s} | "
          f"{'TRL GiB':>7s} | within {tolerance:.0%}")  # fmt: skip
    for r in rows:
        o, t = r["ours"], r["trl"]
        print(f"{r['variant']:8s} | {o['tokens_per_second']:10.0f} | {t['tokens_per_second']:10.0f} | "
              f"{r['ratio']:5.3f} | {o['peak_gpu_gib']:8.2f} | {t['peak_gpu_gib']:7.2f} | "
              f"{'yes' if r['ok'] else 'NO'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    _quiet_env(a.model)

    if a.mode:  # child
        result = (run_ours if a.mode == "ours" else run_trl)(a, a.variant, a.workdir)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not (a.dry_run or a.allow_cpu):
        print("gpu_trainer_check: no CUDA device visible: this check needs a GPU (--dry-run builds the "
              "configurations on CPU)", file=sys.stderr)  # fmt: skip
        return 2
    if not on_gpu and a.allow_cpu and "qlora" in a.variant_list:
        print("gpu_trainer_check: qlora needs a CUDA GPU; drop it from --variants with --allow-cpu", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        if not a.dataset:
            a.dataset = os.path.join(workdir, "train.jsonl")
            synthetic_dataset(a.dataset, n=(a.steps + 2) * a.batch_size, seq_len=a.seq_len)
        if a.dry_run:
            return dry_run(a, workdir)
        if on_gpu:
            print(f"GPU: {torch.cuda.get_device_name(0)}; model {a.model}", flush=True)
        rows = []
        for variant in a.variant_list:
            row: dict[str, Any] = {"variant": variant}
            for mode in ("trl", "ours"):
                row[mode] = _child(a, mode, variant, workdir)
            row["ratio"] = row["ours"]["tokens_per_second"] / row["trl"]["tokens_per_second"]
            row["ok"] = row["ratio"] >= 1 - a.tolerance
            rows.append(row)
        print_table(rows, a.tolerance)
        stop = stop_timing(a, workdir)
        stopped_ok = stop["exit_code"] == 143 and stop["checkpoint_step"] == stop["step"] >= a.stop_at_step
        print(f"SIGTERM -> checkpoint -> exit: {stop['seconds']:.2f} s, exit code {stop['exit_code']}, "
              f"checkpoint at step {stop['checkpoint_step']} (stopped at step {stop['step']})")  # fmt: skip
        print("RESULTS " + json.dumps({"rows": rows, "stop": stop}))
        return 0 if all(r["ok"] for r in rows) and stopped_ok else 1


if __name__ == "__main__":
    sys.exit(main())
