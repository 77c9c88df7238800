"""GPU check: tokens/s of our trainer vs a plain HF Trainer with the same settings.

Same model (a local directory, e.g. a ~0.5B Qwen2.5/Llama), same data, batch size, sequence
length, LoRA (r, alpha, dropout, q_proj/v_proj), bf16 when supported, logging every step.
Each variant runs in its own subprocess (clean GPU memory). The timed window starts after
``--warmup`` optimizer steps; a CUDA sync is made at each step end in both variants.

    HF_HUB_OFFLINE=1 python bench/gpu_trainer_check.py --model /models/qwen2.5-0.5b \
        [--steps 40] [--warmup 5] [--batch-size 8] [--seq-len 1024] [--dataset train.jsonl]

Prints tokens/s for both and the ratio ours/plain (1.0 = no overhead). ``--allow-cpu`` lets
it run without a GPU (only to check the script itself, e.g. with the tiny test model).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from typing import TypedDict


class LoraSettings(TypedDict):
    """The LoRA keyword arguments of peft.LoraConfig that both variants use."""

    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]


LORA: LoraSettings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
LR, SEED = 2e-4, 42


def _timer():
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

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


def run_ours(a: argparse.Namespace, workdir: str) -> dict:
    import finetune_contract as c
    from finetune_trainer import data as d
    from finetune_trainer import training
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.worker import Report, StopSignal, check_model_path

    cfg = c.TrainerConfig(
        model=a.model, dataset=a.dataset, output_dir=os.path.join(workdir, "ours"),
        max_steps=a.steps, save_steps=100 * a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
        learning_rate=LR, seed=SEED, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"], lora_target_modules=tuple(LORA["target_modules"]),
        metrics_port=0, metrics_addr="127.0.0.1", termination_log="",
    )  # fmt: skip
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


def run_plain(a: argparse.Namespace, workdir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    fp16 = torch.cuda.is_available() and not bf16
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    with open(a.dataset, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    enc = tok(texts, truncation=True, max_length=a.seq_len)
    pairs = zip(enc["input_ids"], enc["attention_mask"], strict=True)
    features = [{"input_ids": i, "attention_mask": m} for i, m in pairs]
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "plain"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        learning_rate=LR, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        seed=SEED, data_seed=SEED, bf16=bf16, fp16=fp16, use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )  # fmt: skip
    timer = _timer()
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.result(a.warmup)


def synthetic_dataset(path: str, n: int, seq_len: int) -> None:
    """Texts longer than seq_len tokens, so every example is exactly seq_len tokens in both runs."""
    from finetune_testbed.trainer_fixtures import WORDS

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(int(seq_len * 1.3)))}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="tokens/s: our trainer vs a plain HF Trainer")
    ap.add_argument("--model", required=True, help="local model directory (offline)")
    ap.add_argument("--dataset", help="JSONL with a 'text' field (default: synthetic)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--allow-cpu", action="store_true")
    ap.add_argument("--mode", choices=["ours", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not 1 <= a.warmup < a.steps:
        ap.error("need 1 <= --warmup < --steps")

    if a.mode:  # child
        res = (run_ours if a.mode == "ours" else run_plain)(a, a.workdir)
        print("RESULT " + json.dumps(res), flush=True)
        return

    if not a.allow_cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device (use --allow-cpu to check the script on CPU)")
    with tempfile.TemporaryDirectory() as workdir:
        if not a.dataset:
            a.dataset = os.path.join(workdir, "train.jsonl")
            synthetic_dataset(a.dataset, n=a.steps * a.batch_size + a.batch_size, seq_len=a.seq_len)
        results = {}
        for mode in ("plain", "ours"):
            cmd = [
                sys.executable, os.path.abspath(__file__), "--mode", mode, "--workdir", workdir,
                "--model", a.model, "--dataset", a.dataset, "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
            ]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{mode} run failed (rc={out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            results[mode] = json.loads(lines[-1][len("RESULT ") :])
            r = results[mode]
            print(
                f"{mode:5s}: {r['tokens_per_second']:10.0f} tokens/s  {r['step_seconds'] * 1000:8.1f} ms/step  "
                f"({r['timed_steps']} timed steps, peak GPU {r['peak_gpu_gib']:.1f} GiB)",
                flush=True,
            )
        ratio = results["ours"]["tokens_per_second"] / results["plain"]["tokens_per_second"]
        print(f"ratio ours/plain: {ratio:.3f}")
        print(json.dumps({"ratio": ratio, **{f"{k}_{m}": v for m, r in results.items() for k, v in r.items()}}))


if __name__ == "__main__":
    main()
