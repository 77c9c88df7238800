"""Run the trainer in this process, or under torchrun (``torch.distributed.run``).

torchrun itself exits 1 after SIGTERM (trainer.md pitfall 9); here ``SignalException`` is
mapped to 128+signum (143 for SIGTERM) and a worker's 78/143 is passed through, so the
operator's failure policy sees the same exit codes in both modes.

torchrun options come from the ``PET_*`` variables (PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT, PET_RDZV_*); processes per node from FT_NPROC_PER_NODE
(0/"auto" = one per visible GPU). A single node without a master address or rendezvous
endpoint runs ``--standalone`` (a free local port).
"""

from __future__ import annotations

import os
import sys

from . import checkpoints as ckpts
from . import contract as c
from .util import LOG, setup_logging


def is_torchrun_worker(env: os._Environ | dict | None = None) -> bool:
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def resolve_nproc(cfg: c.TrainerConfig) -> int:
    if cfg.nproc_per_node and cfg.nproc_per_node > 0:
        return cfg.nproc_per_node
    try:  # auto: one per visible GPU
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def _nnodes(env) -> str:
    return (env.get("PET_NNODES") or "1").strip()


def needs_torchrun(cfg: c.TrainerConfig, env=None) -> bool:
    env = os.environ if env is None else env
    if is_torchrun_worker(env):
        return False
    return resolve_nproc(cfg) > 1 or _nnodes(env) not in ("1", "1:1")


def torchrun_args(nproc: int, argv: list[str], env=None) -> list[str]:
    env = os.environ if env is None else env
    args = ["--nproc-per-node", str(nproc)]
    standalone = _nnodes(env) in ("1", "1:1") and not (
        env.get("PET_MASTER_ADDR") or env.get("PET_RDZV_ENDPOINT") or env.get("PET_STANDALONE")
    )
    if standalone:
        args.append("--standalone")
    return args + ["--module", "finetune_trainer", *argv]


def exit_code_for_failures(exitcodes: dict[int, int]) -> int:
    """Exit code of the launcher when workers failed: rank 0's (or the lowest rank's)
    78 / 128+n passes through, anything else is 1."""
    if not exitcodes:
        return c.EXIT_ERROR
    ordered = [exitcodes[r] for r in sorted(exitcodes)]
    for code in ordered:
        if code == c.EXIT_CONFIG_ERROR:
            return code
    first = ordered[0]
    if 128 < first < 160:
        return first
    return c.EXIT_ERROR


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def precheck(cfg: c.TrainerConfig) -> None:
    """Cheap, torch-free checks before spawning workers (they repeat the full ones)."""
    from .data import dataset_files
    from .worker import check_model_path

    problems = cfg.problems()
    if problems:
        raise c.ConfigError("; ".join(problems))
    dataset_files(cfg.dataset)
    check_model_path(cfg.model)


def run_torchrun(cfg: c.TrainerConfig, argv: list[str]) -> int:
    setup_logging(0)
    try:
        precheck(cfg)
    except c.ConfigError as e:
        reason = c.one_line(str(e))
        LOG.error("configuration error: %s", reason)
        c.write_termination_message(
            cfg.termination_log, c.termination_message(c.OUTCOME_CONFIG_ERROR, max_steps=cfg.max_steps, message=reason)
        )
        return c.EXIT_CONFIG_ERROR
    nproc = resolve_nproc(cfg)
    env = os.environ
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Leave the workers time to save before the agent SIGKILLs them (default 30 s).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "100")
    before = _read(cfg.termination_log)
    args = torchrun_args(nproc, argv, env)
    LOG.info("launching torchrun %s", " ".join(args))

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    detail = ""
    try:
        torchrun_main(args)
        rc = 0
    except SignalException as e:
        rc = 128 + int(e.sigval)
        detail = f"launcher received {getattr(e.sigval, 'name', e.sigval)}"
    except ChildFailedError as e:
        codes = {int(r): int(f.exitcode) for r, f in e.failures.items()}
        rc = exit_code_for_failures(codes)
        detail = "workers failed: " + ", ".join(f"rank {r} exit {x}" for r, x in sorted(codes.items()))
    except Exception as e:  # noqa: BLE001 - e.g. rendezvous errors
        rc = c.EXIT_ERROR
        detail = f"torchrun failed: {type(e).__name__}: {e}"
    if rc != 0 and _read(cfg.termination_log) == before:
        # rank 0 never wrote its message (it died, or never started): write one here.
        outcome = {
            c.EXIT_CONFIG_ERROR: c.OUTCOME_CONFIG_ERROR,
        }.get(rc, c.OUTCOME_PREEMPTED if rc > 128 else c.OUTCOME_ERROR)
        latest = ckpts.latest_complete_checkpoint(cfg.effective_checkpoint_dir)
        c.write_termination_message(
            cfg.termination_log,
            c.termination_message(
                outcome,
                step=latest.step if latest else 0,
                max_steps=cfg.max_steps,
                checkpoint=latest.path if latest else None,
                checkpoint_step=latest.step if latest else None,
                message=detail or f"exit {rc}",
            ),
        )
    if rc != 0:
        LOG.warning("torchrun finished with exit code %d (%s)", rc, detail)
    return rc


def main(cfg: c.TrainerConfig, argv: list[str]) -> int:
    if needs_torchrun(cfg):
        return run_torchrun(cfg, argv)
    from . import worker

    return worker.run(cfg)


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main as _main

    sys.exit(_main())
