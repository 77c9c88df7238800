"""Entry point: ``python -m finetune_trainer [flags]`` or the ``finetune-trainer`` script.

Configuration comes from the FT_* environment variables (docs/CONTRACTS.md); a CLI flag
overrides its variable. Exit codes: 0 completed, 143 stopped by SIGTERM after a checkpoint,
78 bad configuration, 1 other errors. A JSON termination message is written on every exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# Quiet, offline-friendly defaults; set before transformers can be imported (docs/TRAINER.md pitfalls 3, 11).
# HF_HUB_OFFLINE itself is left to the environment (the image sets it).
for _k, _v in (
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_k, _v)

import finetune_contract as c


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags are a configuration error (78), not exit 2
        raise c.ConfigError(f"bad command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="finetune-trainer",
        description="LoRA fine-tuning trainer. Each option defaults to its FT_* environment variable, "
        "then to the default shown. Exit codes: 0 completed, 143 stopped by SIGTERM after a checkpoint, "
        "78 bad configuration, 1 other errors (docs/CONTRACTS.md \"Trainer contract\").",
    )
    for f in dataclasses.fields(c.TrainerConfig):  # flags generated from the contract's fields
        kind = c.field_type(f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=kind.split()[0].upper(),
            help=f"{f.metadata['help']} [{kind}; env {f.metadata['env']}; default: {c.field_default(f.name)}]",
        )
    return p


def parse_config(argv: list[str], env=None) -> c.TrainerConfig:
    """FT_* environment, then CLI flags on top. Raises ConfigError."""
    cfg = c.TrainerConfig.from_env(os.environ if env is None else env)
    ns = build_parser().parse_args(argv)
    changes = {}
    for f in dataclasses.fields(c.TrainerConfig):
        raw = getattr(ns, f.name)
        if raw is not None and raw.strip():  # an empty flag value leaves the env/default
            changes[f.name] = c.parse_field(f.name, raw)
    return cfg.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the exit code.

    Called without ``argv`` (as a program: ``python -m finetune_trainer`` or the console
    script) the process ends with ``os._exit`` once the termination message is written and
    output flushed: interpreter teardown of torch takes seconds, which would only eat into
    the pod's grace period. Every file the trainer writes is closed before that point.
    """
    if argv is None:
        from .util import flush_and_exit

        flush_and_exit(_run(list(sys.argv[1:])))
    return _run(list(argv))


def _run(argv: list[str]) -> int:
    from .launch import die_with_launcher, is_torchrun_worker

    if is_torchrun_worker():
        die_with_launcher()
    try:
        cfg = parse_config(argv)
    except c.ConfigError as e:
        # Nothing parsed: report with what the environment says about the log path.
        path = os.environ.get(c.ENV_TERMINATION_LOG) or c.DEFAULT_TERMINATION_LOG
        reason = c.one_line(str(e))
        print(f"configuration error: {reason}", file=sys.stderr, flush=True)
        if not (os.environ.get("LOCAL_RANK") and os.environ.get("RANK", "0") != "0"):
            c.write_termination_message(path, c.termination_message(c.OUTCOME_CONFIG_ERROR, message=reason))
        return c.EXIT_CONFIG_ERROR
    from .launch import main as launch_main

    return launch_main(cfg, argv)


if __name__ == "__main__":
    sys.exit(main())
