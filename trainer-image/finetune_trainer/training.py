"""The training run: HF Trainer + peft LoRA (imports torch/transformers/peft).

Called by :func:`finetune_trainer.worker.run`, which owns exit codes and the termination
message; this module returns ``(outcome, message)`` or raises ConfigError / any error.
Model and data preparation are in :mod:`finetune_trainer.prepare`, the per-step callback in
:mod:`finetune_trainer.control`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

import torch
import transformers
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import finetune_contract as c

from . import checkpoints as ckpts
from . import features, prepare, strategy, tracking
from .control import TrainerControlCallback, distributed
from .data import PadCollator
from .stop import PreemptedBeforeTraining
from .util import LOG

transformers.logging.disable_progress_bar()


def train(
    cfg: c.TrainerConfig,
    model_path: str,
    prepared: Any,
    stopper: Any,
    report: Any,
    metrics: Any,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[str, str]:
    """Run one training to completion or preemption; ``callbacks`` are extra HF callbacks
    (benchmarks use one to time steps)."""
    t_start = time.perf_counter()
    dtype, bf16, fp16 = prepare.precision(cfg)
    prepare.check_method(cfg)
    strategy.check(cfg, torch.cuda.is_available(), int(os.environ.get("WORLD_SIZE", "1")))
    transformers.set_seed(cfg.seed)
    args = training_arguments(cfg, bf16, fp16, model_path)
    is_main = args.process_index == 0  # also initializes torch.distributed under torchrun
    reporting = tracking.configure(args, cfg)
    if is_main:
        _log_setup(args, dtype, model_path, cfg.dataset, prepared)
        if reporting:
            LOG.info("reporting to %s (TensorBoard logs: %s)", ",".join(reporting), tracking.tensorboard_dir(cfg))

    load_delay = _env_seconds(c.ENV_DEBUG_LOAD_DELAY)
    if load_delay > 0:
        time.sleep(load_delay)  # stands in for a model that takes long to download and load
    tokenizer, model = prepare.load(cfg, model_path, dtype, args.local_process_index)
    dataset, eval_dataset = _with_eval_split(cfg, tokenizer, prepared, is_main)
    model = prepare.apply_lora(model, cfg)
    if is_main:
        prepare.log_lora(model, cfg, len(dataset))

    resume = _resume_point(cfg, is_main, report, metrics)
    if resume is not None and (done := _finish_if_complete(resume, cfg, model_path, is_main, report, metrics)):
        return done

    control = TrainerControlCallback(stopper, report, metrics, is_main, _env_seconds(c.ENV_DEBUG_STEP_DELAY))
    trainer = _trainer(model, args, tokenizer, (dataset, eval_dataset), [control, *(callbacks or [])])
    if stopper.is_set():
        # SIGTERM while loading: the handler normally raises; this covers a non-main thread.
        raise PreemptedBeforeTraining("SIGTERM")

    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume.path if resume else None)
    _record_final_state(trainer.state, report)
    if control.preempted and trainer.state.global_step < trainer.state.max_steps:
        return _stopped(trainer.state, report, is_main)
    if eval_dataset is not None and control.last_eval_step != trainer.state.global_step:
        trainer.evaluate()  # the end of the run, when it did not fall on an eval step (every rank)
    return _completed(trainer, cfg, model_path, report, is_main, (t_start, t_train))


def training_arguments(
    cfg: c.TrainerConfig, bf16: bool, fp16: bool, model_path: str | None = None
) -> TrainingArguments:
    """The HF arguments of a run (5.x names, docs/TRAINER.md pitfall 6; quiet, pitfall 11; seeded, pitfall 12),
    with ``cfg.training_arguments`` passed through (docs/TRAINER.md "Training arguments") and the
    strategy's FSDP settings (docs/TRAINER.md "FSDP")."""
    on_gpu = torch.cuda.is_available()
    owned = dict(
        output_dir=cfg.effective_checkpoint_dir,
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
        eval_strategy="steps" if cfg.evaluates else "no",
        eval_steps=(cfg.eval_steps or cfg.save_steps) if cfg.evaluates else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=bf16,
        fp16=fp16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False,
    )
    defaults = dict(  # the trainer's choices a user may override
        report_to="none",
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=on_gpu,
        log_level="warning",
        per_device_eval_batch_size=cfg.batch_size,
        prediction_loss_only=True,  # the loss is all the trainer reports; logits of a whole split would not fit
    )
    if cfg.gradient_checkpointing:  # non-reentrant: works with a frozen base, no input grads needed
        defaults["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    passed = passthrough_arguments(cfg)
    owned.update(strategy.fsdp_arguments(cfg, model_path, passed.get("fsdp_config")))
    try:
        return TrainingArguments(**{**defaults, **passed, **owned})
    except (TypeError, ValueError) as e:
        raise c.ConfigError(f"trainingArguments ({', '.join(sorted(passed)) or 'none'}) rejected: {e}") from e


def passthrough_arguments(cfg: c.TrainerConfig) -> dict[str, Any]:
    """``cfg.training_arguments``, checked: no key the trainer owns, none TrainingArguments lacks."""
    passed = dict(cfg.training_arguments or {})
    problems = c.owned_training_argument_problems(passed)
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    problems += [
        f"trainingArguments.{key} is not a TrainingArguments field of transformers {transformers.__version__}"
        for key in sorted(passed)
        if key not in known and key not in c.OWNED_TRAINING_ARGUMENTS
    ]
    if problems:
        raise c.ConfigError("; ".join(problems))
    return passed


def _log_setup(args: TrainingArguments, dtype: torch.dtype, model_path: str, dataset: str, prepared: Any) -> None:
    LOG.info(
        "device=%s world_size=%d dtype=%s model=%s dataset=%s (%d records, format %s)",
        args.device,
        args.world_size,
        str(dtype).replace("torch.", ""),
        model_path,
        dataset,
        len(prepared),
        prepared.format,
    )


def _env_seconds(name: str) -> float:
    """A debug delay from the environment (unset or empty: 0)."""
    return float(os.environ.get(name, "0") or 0)


def _with_eval_split(cfg: c.TrainerConfig, tokenizer: Any, prepared: Any, is_main: bool) -> tuple[Any, Any]:
    """(train features, eval features or None): a held-out fraction, or the eval dataset's own features."""
    train = features.tokenized(cfg, tokenizer, prepared, is_main)
    if cfg.eval_fraction is not None:
        train, held_out = features.split_for_eval(cfg, train)
    elif cfg.eval_dataset:
        held_out = features.tokenized(cfg, tokenizer, prepared.eval if prepared else None, is_main, eval_split=True)
    else:
        return train, None
    if is_main:
        LOG.info("eval split: %d examples (training on %d), every %d steps", held_out.num_rows, train.num_rows,
                 cfg.eval_steps or cfg.save_steps)  # fmt: skip
    return train, held_out


def _trainer(
    model: Any, args: TrainingArguments, tokenizer: Any, datasets: tuple[Any, Any], callbacks: list[Any]
) -> Trainer:
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the control callback logs steps (docs/TRAINER.md pitfall 11)
    return trainer


# -- the resume decision ---------------------------------------------------------------------


def _resume_point(cfg: c.TrainerConfig, is_main: bool, report: Any, metrics: Any) -> ckpts.Checkpoint | None:
    """The checkpoint every rank resumes from (None: from scratch), noted in the report and metrics."""
    resume, report.skipped = _agreed_start(cfg.effective_checkpoint_dir, cfg.resume_from, is_main)
    if resume is None:
        return None
    report.resumed_from = resume.step
    report.step = resume.step
    report.checkpoint, report.checkpoint_step = resume.path, resume.step
    if metrics is not None:
        metrics.last_checkpoint_step.set(resume.step)
        metrics.step.set(resume.step)
    if is_main:
        LOG.info("resuming from %s (step %d)", resume.path, resume.step)
    return resume


def _agreed_start(ckpt_dir: str, resume_from: str | None, is_main: bool) -> tuple[ckpts.Checkpoint | None, list[str]]:
    """Rank 0 chooses (and moves half-written checkpoints aside); every rank gets its choice."""
    choice: list[Any] = [None, []]
    if is_main:
        choice = list(ckpts.choose_start(ckpt_dir, resume_from))
    if distributed():
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0], choice[1]


def _finish_if_complete(
    resume: ckpts.Checkpoint, cfg: c.TrainerConfig, model_path: str, is_main: bool, report: Any, metrics: Any
) -> tuple[str, str] | None:
    """The outcome when ``resume`` already reached the run's total steps, else None.

    HF would run one more step past max_steps when resuming at the end (5.18): the training is
    finished, so that checkpoint's adapter is published instead.
    """
    done, last_loss = ckpts.already_complete(resume, cfg.max_steps)
    if done is None:
        return None
    report.max_steps, report.loss = done, last_loss
    if metrics is not None:
        metrics.total_steps.set(done)
    if is_main:
        ckpts.publish_adapter(resume.path, cfg.output_dir)
        LOG.info("checkpoint %s is already at step %d of %d: nothing to train", resume.path, resume.step, done)
    _teardown()
    merged = _merge_if_asked(cfg, model_path, is_main)
    pushed = _push_if_asked(cfg, is_main, report)
    return (c.OUTCOME_COMPLETED,
            f"already complete at step {resume.step}/{done}; adapter in {cfg.output_dir}{merged}{pushed}")


# -- the outcome -----------------------------------------------------------------------------


def _record_final_state(state: Any, report: Any) -> None:
    report.step = state.global_step
    report.max_steps = state.max_steps
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if losses:
        report.loss = float(losses[-1])  # docs/TRAINER.md pitfall 2: not TrainOutput.training_loss


def _notes(report: Any) -> str:
    """Message suffix: where the run resumed, which checkpoints it skipped."""
    resumed = f"; resumed from step {report.resumed_from}" if report.resumed_from is not None else ""
    skipped = f"; skipped incomplete {','.join(report.skipped)}" if report.skipped else ""
    return resumed + skipped


def _stopped(state: Any, report: Any, is_main: bool) -> tuple[str, str]:
    """Stopped by a signal: the control callback had the Trainer save a checkpoint at this step."""
    report.refresh_checkpoint()
    saved = report.checkpoint_step == state.global_step
    _teardown()
    if not saved and is_main:
        raise RuntimeError(f"stop requested but no complete checkpoint for step {state.global_step}")
    return (
        c.OUTCOME_PREEMPTED,
        f"stopped by signal at step {state.global_step}/{state.max_steps}; "
        f"checkpoint {report.checkpoint}{_notes(report)}",
    )


def _completed(
    trainer: Trainer, cfg: c.TrainerConfig, model_path: str, report: Any, is_main: bool, started: tuple[float, float]
) -> tuple[str, str]:
    """Trained to the end: save the adapter; ``started`` is (run start, training start)."""
    state = trainer.state
    trainer.save_model(cfg.output_dir)  # adapter + tokenizer; rank 0 writes
    if is_main:
        ckpts.make_world_readable(cfg.output_dir)  # docs/TRAINER.md pitfall 7
    report.refresh_checkpoint()
    _teardown()
    merged = _merge_if_asked(cfg, model_path, is_main)
    pushed = _push_if_asked(cfg, is_main, report)
    if is_main:
        now = time.perf_counter()
        LOG.info(
            "done: %d steps in %.1fs (%.1fs total); adapter in %s",
            state.global_step,
            now - started[1],
            now - started[0],
            cfg.output_dir,
        )
    return (
        c.OUTCOME_COMPLETED,
        f"completed {state.global_step}/{state.max_steps} steps; adapter in {cfg.output_dir}{merged}{pushed}"
        f"{_notes(report)}",
    )


def _merge_if_asked(cfg: c.TrainerConfig, model_path: str, is_main: bool) -> str:
    """FT_MERGE on rank 0, after the process group is gone (no peer waits on it); a message suffix."""
    if not (cfg.merge and is_main):
        return ""
    from .merge import merge_adapter

    return f"; merged model in {merge_adapter(cfg, model_path, prepare.precision(cfg)[0])}"


def _push_if_asked(cfg: c.TrainerConfig, is_main: bool, report: Any) -> str:
    """FT_PUSH_S3_* on rank 0, after the merge (docs/TRAINER.md "Push"); a message suffix."""
    if not (cfg.push_uri and is_main):
        return ""
    from .push import push_output

    report.pushed = push_output(cfg)  # only a completed message carries it
    return f"; pushed to {report.pushed}"


# A rank that is gone must not hold the others in the teardown barrier for the process
# group's 30-minute timeout: wait this long, then leave without it (the process ends next).
TEARDOWN_TIMEOUT_SECONDS = 20.0


def _teardown() -> None:
    if not distributed():
        return
    done = threading.Event()

    def barrier_then_destroy() -> None:
        try:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception as e:  # broad on purpose: a failed teardown is logged, the process ends next
            LOG.warning("process group teardown: %s", e)
        finally:
            done.set()

    threading.Thread(target=barrier_then_destroy, name="pg-teardown", daemon=True).start()
    if not done.wait(TEARDOWN_TIMEOUT_SECONDS):
        LOG.warning("process group teardown did not finish within %.0fs: leaving without it", TEARDOWN_TIMEOUT_SECONDS)
