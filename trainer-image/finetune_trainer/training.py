"""The training run: HF Trainer + peft LoRA (imports torch/transformers/peft).

Called by :func:`finetune_trainer.worker.run`, which owns exit codes and the termination
message; this module returns ``(outcome, message)`` or raises ConfigError / any error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from . import checkpoints as ckpts
import finetune_contract as c
from .data import PadCollator, tokenize_examples
from .util import LOG

transformers.logging.disable_progress_bar()


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def precision() -> tuple[torch.dtype, bool, bool]:
    """(model dtype, bf16, fp16): bf16 when the GPU supports it, fp16 AMP on older GPUs, fp32 on CPU."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, True, False
        return torch.float16, False, True
    return torch.float32, False, False


class TrainerControlCallback(TrainerCallback):
    """Preemption (flag → all-reduce → save + stop), progress log lines, metrics, chmod."""

    def __init__(self, stopper: Any, report: Any, metrics: Any, is_main: bool, step_delay: float = 0.0):
        self.stopper = stopper
        self.report = report
        self.metrics = metrics
        self.is_main = is_main
        self.step_delay = step_delay
        self.preempted = False
        self._last_log_time = 0.0
        self._last_log_tokens = 0
        self._flag: torch.Tensor | None = None

    # -- helpers ------------------------------------------------------------------------
    def _stop_requested(self, device: torch.device) -> bool:
        local = self.stopper.is_set()
        if not _distributed() or torch.distributed.get_world_size() < 2:
            return local
        # Every rank must stop at the same step (docs/TRAINER.md pitfall 10): agree on the flag each step.
        if self._flag is None or self._flag.device != device:
            self._flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._flag.fill_(1 if local else 0)
        torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        return bool(self._flag.item())

    # -- events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.stopper.training_started = True
        self._last_log_time = time.perf_counter()
        self._last_log_tokens = state.num_input_tokens_seen
        self.report.max_steps = state.max_steps
        self.report.step = state.global_step
        if self.metrics is not None:
            self.metrics.total_steps.set(state.max_steps)
            self.metrics.step.set(state.global_step)
        if self.is_main:
            LOG.info("training: step %d/%d", state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_delay > 0:
            time.sleep(self.step_delay)
        self.report.step = state.global_step
        if self.metrics is not None:
            self.metrics.on_step(state.global_step, state.epoch)
        if self._stop_requested(args.device) and state.global_step < state.max_steps:
            if not self.preempted and self.is_main:
                LOG.warning("stop requested: saving a checkpoint at step %d", state.global_step)
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        dt = now - self._last_log_time
        tps = (tokens - self._last_log_tokens) / dt if dt > 0 else 0.0
        self._last_log_time, self._last_log_tokens = now, tokens
        loss = float(logs["loss"])
        self.report.loss = loss
        if self.metrics is not None:
            if math.isfinite(loss):
                self.metrics.loss.set(loss)
            self.metrics.tokens_per_second.set(tps)
            if state.epoch is not None:
                self.metrics.epoch.set(state.epoch)
        if self.is_main:
            LOG.info(
                "step %d/%d loss=%.6f lr=%.3e grad_norm=%s tokens/s=%.0f epoch=%.3f",
                state.global_step,
                state.max_steps,
                loss,
                float(logs.get("learning_rate", 0.0)),
                f"{logs['grad_norm']:.4f}" if isinstance(logs.get("grad_norm"), (int, float)) else "n/a",
                tps,
                state.epoch or 0.0,
            )

    def on_save(self, args, state, control, **kwargs):
        if not self.is_main:
            return
        path = os.path.join(args.output_dir, c.checkpoint_name(state.global_step))
        ckpts.make_world_readable(path)  # docs/TRAINER.md pitfall 7: safetensors 0.8 writes 0600
        if ckpts.is_complete(path):
            self.report.checkpoint, self.report.checkpoint_step = path, state.global_step
            if self.metrics is not None:
                self.metrics.last_checkpoint_step.set(state.global_step)
            LOG.info("checkpoint saved: %s", path)
        else:
            LOG.warning("checkpoint %s looks incomplete after saving", path)


def _check_target_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    if "all-linear" in targets:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise c.ConfigError(
            f"unknown LoRA target module(s) {','.join(missing)}; "
            f"linear modules in this model: {','.join(leaves[:30])}"
        )


def _load(cfg: c.TrainerConfig, model_path: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001 - any loader failure is a configuration problem
        raise c.ConfigError(f"cannot load tokenizer from {cfg.model}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise c.ConfigError(f"tokenizer of {cfg.model} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise c.ConfigError(f"cannot load model from {cfg.model}: {type(e).__name__}: {e}") from e
    return tokenizer, model


def _pick_resume_checkpoint(
    ckpt_dir: str, is_main: bool, report: Any, resume_from: str | None = None
) -> ckpts.Checkpoint | None:
    """Rank 0 scans, quarantines half-written checkpoints, and broadcasts its choice: the run's
    own latest complete checkpoint, else the explicitly requested ``resume_from``."""
    choice: list[Any] = [None, []]
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        found = ckpts.scan(ckpt_dir)
        skipped = []
        for bad in found.incomplete:
            name = os.path.basename(bad.path)
            try:
                moved = ckpts.quarantine(bad)
                LOG.warning("skipping incomplete checkpoint %s (moved to %s)", name, os.path.basename(moved))
            except OSError as e:
                LOG.warning("skipping incomplete checkpoint %s (could not move it: %s)", name, e)
            skipped.append(name)
        latest = found.latest
        if latest is None and resume_from:
            latest = ckpts.explicit_start(resume_from)
            LOG.info("no checkpoint of this run yet: starting from %s (step %d), as asked", resume_from, latest.step)
        choice = [latest, skipped]
    if _distributed():
        torch.distributed.broadcast_object_list(choice, src=0)
    latest, report.skipped = choice[0], choice[1]
    return latest


def train(
    cfg: c.TrainerConfig,
    model_path: str,
    examples: Any,
    stopper: Any,
    report: Any,
    metrics: Any,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[str, str]:
    """Run one training to completion or preemption; ``callbacks`` are extra HF callbacks
    (benchmarks use one to time steps)."""
    t_start = time.perf_counter()
    dtype, bf16, fp16 = precision()
    on_gpu = torch.cuda.is_available()
    transformers.set_seed(cfg.seed)

    ckpt_dir = cfg.effective_checkpoint_dir
    args = TrainingArguments(
        output_dir=ckpt_dir,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        num_train_epochs=cfg.epochs if cfg.epochs else 1.0,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=bf16,
        fp16=fp16,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
        log_level="warning",
    )
    is_main = args.process_index == 0  # also initializes torch.distributed under torchrun
    if is_main:
        LOG.info(
            "device=%s world_size=%d dtype=%s model=%s dataset=%s (%d examples)",
            args.device,
            args.world_size,
            str(dtype).replace("torch.", ""),
            model_path,
            cfg.dataset,
            len(examples),
        )

    load_delay = float(os.environ.get(c.ENV_DEBUG_LOAD_DELAY, "0") or 0)
    if load_delay > 0:
        time.sleep(load_delay)  # stands in for a model that takes long to download and load
    tokenizer, model = _load(cfg, model_path, dtype)
    features = tokenize_examples(tokenizer, examples, cfg.seq_len)
    _check_target_modules(model, cfg.lora_target_modules)

    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules)
        if "all-linear" not in cfg.lora_target_modules
        else "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise c.ConfigError(f"cannot apply LoRA: {e}") from e
    if is_main:
        trainable, total = model.get_nb_trainable_parameters()
        LOG.info(
            "LoRA r=%d alpha=%d on %s: %d trainable of %d parameters; %d examples tokenized to <= %d tokens",
            cfg.lora_r,
            cfg.lora_alpha,
            ",".join(cfg.lora_target_modules),
            trainable,
            total,
            len(features),
            cfg.seq_len,
        )

    resume = _pick_resume_checkpoint(ckpt_dir, is_main, report, cfg.resume_from)
    if resume is not None:
        report.resumed_from = resume.step
        report.step = resume.step
        report.checkpoint, report.checkpoint_step = resume.path, resume.step
        if metrics is not None:
            metrics.last_checkpoint_step.set(resume.step)
            metrics.step.set(resume.step)
        if is_main:
            LOG.info("resuming from %s (step %d)", resume.path, resume.step)

    if resume is not None:
        done, last_loss = _already_complete(resume, cfg)
        if done is not None:
            # HF would run one more step past max_steps when resuming at the end (5.18):
            # the training is finished, so publish that checkpoint's adapter instead.
            report.max_steps, report.loss = done, last_loss
            if metrics is not None:
                metrics.total_steps.set(done)
            if is_main:
                _publish_adapter(resume.path, cfg.output_dir)
                LOG.info("checkpoint %s is already at step %d of %d: nothing to train", resume.path, resume.step, done)
            _teardown()
            return (
                c.OUTCOME_COMPLETED,
                f"already complete at step {resume.step}/{done}; adapter in {cfg.output_dir}",
            )

    step_delay = float(os.environ.get(c.ENV_DEBUG_STEP_DELAY, "0") or 0)
    control = TrainerControlCallback(stopper, report, metrics, is_main, step_delay)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(features),
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[control, *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)

    if stopper.is_set():
        # SIGTERM while loading: the handler normally raises; this covers a non-main thread.
        from .worker import PreemptedBeforeTraining

        raise PreemptedBeforeTraining("SIGTERM")

    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume.path if resume else None)
    state = trainer.state
    report.step = state.global_step
    report.max_steps = state.max_steps
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if losses:
        report.loss = float(losses[-1])  # docs/TRAINER.md pitfall 2: not TrainOutput.training_loss
    skipped = f"; skipped incomplete {','.join(report.skipped)}" if report.skipped else ""
    resumed = f"; resumed from step {report.resumed_from}" if report.resumed_from is not None else ""

    if control.preempted and state.global_step < state.max_steps:
        report.refresh_checkpoint()
        saved = report.checkpoint_step == state.global_step
        _teardown()
        if not saved and is_main:
            raise RuntimeError(f"stop requested but no complete checkpoint for step {state.global_step}")
        return (
            c.OUTCOME_PREEMPTED,
            f"stopped by signal at step {state.global_step}/{state.max_steps}; "
            f"checkpoint {report.checkpoint}{resumed}{skipped}",
        )

    trainer.save_model(cfg.output_dir)  # adapter + tokenizer; rank 0 writes
    if is_main:
        ckpts.make_world_readable(cfg.output_dir)
    report.refresh_checkpoint()
    _teardown()
    took = time.perf_counter() - t_train
    if is_main:
        LOG.info(
            "done: %d steps in %.1fs (%.1fs total); adapter in %s",
            state.global_step,
            took,
            time.perf_counter() - t_start,
            cfg.output_dir,
        )
    return (
        c.OUTCOME_COMPLETED,
        f"completed {state.global_step}/{state.max_steps} steps; adapter in {cfg.output_dir}{resumed}{skipped}",
    )


_NOT_ADAPTER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")


def _already_complete(resume: ckpts.Checkpoint, cfg: c.TrainerConfig) -> tuple[int | None, float | None]:
    """(the run's total steps, last logged loss) when ``resume`` already reached them, else (None, None).

    The total is FT_MAX_STEPS, or in epoch mode the total recorded in the checkpoint.
    """
    try:
        with open(os.path.join(resume.path, ckpts.TRAINER_STATE_NAME), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None, None
    target = cfg.max_steps or state.get("max_steps")
    step = state.get("global_step", resume.step)
    if isinstance(target, int) and target > 0 and step >= target:
        losses = [h["loss"] for h in state.get("log_history", []) if isinstance(h.get("loss"), (int, float))]
        return target, (float(losses[-1]) if losses else None)
    return None, None


def _publish_adapter(checkpoint: str, output_dir: str) -> None:
    """Copy a checkpoint's adapter (+ tokenizer files) to the output directory."""
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(checkpoint)):
        src = os.path.join(checkpoint, name)
        if not os.path.isfile(src) or name in _NOT_ADAPTER_FILES or name.startswith("rng_state"):
            continue
        tmp = os.path.join(output_dir, f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(output_dir, name))


# A rank that is gone must not hold the others in the teardown barrier for the process
# group's 30-minute timeout: wait this long, then leave without it (the process ends next).
TEARDOWN_TIMEOUT_SECONDS = 20.0


def _teardown() -> None:
    if not _distributed():
        return
    done = threading.Event()

    def barrier_then_destroy() -> None:
        try:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception as e:  # noqa: BLE001
            LOG.warning("process group teardown: %s", e)
        finally:
            done.set()

    threading.Thread(target=barrier_then_destroy, name="pg-teardown", daemon=True).start()
    if not done.wait(TEARDOWN_TIMEOUT_SECONDS):
        LOG.warning("process group teardown did not finish within %.0fs: leaving without it", TEARDOWN_TIMEOUT_SECONDS)
